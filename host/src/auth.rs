//! Who may call what: the API's bearer tokens and the scopes they carry.
//!
//! Invariants this module keeps:
//! - A token's secret is held only as its SHA-256 digest. A presented token is hashed and
//!   compared with every configured digest in constant time, with no early exit, so the
//!   time an answer takes tells neither how close a guess was nor which token it matched.
//! - With no tokens configured, auth is off: every caller is anonymous and may do
//!   everything. With tokens, a caller has exactly the scopes its token lists (`admin` does
//!   not imply the others; it is what lets a token reload the adapter and delete any job).
//! - Token names are what logs and the store record; secrets never leave this module.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use anyhow::bail;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AuthConfig, ServerConfig, TokenConfig};

/// Shortest secret accepted: a token is a password that cannot be rate-limited at the
/// source, so it must not be guessable.
pub const MIN_SECRET_CHARS: usize = 16;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Submit jobs (`POST /staging/`).
    Submit,
    /// Read jobs, lists, statistics and file status.
    Read,
    /// Delete (cancel) jobs: its own, or any with `admin`.
    Cancel,
    /// Reload the adapter; delete any token's jobs.
    Admin,
    /// Scrape `/metrics`.
    Metrics,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Scope::Submit,
        Scope::Read,
        Scope::Cancel,
        Scope::Admin,
        Scope::Metrics,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Submit => "submit",
            Scope::Read => "read",
            Scope::Cancel => "cancel",
            Scope::Admin => "admin",
            Scope::Metrics => "metrics",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A submission rate: `rate` per second on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl Rate {
    /// The rate a token gets: its own, else `[server.auth]`'s; `None` when that is 0.
    fn for_token(auth: &AuthConfig, token: &TokenConfig) -> Option<Rate> {
        let per_second = token.submit_rate.unwrap_or(auth.submit_rate);
        if per_second <= 0.0 {
            return None;
        }
        let burst = match token.submit_burst.unwrap_or(auth.submit_burst) {
            0 => (per_second.ceil() as u32).max(1),
            b => b,
        };
        Some(Rate { per_second, burst })
    }
}

/// One configured token, as checked at load.
pub struct Token {
    pub name: Arc<str>,
    /// `None`: held only by a client certificate of this name.
    digest: Option<[u8; 32]>,
    scopes: BTreeSet<Scope>,
    pub rate: Option<Rate>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

impl Token {
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// The tokens in force. Replaced whole on reload.
#[derive(Debug, Default)]
pub struct TokenTable {
    tokens: Vec<Token>,
}

impl TokenTable {
    /// From a config already checked by [`check_config`].
    pub fn from_config(auth: &AuthConfig) -> TokenTable {
        TokenTable {
            tokens: auth
                .tokens
                .iter()
                .map(|t| Token {
                    name: Arc::from(t.name.as_str()),
                    digest: t.secret.as_ref().map(|s| digest(s.expose())),
                    scopes: t.scopes.iter().copied().collect(),
                    rate: Rate::for_token(auth, t),
                })
                .collect(),
        }
    }

    /// Whether any token is configured (auth is on).
    pub fn is_on(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The token whose secret this is. Every digest is compared, whatever matched.
    pub fn by_secret(&self, presented: &str) -> Option<&Token> {
        let d = digest(presented);
        let mut found = None;
        for t in &self.tokens {
            if let Some(td) = &t.digest
                && bool::from(td.ct_eq(&d))
            {
                found = Some(t);
            }
        }
        found
    }

    pub fn by_name(&self, name: &str) -> Option<&Token> {
        self.tokens.iter().find(|t| &*t.name == name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tokens.iter().map(|t| &*t.name)
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Why serving as configured would let anyone in, when it would: no tokens, and an address
/// other than loopback. The daemon refuses to start so unless `allow_unauthenticated`.
pub fn unauthenticated_exposure(server: &ServerConfig) -> Option<String> {
    if !server.auth.tokens.is_empty() || server.listen.ip().is_loopback() {
        return None;
    }
    Some(format!(
        "server.listen is {}, which is not a loopback address, and [server.auth] lists no tokens: \
         anyone who can reach the port could submit and delete jobs",
        server.listen
    ))
}

/// Checks `[server.auth]` beyond what its types say; `client_ca` is whether client
/// certificates are verified (`server.tls.client_ca`), the only way to hold a token with no
/// secret.
pub fn check_config(auth: &AuthConfig, client_ca: bool) -> anyhow::Result<()> {
    if !auth.submit_rate.is_finite() || auth.submit_rate < 0.0 {
        bail!("server.auth.submit_rate: must be 0 (no limit) or a positive number");
    }
    let mut names = BTreeSet::new();
    let mut digests = BTreeSet::new();
    for (i, t) in auth.tokens.iter().enumerate() {
        let key = format!("server.auth.tokens[{i}]");
        if t.name.is_empty()
            || t.name.len() > 64
            || !t
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            bail!(
                "{key}.name: {:?} must be 1 to 64 characters of letters, digits and - _ . @",
                t.name
            );
        }
        if !names.insert(t.name.as_str()) {
            bail!("{key}.name: {:?} is used by another token", t.name);
        }
        if t.scopes.is_empty() {
            bail!(
                "{key}.scopes: token {:?} has no scopes; give it some of submit, read, cancel, admin, metrics",
                t.name
            );
        }
        match &t.secret {
            None if !client_ca => bail!(
                "{key}.secret: token {:?} has no secret, and without server.tls.client_ca no client certificate can hold it",
                t.name
            ),
            None => {}
            Some(secret) => {
                let chars = secret.expose().chars().count();
                if chars < MIN_SECRET_CHARS {
                    bail!(
                        "{key}.secret: token {:?}'s secret has {chars} characters; at least {MIN_SECRET_CHARS} are needed (e.g. `openssl rand -hex 32`)",
                        t.name
                    );
                }
                if !digests.insert(digest(secret.expose())) {
                    bail!(
                        "{key}.secret: token {:?} has the same secret as another token",
                        t.name
                    );
                }
            }
        }
        if let Some(r) = t.submit_rate
            && (!r.is_finite() || r < 0.0)
        {
            bail!("{key}.submit_rate: must be 0 (no limit) or a positive number");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(toml: &str) -> TokenTable {
        TokenTable::from_config(&Config::parse(toml).unwrap().server.auth)
    }

    const TWO: &str = r#"
[[server.auth.tokens]]
name = "asvo"
secret = "0123456789abcdef-asvo"
scopes = ["submit", "read", "cancel"]
submit_rate = 5.0
[[server.auth.tokens]]
name = "ops"
secret = "0123456789abcdef-ops"
scopes = ["admin", "metrics"]
"#;

    #[test]
    fn a_secret_finds_its_token_and_nothing_else_does() {
        let t = table(TWO);
        assert!(t.is_on());
        let asvo = t.by_secret("0123456789abcdef-asvo").unwrap();
        assert_eq!(&*asvo.name, "asvo");
        assert!(asvo.has(Scope::Submit) && !asvo.has(Scope::Admin));
        assert_eq!(
            asvo.rate,
            Some(Rate {
                per_second: 5.0,
                burst: 5
            })
        );
        let ops = t.by_secret("0123456789abcdef-ops").unwrap();
        assert!(ops.has(Scope::Admin) && !ops.has(Scope::Read));
        assert_eq!(ops.rate, None);
        for wrong in ["", "0123456789abcdef-asv", "0123456789abcdef-asvo ", "asvo"] {
            assert!(t.by_secret(wrong).is_none(), "{wrong:?}");
        }
        assert!(!table("").is_on());
    }

    #[test]
    fn bad_tokens_are_config_errors_naming_the_key() {
        let cases = [
            (
                "[[server.auth.tokens]]\nname = \"a\"\nsecret = \"short\"\nscopes = [\"read\"]\n",
                "server.auth.tokens[0].secret",
            ),
            (
                "[[server.auth.tokens]]\nname = \"a b\"\nsecret = \"0123456789abcdefgh\"\nscopes = [\"read\"]\n",
                "server.auth.tokens[0].name",
            ),
            (
                "[[server.auth.tokens]]\nname = \"a\"\nsecret = \"0123456789abcdefgh\"\nscopes = []\n",
                "server.auth.tokens[0].scopes",
            ),
            (
                "[[server.auth.tokens]]\nname = \"a\"\nsecret = \"0123456789abcdefgh\"\nscopes = [\"write\"]\n",
                "scopes",
            ),
            (
                "[[server.auth.tokens]]\nname = \"a\"\nsecret = \"0123456789abcdefgh\"\nscopes = [\"read\"]\n\
                 [[server.auth.tokens]]\nname = \"a\"\nsecret = \"0123456789abcdefgi\"\nscopes = [\"read\"]\n",
                "server.auth.tokens[1].name",
            ),
            (
                "[[server.auth.tokens]]\nname = \"a\"\nsecret = \"0123456789abcdefgh\"\nscopes = [\"read\"]\n\
                 [[server.auth.tokens]]\nname = \"b\"\nsecret = \"0123456789abcdefgh\"\nscopes = [\"read\"]\n",
                "server.auth.tokens[1].secret",
            ),
            (
                "[server.auth]\nsubmit_rate = -1.0\n",
                "server.auth.submit_rate",
            ),
        ];
        for (toml, key) in cases {
            let err = format!("{:#}", Config::parse(toml).unwrap_err());
            assert!(err.contains(key), "{toml}\n=> {err}");
            assert!(!err.contains("0123456789abcdef"), "a secret in: {err}");
        }
    }

    #[test]
    fn debug_output_has_no_secret() {
        let t = table(TWO);
        let shown = format!("{t:?}");
        assert!(
            shown.contains("asvo") && !shown.contains("0123456789abcdef"),
            "{shown}"
        );
    }
}
