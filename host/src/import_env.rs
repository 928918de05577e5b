//! `staged import-env`: the original service's `.envrc` (direnv syntax: `export NAME=value`,
//! quotes, comments) turned into a staged TOML config.
//!
//! Invariant: no secret's value is ever written or printed. The four secrets become
//! `{ env = "STAGED_..." }` references and the importer says which variables to set from
//! which old ones; every variable it does not know is listed, never dropped silently.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use url::Url;

/// The original's variables this importer understands (the 22 of its README).
pub const KNOWN: [&str; 22] = [
    "SCOUT_API_USER",
    "SCOUT_API_PASSWORD",
    "SCOUT_LOGIN_URL",
    "SCOUT_QUERY_URL",
    "SCOUT_STAGE_URL",
    "SCOUT_CANCEL_URL",
    "SCOUT_CACHESTATE_URL",
    "RESULT_USERNAME",
    "RESULT_PASSWORD",
    "DBUSER",
    "DBPASSWORD",
    "DBHOST",
    "DBNAME",
    "KAFKA_TOPIC",
    "KAFKA_SERVER",
    "KAFKA_USER",
    "KAFKA_PASSWORD",
    "DATA_FILES_URL",
    "STAGING_LOGDIR",
    "REPORT_EXPIREDAYS",
    "FILE_RESTAGE_INTERVAL",
    "JOB_EXPIRY_TIME",
];

/// Old secret variable -> the environment variable the new config reads it from.
const SECRETS: [(&str, &str); 4] = [
    ("SCOUT_API_PASSWORD", "STAGED_SCOUT_PASSWORD"),
    ("RESULT_PASSWORD", "STAGED_RESULT_PASSWORD"),
    ("DBPASSWORD", "STAGED_DB_PASSWORD"),
    ("KAFKA_PASSWORD", "STAGED_KAFKA_PASSWORD"),
];

/// Where the Debian package installs the MWA adapter.
const MWA_ADAPTER: &str = "/usr/lib/staged/adapters/adapter_mwa.wasm";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImportError {
    #[error("line {line}: {reason}")]
    Syntax { line: usize, reason: String },
    #[error("{name}: {reason}")]
    Value { name: String, reason: String },
}

/// What the import made.
#[derive(Debug)]
pub struct Imported {
    pub toml: String,
    /// (new variable, old variable) pairs to set before starting the daemon.
    pub set_env: Vec<(&'static str, &'static str)>,
    /// Things the operator should look at.
    pub notes: Vec<String>,
    /// Variables in the file this importer does not know.
    pub unknown: Vec<String>,
}

/// Reads direnv-style assignments: `[export] NAME=value`, the value bare, 'single-quoted'
/// or "double-quoted" (with backslash escapes); `#` starts a comment outside quotes.
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, ImportError> {
    let mut vars = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let bad = |reason: &str| ImportError::Syntax {
            line,
            reason: reason.into(),
        };
        let s = raw.trim();
        if s.is_empty() || s.starts_with('#') {
            continue;
        }
        let s = s.strip_prefix("export ").map(str::trim_start).unwrap_or(s);
        let Some((name, rest)) = s.split_once('=') else {
            return Err(bad("expected NAME=value"));
        };
        let name = name.trim();
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || name.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(bad(&format!("{name:?} is not a variable name")));
        }
        vars.insert(name.to_string(), value(rest).map_err(|r| bad(&r))?);
    }
    Ok(vars)
}

fn value(rest: &str) -> Result<String, String> {
    // The original's template writes `NAME=<Insert secret here>` (not valid shell, but what
    // operators copied): such a placeholder is taken whole.
    let whole = rest.trim();
    if whole.starts_with('<') && whole.ends_with('>') {
        return Ok(whole.to_string());
    }
    let mut out = String::new();
    let mut chars = rest.trim_start().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next() {
                    Some('\'') => break,
                    Some(c) => out.push(c),
                    None => return Err("unterminated single quote".into()),
                }
            },
            '"' => loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => out.push(c),
                        None => return Err("unterminated double quote".into()),
                    },
                    Some(c) => out.push(c),
                    None => return Err("unterminated double quote".into()),
                }
            },
            '#' if out.is_empty() || out.ends_with(char::is_whitespace) => break,
            c if c.is_whitespace() => {
                // Unquoted whitespace ends the value, except before a comment.
                let tail: String = chars.collect();
                if tail.trim().is_empty() || tail.trim_start().starts_with('#') {
                    break;
                }
                return Err("unquoted whitespace in a value".into());
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Whether a value is the template's `<Insert secret here>` kind of placeholder.
fn placeholder(v: &str) -> bool {
    v.starts_with('<') && v.ends_with('>')
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Builds the config from the variables.
pub fn import(vars: &BTreeMap<String, String>) -> Result<Imported, ImportError> {
    let mut notes = Vec::new();
    let mut set_env = Vec::new();
    let get = |name: &str| vars.get(name).map(String::as_str).filter(|v| !v.is_empty());
    let note_placeholder = |name: &str, notes: &mut Vec<String>| {
        if get(name).is_some_and(placeholder) {
            notes.push(format!(
                "{name} is still a placeholder in the file; edit the value imported from it"
            ));
        }
    };
    let number = |name: &str| -> Result<Option<u64>, ImportError> {
        get(name)
            .map(|v| {
                v.parse::<u64>().map_err(|_| ImportError::Value {
                    name: name.into(),
                    reason: format!("{v:?} is not a whole number"),
                })
            })
            .transpose()
    };
    let mut t = String::from(
        "# Imported from the original service's environment by `staged import-env`.\n\
         # Every key not written here has the default config/staged.example.toml documents.\n",
    );

    // [database]
    if let (Some(host), Some(name)) = (get("DBHOST"), get("DBNAME")) {
        let user = get("DBUSER").unwrap_or("staging");
        let url = format!("postgres://{user}@{host}/{name}");
        Url::parse(&url).map_err(|e| ImportError::Value {
            name: "DBHOST".into(),
            reason: format!("{url} is not a URL: {e}"),
        })?;
        let _ = writeln!(t, "\n[database]\nurl = {}", q(&url));
        if vars.contains_key("DBPASSWORD") {
            let _ = writeln!(t, "password = {{ env = \"STAGED_DB_PASSWORD\" }}");
        }
    }

    // [jobs]
    let restage = number("FILE_RESTAGE_INTERVAL")?;
    let expiry = number("JOB_EXPIRY_TIME")?;
    if restage.is_some() || expiry.is_some() {
        t.push_str("\n[jobs]\n");
        if let Some(v) = restage {
            let _ = writeln!(t, "restage_interval_secs = {v}");
        }
        if let Some(v) = expiry {
            let _ = writeln!(t, "expiry_secs = {v}");
        }
    }

    // [reports]
    let expire_days = number("REPORT_EXPIREDAYS")?;
    if get("STAGING_LOGDIR").is_some() || expire_days.is_some() {
        t.push_str("\n[reports]\n");
        if let Some(dir) = get("STAGING_LOGDIR") {
            let _ = writeln!(t, "dir = {}", q(dir));
        }
        if let Some(v) = expire_days {
            let _ = writeln!(t, "expire_days = {v}");
        }
    }

    // [callbacks]
    if get("RESULT_USERNAME").is_some() || vars.contains_key("RESULT_PASSWORD") {
        t.push_str("\n[callbacks]\n");
        if let Some(u) = get("RESULT_USERNAME") {
            note_placeholder("RESULT_USERNAME", &mut notes);
            let _ = writeln!(t, "username = {}", q(u));
        }
        if vars.contains_key("RESULT_PASSWORD") {
            let _ = writeln!(t, "password = {{ env = \"STAGED_RESULT_PASSWORD\" }}");
        }
        notes.push(
            "[callbacks] allow is empty (any host may be a notify_url): list your ASVO host there"
                .into(),
        );
    }

    // [scout]
    let scout_urls: Vec<(&str, &str)> = [
        ("SCOUT_LOGIN_URL", "login_path"),
        ("SCOUT_QUERY_URL", "file_path"),
        ("SCOUT_STAGE_URL", "stage_path"),
        ("SCOUT_CANCEL_URL", "cancel_path"),
        ("SCOUT_CACHESTATE_URL", "cachestate_path"),
    ]
    .into_iter()
    .filter(|(name, _)| get(name).is_some())
    .collect();
    if !scout_urls.is_empty() {
        let mut bases: Vec<String> = Vec::new();
        let mut paths = String::new();
        for (name, key) in &scout_urls {
            let raw = get(name).unwrap_or_default();
            let url = Url::parse(raw).map_err(|e| ImportError::Value {
                name: (*name).into(),
                reason: format!("{raw:?} is not a URL: {e}"),
            })?;
            let base = url.origin().ascii_serialization();
            if !bases.contains(&base) {
                bases.push(base);
            }
            let _ = writeln!(paths, "{key} = {}", q(url.path()));
            if matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]")) {
                let hint = format!(
                    "{name} points at {}, an HAProxy front on this host: list the real Scout nodes in [scout] nodes instead, and staged fails over between them itself",
                    url.origin().ascii_serialization()
                );
                if !notes.iter().any(|n| n.contains("HAProxy front")) {
                    notes.push(hint);
                }
            }
        }
        if bases.len() > 1 {
            notes.push(format!(
                "the Scout URLs name {} different hosts; each became a node, and staged sends every kind of request to any of them",
                bases.len()
            ));
        }
        let nodes: Vec<String> = bases.iter().map(|b| q(b)).collect();
        let _ = writeln!(t, "\n[scout]\nnodes = [{}]", nodes.join(", "));
        if let Some(u) = get("SCOUT_API_USER") {
            note_placeholder("SCOUT_API_USER", &mut notes);
            let _ = writeln!(t, "username = {}", q(u));
        }
        if vars.contains_key("SCOUT_API_PASSWORD") {
            let _ = writeln!(t, "password = {{ env = \"STAGED_SCOUT_PASSWORD\" }}");
        }
        t.push_str(&paths);
    }

    // [kafka]
    if let Some(server) = get("KAFKA_SERVER") {
        let servers: Vec<String> = server.split(',').map(|s| q(s.trim())).collect();
        let _ = writeln!(t, "\n[kafka]\nbrokers = [{}]", servers.join(", "));
        if let Some(topic) = get("KAFKA_TOPIC") {
            note_placeholder("KAFKA_TOPIC", &mut notes);
            let _ = writeln!(t, "topic = {}", q(topic));
        }
        let _ = writeln!(
            t,
            "# The original's kafkad had no group of its own to carry over: one per deployment.\ngroup_id = \"staged\""
        );
        notes.push(
            "[kafka] group_id is \"staged\": give each deployment (dev, prod) its own".into(),
        );
        if get("KAFKA_USER").is_some() || vars.contains_key("KAFKA_PASSWORD") {
            t.push_str("security_protocol = \"SASL_SSL\"\nsasl_mechanism = \"SCRAM-SHA-512\"\n");
            if let Some(u) = get("KAFKA_USER") {
                note_placeholder("KAFKA_USER", &mut notes);
                let _ = writeln!(t, "username = {}", q(u));
            }
            if vars.contains_key("KAFKA_PASSWORD") {
                let _ = writeln!(t, "password = {{ env = \"STAGED_KAFKA_PASSWORD\" }}");
            }
        }
    }

    // [adapter]: the MWA lookups.
    if let Some(raw) = get("DATA_FILES_URL") {
        let url = Url::parse(raw).map_err(|e| ImportError::Value {
            name: "DATA_FILES_URL".into(),
            reason: format!("{raw:?} is not a URL: {e}"),
        })?;
        let host = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        let _ = writeln!(
            t,
            "\n[adapter]\nwasm = {}\nhttp_allow = [{}]\n\n[adapter.settings]\ndata_files_url = {}",
            q(MWA_ADAPTER),
            q(&host),
            q(raw)
        );
    }

    for (old, new) in SECRETS {
        if vars.contains_key(old) {
            set_env.push((new, old));
        }
    }
    let unknown = vars
        .keys()
        .filter(|k| !KNOWN.contains(&k.as_str()))
        .cloned()
        .collect();
    Ok(Imported {
        toml: t,
        set_env,
        notes,
        unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direnv_syntax() {
        let vars = parse(
            "# comment\n\nexport A=plain\nB='single # not a comment'\nexport C=\"dq \\\"x\\\"\" # trailing\nD=\nE=v # c\n",
        )
        .unwrap();
        assert_eq!(vars["A"], "plain");
        assert_eq!(vars["B"], "single # not a comment");
        assert_eq!(vars["C"], "dq \"x\"");
        assert_eq!(vars["D"], "");
        assert_eq!(vars["E"], "v");
        assert_eq!(
            parse("export P=<Insert secret here>\n").unwrap()["P"],
            "<Insert secret here>"
        );
        assert_eq!(
            parse("export A\n").unwrap_err(),
            ImportError::Syntax {
                line: 1,
                reason: "expected NAME=value".into()
            }
        );
        assert!(parse("A='open\n").is_err());
        assert!(parse("A=two words\n").is_err());
        assert!(parse("1A=x\n").is_err());
    }

    #[test]
    fn secrets_become_references_and_unknowns_are_listed() {
        let vars = parse(
            "export DBUSER=staging\nexport DBPASSWORD=hunter2\nexport DBHOST=db\nexport DBNAME=staging\nexport KAFKA_SERVER=k:9093\nexport KAFKA_PASSWORD=s3cret\nexport SURPRISE=1\n",
        )
        .unwrap();
        let out = import(&vars).unwrap();
        assert!(!out.toml.contains("hunter2") && !out.toml.contains("s3cret"));
        assert!(out.toml.contains("url = \"postgres://staging@db/staging\""));
        assert!(
            out.toml
                .contains("password = { env = \"STAGED_DB_PASSWORD\" }")
        );
        assert_eq!(
            out.set_env,
            [
                ("STAGED_DB_PASSWORD", "DBPASSWORD"),
                ("STAGED_KAFKA_PASSWORD", "KAFKA_PASSWORD")
            ]
        );
        assert_eq!(out.unknown, ["SURPRISE"]);
        // The full check, secrets set, is the process test of `import-env` + `check-config`.
        toml::from_str::<toml::Table>(&out.toml).expect("the import is TOML");
    }

    #[test]
    fn bad_numbers_and_urls_name_the_variable() {
        let vars = parse("JOB_EXPIRY_TIME=soon\n").unwrap();
        assert!(
            matches!(import(&vars), Err(ImportError::Value { name, .. }) if name == "JOB_EXPIRY_TIME")
        );
        let vars = parse("SCOUT_LOGIN_URL=not-a-url\n").unwrap();
        assert!(
            matches!(import(&vars), Err(ImportError::Value { name, .. }) if name == "SCOUT_LOGIN_URL")
        );
    }
}
