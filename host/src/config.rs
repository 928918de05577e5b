//! The daemon's configuration: one TOML file, parsed strictly.
//!
//! Invariants this module keeps:
//! - An unknown key or a value of the wrong type is an error that names the key and the file
//!   (every table is `deny_unknown_fields`), so a typo never silently falls back to a default.
//! - Every key has a default, documented in `config/staged.example.toml`; an empty file (or no
//!   file at all) is the embedded setup: SQLite `staged.db` in the working directory,
//!   listening on 127.0.0.1:8000.
//! - Secrets are [`Secret`]s: given inline, by environment variable (`{ env = "NAME" }`) or by
//!   file (`{ file = "/run/secrets/x" }`), resolved once at load, and never printed: their
//!   `Debug` and `Serialize` forms are redacted, and a password inside the database URL is
//!   masked wherever the URL is shown.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize, Serializer};

/// The whole configuration file.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub logging: LoggingConfig,
    pub reports: ReportsConfig,
    pub jobs: JobsConfig,
    pub callbacks: CallbacksConfig,
    pub scout: ScoutConfig,
    pub kafka: KafkaConfig,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Most files one job may name; more is refused with 400.
    pub max_files_per_job: usize,
    /// Longest file path accepted, in bytes.
    pub max_path_bytes: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take before the daemon exits anyway.
    pub shutdown_grace_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            max_body_bytes: 64 * 1024 * 1024,
            max_files_per_job: 500_000,
            max_path_bytes: 4096,
            shutdown_grace_secs: 30,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (file created if missing) or `postgres://USER@HOST/DB`.
    pub url: String,
    /// Password for PostgreSQL, kept out of the URL so the URL can be logged.
    pub password: Option<Secret>,
    /// Connections in the pool (PostgreSQL; SQLite uses a small fixed pool of readers).
    pub max_connections: u32,
    /// SQLite `synchronous` pragma: "full" (a commit survives power loss) or "normal"
    /// (survives a process crash, not power loss). Intake acknowledges only committed jobs
    /// either way.
    pub sqlite_synchronous: SqliteSync,
    /// Largest number of jobs written in one intake transaction (group commit).
    pub intake_batch_max: usize,
    /// Concurrent intake writers (PostgreSQL only; SQLite has a single writer).
    pub intake_writers: usize,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://staged.db".into(),
            password: None,
            max_connections: 16,
            sqlite_synchronous: SqliteSync::Full,
            intake_batch_max: 1024,
            intake_writers: 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSync {
    Full,
    Normal,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// "text" for people, "json" for log collectors.
    pub format: LogFormat,
    /// A tracing filter such as "info" or "staged=debug,sqlx=warn"; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportsConfig {
    /// Failure reports live in `<dir>/failed/<job_id>.txt` (the original's STAGING_LOGDIR).
    pub dir: PathBuf,
    /// Reports older than this many days are removed (REPORT_EXPIREDAYS)...
    pub expire_days: u64,
    /// ...except the newest this many, which are always kept.
    pub keep_newest: usize,
}

impl Default for ReportsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("staged-reports"),
            expire_days: 30,
            keep_newest: 100,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Seconds between re-asking Scout for a job's still-waiting files (FILE_RESTAGE_INTERVAL).
    pub restage_interval_secs: u64,
    /// Seconds after which an unfinished job expires with code 10 (JOB_EXPIRY_TIME).
    pub expiry_secs: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            restage_interval_secs: 21_600,
            expiry_secs: 691_200,
        }
    }
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbacksConfig {
    /// HTTP basic-auth user sent with every callback (RESULT_USERNAME).
    pub username: String,
    /// HTTP basic-auth password (RESULT_PASSWORD).
    pub password: Option<Secret>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoutConfig {
    /// Base URLs of the Scout API nodes, e.g. ["https://vss-1:8080"]. Empty: no tape system.
    pub nodes: Vec<String>,
    /// Scout account (SCOUT_API_USER).
    pub username: String,
    /// Scout password (SCOUT_API_PASSWORD).
    pub password: Option<Secret>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, e.g. ["kafka.example.org:9093"]. Empty: no Kafka.
    pub brokers: Vec<String>,
    /// Topic the tape system publishes recall messages on (KAFKA_TOPIC).
    pub topic: String,
    /// Consumer group. Two deployments (dev and prod) must use different groups, or each
    /// would see only part of the messages.
    pub group_id: String,
    /// SASL user (KAFKA_USER).
    pub username: String,
    /// SASL password (KAFKA_PASSWORD).
    pub password: Option<Secret>,
}

/// A secret value: inline in the TOML, or read from an environment variable or a file.
///
/// ```toml
/// password = "inline"                       # discouraged outside tests
/// password = { env = "DBPASSWORD" }
/// password = { file = "/run/secrets/db" }   # trailing newline stripped
/// ```
#[derive(Clone, Deserialize)]
#[serde(try_from = "SecretSource")]
pub struct Secret {
    value: String,
    source: String,
}

#[derive(Deserialize)]
#[serde(untagged, deny_unknown_fields)]
enum SecretSource {
    Inline(String),
    Env { env: String },
    File { file: PathBuf },
}

impl TryFrom<SecretSource> for Secret {
    type Error = String;

    fn try_from(src: SecretSource) -> Result<Self, String> {
        match src {
            SecretSource::Inline(value) => Ok(Secret {
                value,
                source: "inline".into(),
            }),
            SecretSource::Env { env } => match std::env::var(&env) {
                Ok(value) => Ok(Secret {
                    value,
                    source: format!("env {env}"),
                }),
                Err(_) => Err(format!("environment variable {env} is not set")),
            },
            SecretSource::File { file } => match std::fs::read_to_string(&file) {
                Ok(text) => Ok(Secret {
                    value: text.trim_end_matches(['\n', '\r']).to_string(),
                    source: format!("file {}", file.display()),
                }),
                Err(e) => Err(format!("cannot read secret file {}: {e}", file.display())),
            },
        }
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted, from {}>", self.source)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("<redacted, from {}>", self.source))
    }
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in config file {}", path.display()))
    }

    /// Parses configuration text and checks values that types alone cannot.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let db = &self.database;
        if !(db.url.starts_with("sqlite:")
            || db.url.starts_with("postgres://")
            || db.url.starts_with("postgresql://"))
        {
            bail!(
                "database.url: {:?} is neither sqlite:// nor postgres://",
                redact_url(&db.url)
            );
        }
        if db.intake_batch_max == 0 {
            bail!("database.intake_batch_max: must be at least 1");
        }
        if db.intake_writers == 0 {
            bail!("database.intake_writers: must be at least 1");
        }
        if db.max_connections < 2 {
            bail!("database.max_connections: must be at least 2");
        }
        if self.server.max_files_per_job == 0 {
            bail!("server.max_files_per_job: must be at least 1");
        }
        if self.server.max_path_bytes == 0 {
            bail!("server.max_path_bytes: must be at least 1");
        }
        for node in &self.scout.nodes {
            check_http_url(node).with_context(|| format!("scout.nodes: {node:?}"))?;
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets and URL passwords redacted.
    pub fn redacted_toml(&self) -> anyhow::Result<String> {
        let mut value = toml::Value::try_from(self)?;
        if let Some(url) = value
            .get_mut("database")
            .and_then(|d| d.get_mut("url"))
            .and_then(|u| u.as_str().map(|s| s.to_string()))
        {
            value["database"]["url"] = toml::Value::String(redact_url(&url));
        }
        Ok(toml::to_string_pretty(&value)?)
    }
}

/// Checks that `s` is an absolute http(s) URL with a host.
pub fn check_http_url(s: &str) -> anyhow::Result<url::Url> {
    let url = url::Url::parse(s).map_err(|e| anyhow::anyhow!("not a URL: {e}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        bail!("scheme {:?} is not http or https", url.scheme());
    }
    if url.host_str().is_none_or(str::is_empty) {
        bail!("URL has no host");
    }
    Ok(url)
}

/// A URL safe to print: any password in it is replaced by `***`.
pub fn redact_url(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(_) => s.to_string(),
        // Unparsable: do not risk echoing a credential.
        Err(_) if s.contains('@') => "<unparsable URL, redacted>".into(),
        Err(_) => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_embedded_default() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.database.url, "sqlite://staged.db");
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(c.server.max_body_bytes, 64 * 1024 * 1024);
        assert_eq!(c.jobs.expiry_secs, 691_200);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[server]\nlisen = \"127.0.0.1:1\"\n").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("lisen"), "{msg}");
        let err = Config::parse("[servre]\n").unwrap_err();
        assert!(format!("{err:#}").contains("servre"));
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::parse("[server]\nmax_body_bytes = \"big\"\n").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("max_body_bytes"), "{msg}");
    }

    #[test]
    fn secrets_from_env_and_file_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        // SAFETY: the variable name is unique to this test.
        unsafe { std::env::set_var("STAGED_TEST_SECRET_CFG", "from-env") };
        let text = format!(
            "[scout]\npassword = {{ env = \"STAGED_TEST_SECRET_CFG\" }}\n[kafka]\npassword = {{ file = {:?} }}\n[callbacks]\npassword = \"inline-pw\"\n[database]\nurl = \"postgres://u:urlpw@h/db\"\n",
            file.display().to_string()
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.scout.password.as_ref().unwrap().expose(), "from-env");
        assert_eq!(c.kafka.password.as_ref().unwrap().expose(), "from-file");
        let shown = c.redacted_toml().unwrap();
        for secret in ["from-env", "from-file", "inline-pw", "urlpw"] {
            assert!(!shown.contains(secret), "{secret} leaked:\n{shown}");
            assert!(
                !format!("{c:?}").contains(secret),
                "{secret} leaked in Debug"
            );
        }
        assert!(shown.contains("env STAGED_TEST_SECRET_CFG"));
    }

    #[test]
    fn missing_secret_env_is_an_error() {
        let err =
            Config::parse("[scout]\npassword = { env = \"STAGED_NO_SUCH_VAR_X\" }\n").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("STAGED_NO_SUCH_VAR_X"), "{msg}");
        assert!(msg.contains("password"), "{msg}");
    }

    #[test]
    fn bad_database_url_is_refused() {
        let err = Config::parse("[database]\nurl = \"mysql://x\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("database.url"));
    }
}
