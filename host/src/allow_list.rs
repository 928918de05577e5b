//! Where an adapter's HTTP GETs may go.
//!
//! Invariant: a URL is fetched only if some entry of `adapter.http_allow` matches it, and
//! an empty list matches nothing (deny all). Entries are parsed once, when the
//! configuration is deserialized (an [`AllowList`] is the config's own type for the key,
//! so a malformed entry is a configuration error naming `adapter.http_allow`, never a
//! silent "allow"); the adapter runtime clones the parsed list.
//!
//! This module is a leaf: it imports neither `config` nor `adapter`, so both can use it.
//!
//! | entry form | matches |
//! |---|---|
//! | `host.example.org` | that host, http or https, any port, any path |
//! | `host.example.org:8080` | that host and port, http or https, any path |
//! | `*.example.org` | any host strictly under `example.org` (not `example.org` itself), any port |
//! | `127.0.0.1`, `[::1]:9000` | an IP address (with or without a port), as written in the URL |
//! | `https://host.example.org/api/` | that scheme, host and port (the scheme's default if none), and paths starting with `/api/` |
//!
//! Hosts are compared case-insensitively; the URL's userinfo must be empty (credentials
//! belong in settings the adapter sends, not smuggled past this list); only http and https
//! are ever fetched. Redirects are not followed, so an allowed host cannot bounce a request
//! elsewhere.

use std::fmt;

use serde::{Deserialize, Serialize};
use url::Url;

/// A parsed allow-list. It reads and writes as the list of entries it was parsed from, so a
/// configuration shown back (`check-config`) reads as it was written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct AllowList {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
enum Host {
    Exact(String),
    /// `*.suffix`: strictly below `suffix`, stored with its leading dot.
    Subdomains(String),
}

#[derive(Debug, Clone)]
struct Entry {
    scheme: Option<String>,
    host: Host,
    port: Option<u16>,
    path_prefix: Option<String>,
    source: String,
}

/// Why an allow-list entry was refused.
#[derive(Debug, thiserror::Error)]
#[error("allow-list entry {entry:?}: {reason}")]
pub struct AllowListError {
    entry: String,
    reason: String,
}

fn bad(entry: &str, reason: impl Into<String>) -> AllowListError {
    AllowListError {
        entry: entry.to_string(),
        reason: reason.into(),
    }
}

impl AllowList {
    /// Parses every entry; the first malformed one is an error.
    pub fn parse(entries: &[String]) -> Result<AllowList, AllowListError> {
        let entries = entries
            .iter()
            .map(|e| Entry::parse(e))
            .collect::<Result<_, _>>()?;
        Ok(AllowList { entries })
    }

    /// Whether nothing at all is allowed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `url` may be fetched.
    pub fn allows(&self, url: &Url) -> bool {
        if !matches!(url.scheme(), "http" | "https")
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return false;
        }
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        self.entries.iter().any(|e| e.matches(url, &host))
    }
}

impl Entry {
    fn parse(raw: &str) -> Result<Entry, AllowListError> {
        let text = raw.trim();
        if text.is_empty() {
            return Err(bad(raw, "is empty"));
        }
        if text.contains("://") {
            let url = Url::parse(text).map_err(|e| bad(raw, format!("not a URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(bad(raw, "only http and https URLs can be allowed"));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(bad(raw, "must not hold credentials"));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(bad(raw, "must not have a query or fragment"));
            }
            let host = url
                .host_str()
                .filter(|h| !h.is_empty())
                .ok_or_else(|| bad(raw, "has no host"))?;
            return Ok(Entry {
                scheme: Some(url.scheme().to_string()),
                host: Host::Exact(host.to_ascii_lowercase()),
                port: url.port_or_known_default(),
                path_prefix: Some(url.path().to_string()),
                source: raw.to_string(),
            });
        }
        if text.contains(['/', '?', '#', '@']) {
            return Err(bad(
                raw,
                "a bare host must not have a path, query or credentials; write a URL for a path",
            ));
        }
        let (wild, rest) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        if rest.contains('*') {
            return Err(bad(raw, "a wildcard is only allowed as a leading `*.`"));
        }
        // Let the URL parser validate the host and port, as it will for requests.
        let url = Url::parse(&format!("http://{rest}/"))
            .map_err(|e| bad(raw, format!("not a host[:port]: {e}")))?;
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad(raw, "has no host"))?
            .to_ascii_lowercase();
        // `url.port()` drops an explicit :80 as the default; take it from the text instead.
        let port = explicit_port(rest).map_err(|e| bad(raw, e))?;
        Ok(Entry {
            scheme: None,
            host: if wild {
                Host::Subdomains(format!(".{host}"))
            } else {
                Host::Exact(host)
            },
            port,
            path_prefix: None,
            source: raw.to_string(),
        })
    }

    fn matches(&self, url: &Url, host: &str) -> bool {
        if let Some(scheme) = &self.scheme
            && scheme != url.scheme()
        {
            return false;
        }
        let host_ok = match &self.host {
            Host::Exact(h) => h == host,
            Host::Subdomains(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        };
        if !host_ok {
            return false;
        }
        if let Some(port) = self.port
            && url.port_or_known_default() != Some(port)
        {
            return false;
        }
        match &self.path_prefix {
            Some(prefix) => url.path().starts_with(prefix.as_str()),
            None => true,
        }
    }
}

fn explicit_port(host_port: &str) -> Result<Option<u16>, String> {
    let port = match host_port.strip_prefix('[') {
        Some(v6) => v6
            .split_once(']')
            .and_then(|(_, rest)| rest.strip_prefix(':')),
        None => host_port.rsplit_once(':').map(|(_, p)| p),
    };
    port.map(|p| p.parse().map_err(|_| format!("bad port {p:?}")))
        .transpose()
}

impl TryFrom<Vec<String>> for AllowList {
    type Error = AllowListError;

    fn try_from(entries: Vec<String>) -> Result<Self, AllowListError> {
        AllowList::parse(&entries)
    }
}

impl From<AllowList> for Vec<String> {
    fn from(list: AllowList) -> Vec<String> {
        list.entries.into_iter().map(|e| e.source).collect()
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.entries.is_empty() {
            return f.write_str("(empty: no HTTP allowed)");
        }
        let list: Vec<&str> = self.entries.iter().map(|e| e.source.as_str()).collect();
        f.write_str(&list.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn ok(l: &AllowList, url: &str) -> bool {
        l.allows(&Url::parse(url).unwrap())
    }

    #[test]
    fn empty_denies_all() {
        let l = list(&[]);
        assert!(l.is_empty());
        assert!(!ok(&l, "http://127.0.0.1/"));
    }

    #[test]
    fn bare_hosts_ports_and_wildcards() {
        let l = list(&[
            "ws.mwatelescope.org",
            "127.0.0.1:8080",
            "*.example.org",
            "[::1]:80",
        ]);
        assert!(ok(
            &l,
            "http://ws.mwatelescope.org/metadata/data_files?obs_id=1"
        ));
        assert!(ok(&l, "https://WS.mwatelescope.org:444/x"));
        assert!(ok(&l, "http://127.0.0.1:8080/x"));
        assert!(!ok(&l, "http://127.0.0.1:8081/x"));
        assert!(!ok(&l, "http://127.0.0.1/x"));
        assert!(ok(&l, "https://a.b.example.org/"));
        assert!(!ok(&l, "https://example.org/"));
        assert!(!ok(&l, "https://badexample.org/"));
        assert!(ok(&l, "http://[::1]/"));
        assert!(!ok(&l, "http://user:pw@ws.mwatelescope.org/"));
        assert!(!ok(&l, "ftp://ws.mwatelescope.org/"));
        assert!(!ok(&l, "file:///etc/passwd"));
    }

    #[test]
    fn url_entries_pin_scheme_port_and_path() {
        let l = list(&["https://meta.example.org/api/"]);
        assert!(ok(&l, "https://meta.example.org/api/data_files?x=1"));
        assert!(ok(&l, "https://meta.example.org:443/api/x"));
        assert!(!ok(&l, "http://meta.example.org/api/x"));
        assert!(!ok(&l, "https://meta.example.org:8443/api/x"));
        assert!(!ok(&l, "https://meta.example.org/other"));
    }

    #[test]
    fn malformed_entries_are_refused_with_the_entry() {
        for bad in [
            "",
            "*",
            "a*.b",
            "host/path",
            "user@host",
            "ftp://x/",
            "h:99999",
            "http://u:p@h/",
        ] {
            let err = AllowList::parse(&[bad.to_string()]).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}
