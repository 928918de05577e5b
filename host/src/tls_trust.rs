//! How an outbound HTTPS client checks the peer it talks to: Scout, callback destinations,
//! the adapter's HTTP.
//!
//! Invariant: every such client verifies the peer's certificate against the system's roots
//! plus the peer's own CA file when one is configured; only `insecure_skip_tls_verify`
//! turns that off, and that is logged as a warning whenever a client is built with it
//! (and listed by `staged check-config`). A CA file that does not read or holds no
//! certificate is a config error naming its key.

use std::path::{Path, PathBuf};

/// The checked trust settings of one peer.
#[derive(Clone)]
pub struct Trust {
    /// The config key the settings came from (`callbacks`, `scout`, `adapter`), for logs.
    peer: &'static str,
    ca: Vec<reqwest::Certificate>,
    ca_file: Option<PathBuf>,
    insecure: bool,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("peer", &self.peer)
            .field("ca_file", &self.ca_file)
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl Trust {
    /// Reads `<peer>.ca_file` (PEM, one or more certificates). The error names the key.
    pub fn from_config(
        peer: &'static str,
        ca_file: Option<&Path>,
        insecure: bool,
    ) -> Result<Trust, String> {
        if ca_file.is_some() && insecure {
            return Err(format!(
                "{peer}.ca_file and {peer}.insecure_skip_tls_verify exclude each other"
            ));
        }
        let ca = match ca_file {
            None => Vec::new(),
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("{peer}.ca_file: cannot read {}: {e}", path.display()))?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    format!(
                        "{peer}.ca_file: {} is not PEM certificates: {e}",
                        path.display()
                    )
                })?;
                if certs.is_empty() {
                    return Err(format!(
                        "{peer}.ca_file: {} holds no certificate",
                        path.display()
                    ));
                }
                certs
            }
        };
        Ok(Trust {
            peer,
            ca,
            ca_file: ca_file.map(Path::to_path_buf),
            insecure,
        })
    }

    /// The builder, set to check the peer as configured.
    pub fn apply(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        let mut builder = builder;
        if !self.ca.is_empty() {
            builder = builder.tls_certs_merge(self.ca.clone());
        }
        if self.insecure {
            tracing::warn!(
                peer = self.peer,
                "{}.insecure_skip_tls_verify is on: this peer's TLS certificate is NOT checked",
                self.peer
            );
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        builder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ca_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let missing = dir.path().join("missing.pem");
        for (file, insecure, want) in [
            (
                Some(missing.as_path()),
                false,
                "callbacks.ca_file: cannot read",
            ),
            (Some(junk.as_path()), false, "callbacks.ca_file"),
            (Some(junk.as_path()), true, "exclude each other"),
        ] {
            let err = Trust::from_config("callbacks", file, insecure).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        assert!(Trust::from_config("callbacks", None, false).is_ok());
    }
}
