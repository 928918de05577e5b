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
//! - A value with a parsed form is held in that form (the adapter's HTTP allow-list is an
//!   [`AllowList`]), so a bad entry fails here, naming its key, and nothing downstream
//!   parses configuration text again. Each module turns its section into its own settings
//!   with one `from_config` beside its settings type; the defaults live only here.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize, Serializer};

use crate::allow_list::AllowList;

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
    pub adapter: AdapterConfig,
    pub tape_rest: TapeRestConfig,
    /// The file this was read from, so that SIGHUP can read it again.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// `[server.tls]`: HTTPS on `listen` instead of plain HTTP. Absent: plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Most files one job may name; more is refused with 400.
    pub max_files_per_job: usize,
    /// Most files one `POST /filestatus/` may name (each is a Scout call); more is refused
    /// with 400.
    pub max_filestatus_files: usize,
    /// Scout file-status calls in flight at once, for all `/filestatus/` requests together.
    pub filestatus_concurrency: usize,
    /// Longest file path accepted, in bytes.
    pub max_path_bytes: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests may take before the daemon exits anyway.
    pub shutdown_grace_secs: u64,
    /// Most client connections open at once. The daemon also keeps the count below the
    /// open-file limit it starts with (`RLIMIT_NOFILE`) less `reserved_fds`; when full, the
    /// connection idle longest is closed to let a new one in.
    pub max_connections: usize,
    /// File descriptors kept for everything but client connections (database, Kafka, Scout,
    /// callbacks, reports) when the connection cap is taken from the open-file limit.
    pub reserved_fds: usize,
    /// Longest a connection may take, from being ready for a request (just opened, or the
    /// previous answer sent) to the end of the request's head; then it is closed.
    pub header_timeout_secs: u64,
    /// Longest reading one request body may take; then 408 and the connection is closed.
    pub body_timeout_secs: u64,
    /// A connection with no request in hand and no bytes moving for this long is closed.
    pub idle_timeout_secs: u64,
    /// Largest request head (request line and headers) accepted, in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Bytes of request bodies held at once across all requests; a body that does not fit
    /// gets 503 with `Retry-After`. At least `max_body_bytes`.
    pub body_budget_bytes: usize,
    /// After refusing a request whose body was not read (413, 503), how many bytes of it are
    /// read and discarded before closing, so that a client that sends its whole body before
    /// reading sees the answer instead of a reset.
    pub drain_max_bytes: usize,
    /// How long that draining may take.
    pub drain_timeout_secs: u64,
    /// Listening on an address other than loopback with no `[server.auth]` tokens is refused
    /// unless this is true (then the daemon warns at start): anyone who can reach the port
    /// could submit and delete jobs.
    pub allow_unauthenticated: bool,
    /// API tokens; with none, every caller may do everything (loopback only, see above).
    pub auth: AuthConfig,
}

/// `[server.auth]`: the API's bearer tokens.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `[[server.auth.tokens]]`: `name`, `secret` (a [`Secret`]), `scopes`.
    pub tokens: Vec<TokenConfig>,
    /// Submissions (`POST /staging/`) per second each token may make, on average; 0 is no
    /// limit. Beyond it, 429 with `Retry-After`. A token's own `submit_rate` wins.
    pub submit_rate: f64,
    /// Submissions a token may make at once above its rate (the bucket's size); 0 means
    /// one second's worth of the rate, at least 1.
    pub submit_burst: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            tokens: Vec::new(),
            submit_rate: 0.0,
            submit_burst: 0,
        }
    }
}

/// One API token.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it: shown in logs and stored with the jobs it submits.
    pub name: String,
    /// What the client sends as `Authorization: Bearer ...`; at least 16 characters.
    /// Without one, the token is held only by a client certificate whose name (subject CN,
    /// or first DNS name) is the token's name, which needs `server.tls.client_ca`.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// Any of `submit`, `read`, `cancel`, `admin`, `metrics`.
    pub scopes: Vec<crate::auth::Scope>,
    /// This token's own submission rate (see [`AuthConfig::submit_rate`]).
    #[serde(default)]
    pub submit_rate: Option<f64>,
    /// This token's own burst (see [`AuthConfig::submit_burst`]).
    #[serde(default)]
    pub submit_burst: Option<u32>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            tls: None,
            max_body_bytes: 64 * 1024 * 1024,
            max_files_per_job: 500_000,
            max_filestatus_files: 1000,
            filestatus_concurrency: 16,
            max_path_bytes: 4096,
            shutdown_grace_secs: 30,
            max_connections: 4096,
            reserved_fds: 256,
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            // The original ran under uvicorn, whose keep-alive timeout is 5 s.
            idle_timeout_secs: 5,
            max_header_bytes: 64 * 1024,
            body_budget_bytes: 128 * 1024 * 1024,
            drain_max_bytes: 64 * 1024 * 1024,
            drain_timeout_secs: 5,
            allow_unauthenticated: false,
            auth: AuthConfig::default(),
        }
    }
}

/// `[server.tls]`: the API's own TLS. The files are read at start (a bad one stops the
/// start), again on SIGHUP, and whenever their modification time changes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's own certificate first. Required.
    pub cert: PathBuf,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1). Required.
    pub key: PathBuf,
    /// PEM file of the CAs client certificates are verified against. Unset: no client
    /// certificate is asked for.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse a client without a certificate it signed. False: a client may
    /// connect without one (and authenticate by token); one it presents is still verified.
    pub client_cert_required: bool,
    /// Seconds between looks at the files' modification times (a change reloads them);
    /// 0: only SIGHUP reloads.
    pub watch_interval_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            client_ca: None,
            client_cert_required: false,
            watch_interval_secs: 5,
        }
    }
}

impl TlsConfig {
    /// Checks what types alone cannot; the files themselves are read by
    /// `api::tls::Tls::from_config`, which names the key and the file of any problem.
    fn check(&self) -> anyhow::Result<()> {
        if self.cert.as_os_str().is_empty() {
            bail!("server.tls.cert: required (a PEM certificate chain)");
        }
        if self.key.as_os_str().is_empty() {
            bail!("server.tls.key: required (the certificate's PEM private key)");
        }
        if self.client_cert_required && self.client_ca.is_none() {
            bail!("server.tls.client_cert_required: needs server.tls.client_ca to verify against");
        }
        Ok(())
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (file created if missing) or `postgres://USER@HOST/DB`.
    pub url: String,
    /// Password for PostgreSQL, kept out of the URL so the URL can be logged.
    pub password: Option<Secret>,
    /// Connections in the shared pool (PostgreSQL, where each intake writer has one more of
    /// its own; SQLite uses a small fixed pool of readers).
    pub max_connections: u32,
    /// SQLite `synchronous` pragma: "full" (a commit survives power loss) or "normal"
    /// (survives a process crash, not power loss). Intake acknowledges only committed jobs
    /// either way.
    pub sqlite_synchronous: SqliteSync,
    /// Largest number of jobs written in one intake transaction (group commit).
    pub intake_batch_max: usize,
    /// Concurrent intake writers (PostgreSQL only, each with a connection of its own;
    /// SQLite has a single writer).
    pub intake_writers: usize,
    /// SQLite only: the most pages (of 4 KiB) the database file may hold, SQLite's
    /// `max_page_count` on every connection; 0 leaves SQLite's own limit. Beyond it writes
    /// fail as on a full disk: new jobs get 500, nothing acknowledged is lost.
    pub sqlite_max_pages: u64,
    /// PostgreSQL only: how the server's TLS certificate is checked. "auto": `verify-full`
    /// for a server on another host, `prefer` (encrypted if the server offers it,
    /// unverified) for one on loopback or a Unix socket; or libpq's `disable`, `prefer`,
    /// `require`, `verify-ca`, `verify-full`. An `sslmode` in the URL is refused beside a
    /// value here other than "auto".
    pub sslmode: PgSslMode,
    /// PostgreSQL only: the CA certificates (PEM) the server's certificate must chain to
    /// when verified; without it, the system's roots.
    pub ca_file: Option<PathBuf>,
}

/// `database.sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PgSslMode {
    Auto,
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl PgSslMode {
    /// Whether the server's certificate is checked against a CA.
    pub fn verifies(self) -> bool {
        matches!(self, PgSslMode::VerifyCa | PgSslMode::VerifyFull)
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://staged.db".into(),
            password: None,
            max_connections: 16,
            sqlite_synchronous: SqliteSync::Full,
            intake_batch_max: 1024,
            // Two writers made batches half as large: 10-25 % fewer jobs/s on the bench.
            intake_writers: 1,
            sqlite_max_pages: 0,
            sslmode: PgSslMode::Auto,
            ca_file: None,
        }
    }
}

// By hand: the URL may carry a password, and Debug output ends up in logs.
impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(&self.url))
            .field("password", &self.password)
            .field("max_connections", &self.max_connections)
            .field("sqlite_synchronous", &self.sqlite_synchronous)
            .field("intake_batch_max", &self.intake_batch_max)
            .field("intake_writers", &self.intake_writers)
            .field("sqlite_max_pages", &self.sqlite_max_pages)
            .field("sslmode", &self.sslmode)
            .field("ca_file", &self.ca_file)
            .finish()
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
    /// Seconds between sweeps for expired jobs and missed work. Completion does not wait
    /// for it: the event that completes a job queues its callback at once.
    pub sweep_interval_secs: u64,
    /// First and longest wait (seconds) before retrying a failed Scout or lookup call.
    pub retry_min_secs: u64,
    pub retry_max_secs: u64,
    /// Seconds a daemon holds a claimed job or callback before another daemon may take it
    /// over (a killed daemon's work resumes after this).
    pub lease_secs: u64,
    /// Days a finished job stays in the history shown by the dashboard.
    pub history_days: u64,
    /// Milliseconds between each engine loop's looks for due work that nothing in this
    /// process announced (work another daemon or a crashed one left, timers coming due).
    pub poll_interval_ms: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            restage_interval_secs: 21_600,
            expiry_secs: 691_200,
            sweep_interval_secs: 60,
            retry_min_secs: 5,
            retry_max_secs: 600,
            lease_secs: 120,
            history_days: 30,
            poll_interval_ms: 1_000,
        }
    }
}

/// `[tape_rest]`: the WLCG Tape REST API v1, for FTS, gfal2 and Rucio (off by default).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TapeRestConfig {
    /// Serve the API under `base_path`, and its discovery document at
    /// `/.well-known/wlcg-tape-rest-api`.
    pub enabled: bool,
    /// The discovery document's `sitename`.
    pub sitename: String,
    /// The discovery document's `description`.
    pub description: String,
    /// How clients reach this daemon (scheme, host, port), which the discovery document's
    /// endpoint and each request's `Location` are built from, e.g.
    /// `https://tape.example.org:8443`. Empty: `http://` (or `https://` with `[server.tls]`)
    /// and `server.listen`.
    pub public_url: String,
    /// Where the API's endpoints are served (`{base_path}/stage` and so on).
    pub base_path: String,
    /// A client's path (the file URL's path) must start with this, which is removed to give
    /// the tape system's path; one that does not fails in the request's result. Starts and
    /// ends with `/`.
    pub strip_prefix: String,
    /// Put in front of what remains: the tape system's path (as recall messages name it)
    /// is `add_prefix` + the client's path less `strip_prefix`. Does not start with `/`.
    pub add_prefix: String,
    /// Seconds a finished stage request is kept for its client to poll, then forgotten.
    pub keep_finished_secs: u64,
    /// Most files one stage request may name; more is refused with 400.
    pub max_files_per_request: usize,
    /// Most paths one `archiveinfo` answers; the rest of a longer list is left out of the
    /// answer (the specification's way: a partial answer, never an error).
    pub archiveinfo_max_paths: usize,
    /// `[[tape_rest.issuers]]`: WLCG token issuers whose bearer tokens (JWTs, verified
    /// offline against their keys) are accepted, besides `[server.auth]`'s API tokens.
    /// Their key files are read at start and on SIGHUP.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub issuers: Vec<crate::wlcg_token::IssuerConfig>,
}

impl Default for TapeRestConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            sitename: "staged".into(),
            description: "Tape staging through staged".into(),
            public_url: String::new(),
            base_path: "/api/v1".into(),
            strip_prefix: "/".into(),
            add_prefix: String::new(),
            keep_finished_secs: 172_800,
            max_files_per_request: 10_000,
            archiveinfo_max_paths: 1_000,
            issuers: Vec::new(),
        }
    }
}

impl TapeRestConfig {
    fn check(&self) -> anyhow::Result<()> {
        let base = &self.base_path;
        if !base.starts_with('/') || base.ends_with('/') || base.contains("//") {
            bail!("tape_rest.base_path: {base:?} must start with / and not end with one");
        }
        let asvo = [
            "/staging",
            "/ping",
            "/get_",
            "/filestatus",
            "/admin",
            "/metrics",
            "/docs",
        ];
        if let Some(taken) = asvo.iter().find(|p| base.starts_with(**p)) {
            bail!("tape_rest.base_path: {base:?} is under {taken}, which the ASVO API serves");
        }
        let strip = &self.strip_prefix;
        if !strip.starts_with('/') || !strip.ends_with('/') || strip.contains("//") {
            bail!("tape_rest.strip_prefix: {strip:?} must start and end with /");
        }
        if self.add_prefix.starts_with('/') || self.add_prefix.contains("//") {
            bail!(
                "tape_rest.add_prefix: {:?} must not start with / (the tape system's paths are relative to its mount)",
                self.add_prefix
            );
        }
        if !self.public_url.is_empty() {
            check_http_url(&self.public_url)
                .map_err(|e| anyhow::anyhow!("tape_rest.public_url: {e}"))?;
        }
        if self.keep_finished_secs == 0 {
            bail!("tape_rest.keep_finished_secs: must be at least 1");
        }
        if self.max_files_per_request == 0 {
            bail!("tape_rest.max_files_per_request: must be at least 1");
        }
        if self.archiveinfo_max_paths == 0 {
            bail!("tape_rest.archiveinfo_max_paths: must be at least 1");
        }
        // Read now, so that check-config names a missing or bad key file.
        if !self.issuers.is_empty() {
            crate::wlcg_token::Verifier::load(&self.issuers)
                .map_err(|e| anyhow::anyhow!("tape_rest.issuers: {e}"))?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbacksConfig {
    /// HTTP basic-auth user sent with every callback (RESULT_USERNAME).
    pub username: String,
    /// HTTP basic-auth password (RESULT_PASSWORD).
    pub password: Option<Secret>,
    /// Where callbacks may go, in the adapter allow-list's forms: a job whose `notify_url`
    /// matches no entry is refused with 400, and none is ever sent elsewhere. Empty (the
    /// default, as the original): any host, except that link-local, metadata-service and
    /// unspecified addresses are always refused unless an entry names them.
    pub allow: AllowList,
    /// Credentials of their own for some destinations, so that one leaked pair does not
    /// open every endpoint: the first entry whose `hosts` match a callback's URL gives its
    /// username and password; a URL no entry matches gets `username` and `password` above.
    pub credentials: Vec<CallbackCredentials>,
    /// Most callback attempts started to one destination (scheme, host and port) in any
    /// 60 seconds (the original's 200 a minute, which went to one ASVO). Each destination
    /// has its own budget, so failing attempts spend only their own destination's.
    pub per_minute: u32,
    /// Callback attempts in flight at once, in all; an attempt unanswered after
    /// `slow_after_ms` gives its slot back (see `slow_max`).
    pub concurrency: usize,
    /// Attempts in flight at once to one destination; while a destination is failing
    /// (connection errors, timeouts, 5xx, 429), one probe at a time after its backoff.
    pub per_host_concurrency: usize,
    /// Milliseconds after which an unanswered attempt stops holding one of the
    /// `concurrency` slots, so that hanging endpoints cannot hold them all for the timeout.
    pub slow_after_ms: u64,
    /// Most such slow attempts open at once; beyond it a slow attempt keeps its slot.
    pub slow_max: usize,
    /// Seconds one attempt may take; only a 200 answer to the POST itself counts as
    /// delivered (redirects are not followed).
    pub timeout_secs: u64,
    /// Seconds to wait before an error callback (codes 100-199), so that ASVO has
    /// recorded the job it just posted (the original waited ~2 s).
    pub error_delay_secs: u64,
    /// First and longest wait (seconds) between attempts; the original retried every 600 s.
    pub retry_min_secs: u64,
    pub retry_max_secs: u64,
    /// Seconds an expired job's callback is retried before the job is removed anyway
    /// (the removal is recorded in the history as undelivered).
    pub expired_grace_secs: u64,
    /// CA certificates (PEM) callback destinations may chain to, beside the system's (an
    /// ASVO with a site CA).
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate from callback destinations. Only for a test system; warned
    /// about at start.
    pub insecure_skip_tls_verify: bool,
}

/// One `[[callbacks.credentials]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallbackCredentials {
    /// Where these credentials are sent, in the allow-list's forms.
    pub hosts: AllowList,
    pub username: String,
    pub password: Option<Secret>,
}

impl Default for CallbacksConfig {
    fn default() -> Self {
        Self {
            username: String::new(),
            password: None,
            allow: AllowList::default(),
            credentials: Vec::new(),
            per_minute: 200,
            concurrency: 16,
            per_host_concurrency: 4,
            slow_after_ms: 2_000,
            slow_max: 256,
            timeout_secs: 30,
            error_delay_secs: 2,
            retry_min_secs: 10,
            retry_max_secs: 600,
            expired_grace_secs: 86_400,
            ca_file: None,
            insecure_skip_tls_verify: false,
        }
    }
}

/// The tape system's Scout API. See `config/staged.example.toml` for every key.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoutConfig {
    /// Base URLs of the Scout API nodes, e.g. ["https://vss-1:8080"], tried round-robin with
    /// fail-over. Empty: no tape system.
    pub nodes: Vec<String>,
    /// Scout account (SCOUT_API_USER).
    pub username: String,
    /// Scout password (SCOUT_API_PASSWORD).
    pub password: Option<Secret>,
    /// Path of the login endpoint on every node (SCOUT_LOGIN_URL).
    pub login_path: String,
    /// Path of the file status endpoint (SCOUT_QUERY_URL).
    pub file_path: String,
    /// Path of the batch stage endpoint (SCOUT_STAGE_URL).
    pub stage_path: String,
    /// Path of the batch cancel endpoint (SCOUT_CANCEL_URL); newer Scout versions moved it.
    pub cancel_path: String,
    /// Path of the cache state endpoint (SCOUT_CACHESTATE_URL).
    pub cachestate_path: String,
    /// Extra fields merged into every stage and cancel body, e.g. `{ fsid = 3 }`.
    pub stage_extra: toml::Table,
    /// Most paths in one stage or cancel request.
    pub max_paths_per_request: usize,
    /// Largest stage or cancel body, in bytes (Scout refuses bodies over 4 MB).
    pub max_body_bytes: usize,
    /// Seconds to establish a connection to a node.
    pub connect_timeout_secs: f64,
    /// Seconds one request may take, connection included.
    pub request_timeout_secs: f64,
    /// Retries of a call after transient failures (connect errors, timeouts, 5xx) once every
    /// node has been tried; 0: each node is tried once.
    pub retries: u32,
    /// First back-off between retry rounds, in milliseconds; doubles each round, with jitter.
    pub backoff_initial_ms: u64,
    /// Largest back-off between retry rounds, in milliseconds.
    pub backoff_max_ms: u64,
    /// Seconds a node that failed is left out of the rotation before it is probed again.
    pub eject_secs: f64,
    /// PEM file of CA certificates trusted for the nodes' TLS (self-signed Scout certificates),
    /// in addition to the system roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any TLS certificate. Dangerous: only for a test system; a warning is logged.
    pub insecure_skip_tls_verify: bool,
}

impl Default for ScoutConfig {
    fn default() -> Self {
        Self {
            nodes: Vec::new(),
            username: String::new(),
            password: None,
            login_path: "/v1/security/login".into(),
            file_path: "/v1/file".into(),
            stage_path: "/v1/request/batchstage".into(),
            cancel_path: "/v1/request/cancelbatchstage".into(),
            cachestate_path: "/v1/fscache".into(),
            stage_extra: toml::Table::new(),
            max_paths_per_request: 10_000,
            max_body_bytes: 4_000_000,
            connect_timeout_secs: 5.0,
            request_timeout_secs: 60.0,
            retries: 3,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            eject_secs: 30.0,
            ca_file: None,
            insecure_skip_tls_verify: false,
        }
    }
}

/// The Kafka topic the tape system reports recalls on. See `config/staged.example.toml`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, e.g. ["kafka.example.org:9093"] (KAFKA_SERVER). Empty: no Kafka.
    pub brokers: Vec<String>,
    /// Topic the tape system publishes recall messages on (KAFKA_TOPIC).
    pub topic: String,
    /// Consumer group; required when brokers are set. Two deployments (dev and prod) must use
    /// different groups: members of one group split the partitions between them, so each
    /// would see only part of the messages.
    pub group_id: String,
    /// Client id shown in the brokers' logs.
    pub client_id: String,
    /// PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    pub security_protocol: KafkaSecurity,
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (used with the SASL protocols).
    pub sasl_mechanism: KafkaSaslMechanism,
    /// SASL user (KAFKA_USER).
    pub username: String,
    /// SASL password (KAFKA_PASSWORD).
    pub password: Option<Secret>,
    /// PEM file of the CA that signed the brokers' certificates (self-signed in production).
    pub ca_file: Option<PathBuf>,
    /// Most messages applied in one database transaction.
    pub batch_max_messages: usize,
    /// Longest a batch stays open after its first message while more keep arriving, in
    /// milliseconds. A batch is applied as soon as the consumer holds no more messages (or
    /// the one before it is done), so this caps a steady stream's batches, not a trickle's
    /// latency.
    pub batch_max_wait_ms: u64,
    /// Larger messages are counted as malformed and skipped, in bytes.
    pub max_message_bytes: usize,
    /// How far the tape system's clock may be behind ours, in seconds: a recall message
    /// whose `RequestTime` and `CompleteTime` are both older than a job by more than this
    /// does not settle that job's file (it was a recall for someone else, before the job
    /// asked).
    pub clock_skew_secs: u64,
    /// Seconds without a committed batch while messages wait (or without settled group
    /// membership) before the consumer counts as stalled: logged, and `kafka_alive` false.
    pub stall_secs: u64,
    /// `group.instance.id` (static membership). Empty: derived from `client_id`, the host
    /// name and the listen address, which stays the same across restarts of one daemon and
    /// differs between daemons on one host.
    pub instance_id: String,
    /// Further librdkafka properties, e.g. `{ "session.timeout.ms" = "10000" }`; they override
    /// the values derived from the keys above.
    pub extra: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: Vec::new(),
            topic: String::new(),
            group_id: String::new(),
            client_id: "staged".into(),
            security_protocol: KafkaSecurity::Plaintext,
            sasl_mechanism: KafkaSaslMechanism::ScramSha512,
            username: String::new(),
            password: None,
            ca_file: None,
            batch_max_messages: 5_000,
            batch_max_wait_ms: 200,
            max_message_bytes: 65_536,
            clock_skew_secs: 300,
            stall_secs: 60,
            instance_id: String::new(),
            extra: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum KafkaSecurity {
    #[serde(rename = "PLAINTEXT")]
    Plaintext,
    #[serde(rename = "SSL")]
    Ssl,
    #[serde(rename = "SASL_PLAINTEXT")]
    SaslPlaintext,
    #[serde(rename = "SASL_SSL")]
    SaslSsl,
}

impl KafkaSecurity {
    /// The librdkafka `security.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaSecurity::Plaintext => "PLAINTEXT",
            KafkaSecurity::Ssl => "SSL",
            KafkaSecurity::SaslPlaintext => "SASL_PLAINTEXT",
            KafkaSecurity::SaslSsl => "SASL_SSL",
        }
    }

    pub fn uses_sasl(self) -> bool {
        matches!(self, KafkaSecurity::SaslPlaintext | KafkaSecurity::SaslSsl)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum KafkaSaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl KafkaSaslMechanism {
    /// The librdkafka `sasl.mechanism` value.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaSaslMechanism::Plain => "PLAIN",
            KafkaSaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            KafkaSaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// The telescope adapter (a WebAssembly component, see `wit/adapter.wit`) and the bounds
/// every call into it runs under.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterConfig {
    /// The adapter's `.wasm` file. None: no adapter; jobs must list their files.
    pub wasm: Option<PathBuf>,
    /// Wall time one call may take, host HTTP included, in milliseconds.
    pub call_timeout_ms: u64,
    /// Most bytes any one linear memory of a call's instance may grow to.
    pub memory_limit_bytes: usize,
    /// Most bytes of arguments handed to one call (strings and lists summed).
    pub max_input_bytes: usize,
    /// Most bytes one call may return (strings and lists summed).
    pub max_output_bytes: usize,
    /// Where the adapter may send HTTP GETs (see [`AllowList`] for the forms), parsed as
    /// the file is read. Empty: nowhere.
    pub http_allow: AllowList,
    /// Time one GET may take, in milliseconds.
    pub http_timeout_ms: u64,
    /// Largest GET response body, in bytes.
    pub http_max_response_bytes: usize,
    /// The adapter's own settings, handed to it as a JSON object; the host does not read them.
    /// CA certificates (PEM) the adapter's HTTPS peers may chain to, beside the system's.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate from the adapter's HTTPS peers. Only for a test system; warned
    /// about at start.
    pub insecure_skip_tls_verify: bool,
    pub settings: toml::Table,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            wasm: None,
            call_timeout_ms: 30_000,
            memory_limit_bytes: 128 * 1024 * 1024,
            max_input_bytes: 64 * 1024 * 1024,
            max_output_bytes: 64 * 1024 * 1024,
            http_allow: AllowList::default(),
            http_timeout_ms: 20_000,
            http_max_response_bytes: 32 * 1024 * 1024,
            ca_file: None,
            insecure_skip_tls_verify: false,
            settings: toml::Table::new(),
        }
    }
}

impl AdapterConfig {
    /// Checks the call bounds that types alone cannot; errors name the key within
    /// `[adapter]`. [`Config::parse`] runs it, and so does loading an adapter from a config
    /// built in code.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.call_timeout_ms == 0 {
            bail!("call_timeout_ms: must be at least 1");
        }
        if self.http_timeout_ms == 0 {
            bail!("http_timeout_ms: must be at least 1");
        }
        if self.memory_limit_bytes < 2 * 1024 * 1024 {
            bail!("memory_limit_bytes: must be at least 2 MiB (2097152)");
        }
        if self.memory_limit_bytes > 4 * 1024 * 1024 * 1024 {
            bail!("memory_limit_bytes: must be at most 4 GiB (a 32-bit guest's address space)");
        }
        if self.max_input_bytes == 0 || self.max_output_bytes == 0 {
            bail!("max_input_bytes and max_output_bytes: must be at least 1");
        }
        Ok(())
    }
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
        let mut config =
            Self::parse(&text).with_context(|| format!("in config file {}", path.display()))?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses configuration text and checks values that types alone cannot.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let de = toml::Deserializer::parse(text)?;
        // toml's own message points at the offending line, which for a value inside a
        // sub-table (`[kafka.sasl_mechanism]`) is not the key itself: name the key path.
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path.is_empty() || path == "." {
                anyhow::Error::new(inner)
            } else {
                anyhow::anyhow!("{path}: {inner}")
            }
        })?;
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
        if let Some(ca) = &db.ca_file
            && let Err(e) = std::fs::metadata(ca)
        {
            bail!("database.ca_file: cannot read {}: {e}", ca.display());
        }
        if db.max_connections < 2 {
            bail!("database.max_connections: must be at least 2");
        }
        let cb = &self.callbacks;
        if cb.per_minute == 0 || cb.concurrency == 0 || cb.per_host_concurrency == 0 {
            bail!(
                "callbacks.per_minute, callbacks.concurrency and callbacks.per_host_concurrency: \
                 must be at least 1"
            );
        }
        if cb.slow_after_ms == 0 || cb.timeout_secs == 0 {
            bail!("callbacks.slow_after_ms and callbacks.timeout_secs: must be at least 1");
        }
        if self.jobs.sweep_interval_secs == 0 || self.jobs.lease_secs == 0 {
            bail!("jobs.sweep_interval_secs and jobs.lease_secs: must be at least 1");
        }
        if self.jobs.poll_interval_ms == 0 {
            bail!("jobs.poll_interval_ms: must be at least 1");
        }
        if self.server.max_files_per_job == 0 {
            bail!("server.max_files_per_job: must be at least 1");
        }
        if self.server.max_filestatus_files == 0 || self.server.filestatus_concurrency == 0 {
            bail!(
                "server.max_filestatus_files and server.filestatus_concurrency: must be at least 1"
            );
        }
        if self.server.max_path_bytes == 0 {
            bail!("server.max_path_bytes: must be at least 1");
        }
        let srv = &self.server;
        if srv.max_connections == 0 {
            bail!("server.max_connections: must be at least 1");
        }
        for (key, secs) in [
            ("header_timeout_secs", srv.header_timeout_secs),
            ("body_timeout_secs", srv.body_timeout_secs),
            ("idle_timeout_secs", srv.idle_timeout_secs),
        ] {
            if secs == 0 {
                bail!("server.{key}: must be at least 1");
            }
        }
        if srv.max_header_bytes < 1024 {
            bail!("server.max_header_bytes: must be at least 1024");
        }
        if srv.body_budget_bytes < srv.max_body_bytes {
            bail!(
                "server.body_budget_bytes: {} is less than server.max_body_bytes ({}), so the largest body allowed could never be read",
                srv.body_budget_bytes,
                srv.max_body_bytes
            );
        }
        crate::auth::check_config(
            &srv.auth,
            srv.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        )?;
        if let Some(tls) = &srv.tls {
            tls.check()?;
        }
        self.adapter.check().context("adapter")?;
        self.tape_rest.check()?;
        // Each peer's CA file is read and parsed now, so that a bad one stops the start (and
        // check-config) naming its key rather than failing the first connection.
        for (peer, ca, insecure) in [
            (
                "scout",
                &self.scout.ca_file,
                self.scout.insecure_skip_tls_verify,
            ),
            (
                "callbacks",
                &self.callbacks.ca_file,
                self.callbacks.insecure_skip_tls_verify,
            ),
            (
                "adapter",
                &self.adapter.ca_file,
                self.adapter.insecure_skip_tls_verify,
            ),
            // librdkafka reads it only when the consumer starts.
            ("kafka", &self.kafka.ca_file, false),
        ] {
            crate::tls_trust::Trust::from_config(peer, ca.as_deref(), insecure)
                .map_err(anyhow::Error::msg)?;
        }
        for node in &self.scout.nodes {
            check_http_url(node).with_context(|| format!("scout.nodes: {node:?}"))?;
        }
        self.check_scout()?;
        self.check_kafka()?;
        self.check_durations()?;
        Ok(())
    }

    /// Bounds every duration key by [`MAX_DURATION_SECS`]: a larger value parses as a
    /// number but would overflow the daemon's clock arithmetic and panic where it is used.
    fn check_durations(&self) -> anyhow::Result<()> {
        let (j, c, s) = (&self.jobs, &self.callbacks, &self.scout);
        let days = MAX_DURATION_SECS / 86_400;
        for (key, v) in [
            ("reports.expire_days", self.reports.expire_days),
            ("jobs.history_days", j.history_days),
        ] {
            if v > days {
                bail!("{key}: must be at most {days} days (100 years)");
            }
        }
        for (key, v) in [
            (
                "server.shutdown_grace_secs",
                self.server.shutdown_grace_secs,
            ),
            (
                "server.header_timeout_secs",
                self.server.header_timeout_secs,
            ),
            ("server.body_timeout_secs", self.server.body_timeout_secs),
            ("server.idle_timeout_secs", self.server.idle_timeout_secs),
            ("server.drain_timeout_secs", self.server.drain_timeout_secs),
            (
                "server.tls.watch_interval_secs",
                self.server
                    .tls
                    .as_ref()
                    .map_or(0, |t| t.watch_interval_secs),
            ),
            ("jobs.restage_interval_secs", j.restage_interval_secs),
            ("jobs.expiry_secs", j.expiry_secs),
            ("jobs.sweep_interval_secs", j.sweep_interval_secs),
            ("jobs.retry_min_secs", j.retry_min_secs),
            ("jobs.retry_max_secs", j.retry_max_secs),
            ("jobs.lease_secs", j.lease_secs),
            ("callbacks.timeout_secs", c.timeout_secs),
            ("callbacks.error_delay_secs", c.error_delay_secs),
            ("callbacks.retry_min_secs", c.retry_min_secs),
            ("callbacks.retry_max_secs", c.retry_max_secs),
            ("callbacks.expired_grace_secs", c.expired_grace_secs),
            ("kafka.clock_skew_secs", self.kafka.clock_skew_secs),
            ("kafka.stall_secs", self.kafka.stall_secs),
        ] {
            if v > MAX_DURATION_SECS {
                bail!("{key}: must be at most {MAX_DURATION_SECS} seconds (100 years)");
            }
        }
        for (key, v) in [
            ("scout.connect_timeout_secs", s.connect_timeout_secs),
            ("scout.request_timeout_secs", s.request_timeout_secs),
            ("scout.eject_secs", s.eject_secs),
        ] {
            if v > MAX_DURATION_SECS as f64 {
                bail!("{key}: must be at most {MAX_DURATION_SECS} seconds (100 years)");
            }
        }
        let ms = MAX_DURATION_SECS * 1000;
        for (key, v) in [
            ("scout.backoff_initial_ms", s.backoff_initial_ms),
            ("scout.backoff_max_ms", s.backoff_max_ms),
            ("kafka.batch_max_wait_ms", self.kafka.batch_max_wait_ms),
            ("callbacks.slow_after_ms", c.slow_after_ms),
            ("jobs.poll_interval_ms", j.poll_interval_ms),
            ("adapter.call_timeout_ms", self.adapter.call_timeout_ms),
            ("adapter.http_timeout_ms", self.adapter.http_timeout_ms),
        ] {
            if v > ms {
                bail!("{key}: must be at most {ms} milliseconds (100 years)");
            }
        }
        Ok(())
    }

    fn check_scout(&self) -> anyhow::Result<()> {
        let s = &self.scout;
        for (key, path) in [
            ("login_path", &s.login_path),
            ("file_path", &s.file_path),
            ("stage_path", &s.stage_path),
            ("cancel_path", &s.cancel_path),
            ("cachestate_path", &s.cachestate_path),
        ] {
            if !path.starts_with('/') {
                bail!("scout.{key}: {path:?} must start with '/'");
            }
        }
        if s.max_paths_per_request == 0 {
            bail!("scout.max_paths_per_request: must be at least 1");
        }
        if s.max_body_bytes < 1024 {
            bail!("scout.max_body_bytes: must be at least 1024");
        }
        for (key, v) in [
            ("connect_timeout_secs", s.connect_timeout_secs),
            ("request_timeout_secs", s.request_timeout_secs),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bail!("scout.{key}: must be a positive number of seconds");
            }
        }
        if !(s.eject_secs.is_finite() && s.eject_secs >= 0.0) {
            bail!("scout.eject_secs: must be zero or more seconds");
        }
        Ok(())
    }

    fn check_kafka(&self) -> anyhow::Result<()> {
        let k = &self.kafka;
        if k.brokers.is_empty() {
            return Ok(());
        }
        if k.topic.is_empty() {
            bail!("kafka.topic: required when kafka.brokers is set");
        }
        if k.group_id.is_empty() {
            bail!(
                "kafka.group_id: required when kafka.brokers is set (each deployment needs its own)"
            );
        }
        if k.batch_max_messages == 0 {
            bail!("kafka.batch_max_messages: must be at least 1");
        }
        if k.stall_secs == 0 {
            bail!("kafka.stall_secs: must be at least 1");
        }
        if k.instance_id.len() > 249
            || !k
                .instance_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            bail!("kafka.instance_id: at most 249 of the characters a-z A-Z 0-9 . _ -");
        }
        if k.security_protocol.uses_sasl() && k.username.is_empty() {
            bail!(
                "kafka.username: required with security_protocol {}",
                k.security_protocol.as_str()
            );
        }
        Ok(())
    }

    /// What in this configuration is allowed but unsafe, one sentence each: `staged
    /// check-config` prints them, and the daemon logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let srv = &self.server;
        if let Some(risk) = crate::auth::unauthenticated_exposure(srv)
            && srv.allow_unauthenticated
        {
            w.push(format!("{risk} (server.allow_unauthenticated = true)"));
        }
        if !srv.auth.tokens.is_empty() && srv.tls.is_none() && !srv.listen.ip().is_loopback() {
            w.push(format!(
                "server.listen is {} without [server.tls]: API tokens travel in clear text; serve TLS or put a TLS proxy in front",
                srv.listen
            ));
        }
        if srv.auth.tokens.is_empty() && srv.auth.submit_rate > 0.0 {
            w.push(
                "server.auth.submit_rate has no effect: rates are per token, and no tokens are configured"
                    .into(),
            );
        }
        if let Some(mode) = self.pg_unverified_remote() {
            w.push(format!(
                "the PostgreSQL server is on another host and sslmode is {mode}: its certificate is not checked, \
                 so anyone on the path could read the database password and the jobs (use verify-full)"
            ));
        }
        for (peer, insecure, what) in [
            (
                "scout",
                self.scout.insecure_skip_tls_verify,
                "the Scout password",
            ),
            (
                "callbacks",
                self.callbacks.insecure_skip_tls_verify,
                "the callback credentials",
            ),
            (
                "adapter",
                self.adapter.insecure_skip_tls_verify,
                "what the adapter fetches",
            ),
        ] {
            if insecure {
                w.push(format!(
                    "{peer}.insecure_skip_tls_verify = true: that peer's certificate is not checked, so anyone on the path can read or change {what}"
                ));
            }
        }
        let cb = &self.callbacks;
        if cb.allow.is_empty() && (cb.password.is_some() || !cb.credentials.is_empty()) {
            w.push(
                "callbacks.allow is empty: the callback password goes to whatever host a submitted notify_url names; list your ASVO there"
                    .into(),
            );
        }
        w
    }

    /// The sslmode in force when PostgreSQL is on another host and its certificate goes
    /// unchecked.
    fn pg_unverified_remote(&self) -> Option<String> {
        let url = url::Url::parse(&self.database.url).ok()?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return None;
        }
        let host = url.host_str().unwrap_or("");
        let local = host.is_empty()
            || host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
            || url
                .query_pairs()
                .any(|(k, v)| k == "host" && v.starts_with('/'));
        if local {
            return None;
        }
        let in_url = url
            .query_pairs()
            .find(|(k, _)| k == "sslmode")
            .map(|(_, v)| v.into_owned());
        match (in_url, self.database.sslmode) {
            (Some(m), _) if !matches!(m.as_str(), "verify-ca" | "verify-full") => Some(m),
            (None, m) if m != PgSslMode::Auto && !m.verifies() => Some(
                serde_json::to_value(m)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            ),
            _ => None,
        }
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

/// The longest duration any key may give: 100 years, far beyond any useful setting and
/// small enough that Unix milliseconds in an `i64` and `Instant` arithmetic cannot overflow.
pub const MAX_DURATION_SECS: u64 = 100 * 365 * 86_400;

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

    /// Every key of the config structs, as `section.key`, from a serialized value; the
    /// free-form tables (librdkafka's and the adapter's own settings) are not descended.
    fn keys(v: &toml::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
        let Some(t) = v.as_table() else { return };
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_table() && !matches!(key.as_str(), "kafka.extra" | "adapter.settings") {
                keys(v, &key, out);
            } else {
                out.insert(key);
            }
        }
    }

    /// The example claims every key: one the structs have and the example lacks fails here
    /// (one the example has and the structs lack fails its parse in `tests/it/process.rs`). Keys whose default is
    /// "not set" serialize to nothing, so only they may be absent, commented out.
    #[test]
    fn the_example_shows_every_key() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/staged.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let example: toml::Value = toml::from_str(&text).unwrap();
        let default = toml::Value::try_from(Config::default()).unwrap();
        let (mut have, mut want) = Default::default();
        keys(&example, "", &mut have);
        keys(&default, "", &mut want);
        let missing: Vec<_> = want.difference(&have).collect();
        assert!(
            missing.is_empty(),
            "config/staged.example.toml lacks {missing:?}"
        );
    }

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
    fn a_wrong_value_in_a_sub_table_names_its_key() {
        let err = Config::parse("[kafka.sasl_mechanism]\n_ = false\n").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("kafka.sasl_mechanism"), "{msg}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::parse("[server]\nmax_body_bytes = \"big\"\n").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("max_body_bytes"), "{msg}");
    }

    #[test]
    fn secrets_from_env_and_file_are_redacted() {
        // The variable is handed to a child run of this test rather than set here: setting
        // the environment of a running process is unsound while other threads (the other
        // tests, C code reading it with getenv) may read it.
        if std::env::var_os("STAGED_TEST_SECRET_CFG").is_none() {
            let name = "config::tests::secrets_from_env_and_file_are_redacted";
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--test-threads=1"])
                .env("STAGED_TEST_SECRET_CFG", "from-env")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
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
    fn every_peers_ca_file_is_read_at_load() {
        for peer in ["scout", "callbacks", "adapter", "kafka"] {
            let err = Config::parse(&format!("[{peer}]\nca_file = \"/nonexistent/ca.pem\"\n"))
                .unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains(&format!("{peer}.ca_file")), "{msg}");
        }
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
    fn server_bounds_are_checked() {
        let c = Config::parse("").unwrap();
        assert!(c.server.body_budget_bytes >= c.server.max_body_bytes);
        let err = Config::parse("[server]\nmax_body_bytes = 2048\nbody_budget_bytes = 1024\n")
            .unwrap_err();
        assert!(format!("{err:#}").contains("server.body_budget_bytes"));
        let err = Config::parse("[server]\nheader_timeout_secs = 0\n").unwrap_err();
        assert!(format!("{err:#}").contains("server.header_timeout_secs"));
        let err = Config::parse("[server]\nmax_connections = 0\n").unwrap_err();
        assert!(format!("{err:#}").contains("server.max_connections"));
    }

    #[test]
    fn durations_that_would_overflow_are_refused() {
        for (text, key) in [
            (
                "[jobs]\nhistory_days = 213503982334602\n",
                "jobs.history_days",
            ),
            (
                "[scout]\nconnect_timeout_secs = 1e300\n",
                "scout.connect_timeout_secs",
            ),
            (
                "[kafka]\nbatch_max_wait_ms = 18446744073709551615\n",
                "kafka.batch_max_wait_ms",
            ),
            (
                "[jobs]\nrestage_interval_secs = 18446744073709551615\n",
                "jobs.restage_interval_secs",
            ),
        ] {
            let err = Config::parse(text).unwrap_err();
            assert!(format!("{err:#}").contains(key), "{text}: {err:#}");
        }
        let c = Config::parse("[jobs]\nhistory_days = 36500\n").unwrap();
        assert_eq!(c.jobs.history_days, 36_500);
    }

    #[test]
    fn a_bad_allow_list_entry_names_the_key_and_the_entry() {
        let err = Config::parse("[adapter]\nhttp_allow = [\"ok.example.org\", \"user@host\"]\n")
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("adapter.http_allow"), "{msg}");
        assert!(msg.contains("\"user@host\""), "{msg}");
    }

    #[test]
    fn the_allow_list_reads_back_as_written() {
        let c = Config::parse("[adapter]\nhttp_allow = [\"*.Example.org\", \"https://h/api/\"]\n")
            .unwrap();
        assert!(
            c.adapter
                .http_allow
                .allows(&url::Url::parse("https://a.example.org/").unwrap())
        );
        let shown = c.redacted_toml().unwrap();
        assert!(
            shown.contains("\"*.Example.org\"") && shown.contains("\"https://h/api/\""),
            "{shown}"
        );
    }

    #[test]
    fn the_poll_interval_is_bounded() {
        assert_eq!(Config::parse("").unwrap().jobs.poll_interval_ms, 1_000);
        for text in [
            "[jobs]\npoll_interval_ms = 0\n",
            "[jobs]\npoll_interval_ms = 18446744073709551615\n",
        ] {
            let err = Config::parse(text).unwrap_err();
            assert!(
                format!("{err:#}").contains("jobs.poll_interval_ms"),
                "{text}: {err:#}"
            );
        }
    }

    #[test]
    fn the_tls_section_is_checked() {
        assert!(Config::parse("").unwrap().server.tls.is_none());
        let c = Config::parse("[server.tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\n").unwrap();
        let tls = c.server.tls.unwrap();
        assert_eq!(tls.cert, Path::new("/c.pem"));
        assert!(tls.client_ca.is_none() && !tls.client_cert_required);
        assert_eq!(tls.watch_interval_secs, 5);
        for (text, key) in [
            ("[server.tls]\nkey = \"/k.pem\"\n", "server.tls.cert"),
            ("[server.tls]\ncert = \"/c.pem\"\n", "server.tls.key"),
            (
                "[server.tls]\ncert = \"/c\"\nkey = \"/k\"\nclient_cert_required = true\n",
                "server.tls.client_cert_required",
            ),
            (
                "[server.tls]\ncert = \"/c\"\nkey = \"/k\"\nwatch_interval_secs = 18446744073709551615\n",
                "server.tls.watch_interval_secs",
            ),
            (
                "[server.tls]\ncert = \"/c\"\nkey = \"/k\"\nciphers = 1\n",
                "ciphers",
            ),
        ] {
            let err = Config::parse(text).unwrap_err();
            assert!(format!("{err:#}").contains(key), "{text}: {err:#}");
        }
    }

    #[test]
    fn bad_database_url_is_refused() {
        let err = Config::parse("[database]\nurl = \"mysql://x\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("database.url"));
    }
}
