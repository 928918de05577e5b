//! Paths between the Tape REST client's namespace and the tape system's.
//!
//! A client names a file by its URL's path (`/mwa/123/f.fits`); the store, the stager and
//! the recall messages use the tape system's path, `add_prefix` + the client's path less
//! `strip_prefix` (`mwa/123/f.fits` by default).
//!
//! Invariants:
//! - Mapping is one to one and reversible: [`Mapping::to_client`] of [`Mapping::to_store`]
//!   gives the sanitised client path back, so a poll answers with the paths the client
//!   sent (less duplicate slashes, which the specification says to collapse).
//! - A path that cannot be staged (outside `strip_prefix`, with a `.` or `..` segment, a
//!   directory, a control character, too long) is still stored, failed with the reason,
//!   in a form that never starts a tape path: it begins with `/`, which mapped paths
//!   never do (config checks `add_prefix`), so it can neither match a recall message nor
//!   be confused with a mapped path.

use crate::config::TapeRestConfig;

#[derive(Debug, Clone)]
pub struct Mapping {
    strip: String,
    add: String,
    max_bytes: usize,
}

/// A client path, sanitised, and what it is in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The client's path with duplicate slashes collapsed (what a poll answers with).
    pub client: String,
    /// The store's path: the tape system's, or the client path itself when it failed.
    pub stored: String,
    /// Why the file cannot be staged, if it cannot.
    pub refused: Option<String>,
}

impl Mapping {
    pub fn new(cfg: &TapeRestConfig, max_bytes: usize) -> Mapping {
        Mapping {
            strip: cfg.strip_prefix.clone(),
            add: cfg.add_prefix.clone(),
            max_bytes,
        }
    }

    /// Sanitises and maps one client path.
    pub fn to_store(&self, raw: &str) -> Mapped {
        let client = collapse(raw);
        let refuse = |why: String| Mapped {
            client: client.clone(),
            stored: client.clone(),
            refused: Some(why),
        };
        if client.len() > self.max_bytes {
            return refuse(format!(
                "the path is longer than the limit of {} bytes",
                self.max_bytes
            ));
        }
        if client.chars().any(char::is_control) {
            return refuse("the path contains a control character".into());
        }
        if client == "/" || client.ends_with('/') {
            return refuse("a directory cannot be staged".into());
        }
        if client.split('/').any(|s| s == "." || s == "..") {
            return refuse("the path has a '.' or '..' segment".into());
        }
        let Some(rest) = client.strip_prefix(self.strip.as_str()) else {
            return refuse(format!(
                "the path is outside this endpoint's namespace ({}*)",
                self.strip
            ));
        };
        Mapped {
            stored: format!("{}{rest}", self.add),
            client,
            refused: None,
        }
    }

    /// The client's path for a stored one.
    pub fn to_client(&self, stored: &str) -> String {
        if stored.starts_with('/') {
            // Stored as the client sent it: it failed at submission.
            return stored.to_string();
        }
        let rest = stored.strip_prefix(self.add.as_str()).unwrap_or(stored);
        format!("{}{rest}", self.strip)
    }
}

/// `raw` with duplicate slashes collapsed and a leading `/` (a URL's path has one).
fn collapse(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 1);
    if !raw.starts_with('/') {
        out.push('/');
    }
    for c in raw.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(strip: &str, add: &str) -> Mapping {
        let cfg = TapeRestConfig {
            strip_prefix: strip.into(),
            add_prefix: add.into(),
            ..TapeRestConfig::default()
        };
        Mapping::new(&cfg, 64)
    }

    #[test]
    fn the_default_makes_a_url_path_relative() {
        let m = mapping("/", "");
        let p = m.to_store("//mwa///123/f.fits");
        assert_eq!(p.client, "/mwa/123/f.fits");
        assert_eq!(p.stored, "mwa/123/f.fits");
        assert_eq!(p.refused, None);
        assert_eq!(m.to_client(&p.stored), p.client);
    }

    #[test]
    fn prefixes_are_swapped_and_reversed() {
        let m = mapping("/eos/mwa/", "mwa/");
        let p = m.to_store("/eos/mwa/123/f.fits");
        assert_eq!(p.stored, "mwa/123/f.fits");
        assert_eq!(m.to_client(&p.stored), "/eos/mwa/123/f.fits");
        let outside = m.to_store("/eos/other/f.fits");
        assert!(outside.refused.unwrap().contains("outside"));
        assert_eq!(m.to_client(&outside.stored), "/eos/other/f.fits");
    }

    #[test]
    fn unstageable_paths_are_refused_with_a_reason() {
        let m = mapping("/", "");
        for (raw, why) in [
            ("/a/../b", "segment"),
            ("/a/./b", "segment"),
            ("/a/b/", "directory"),
            ("/", "directory"),
            ("/a\nb", "control"),
            (&"/x".repeat(40), "longer"),
        ] {
            let p = m.to_store(raw);
            let reason = p.refused.unwrap_or_default();
            assert!(reason.contains(why), "{raw:?}: {reason:?}");
            // Stored as the client path: never a tape path.
            assert!(p.stored.starts_with('/'));
        }
    }
}
