//! The API's own TLS (`[server.tls]`): the certificate the server presents, the client
//! certificates it accepts, and reloading both while connections stay open.
//!
//! Invariants:
//! - Every handshake uses one whole configuration that loaded: a certificate chain with its
//!   matching key, and the client CAs when `client_ca` is set. A reload (SIGHUP, or a file
//!   whose modification time, length or inode changed) that fails in any part keeps the
//!   configuration in service whole, and logs at error the key and the file at fault. A
//!   reload touches no open connection: only handshakes that start after it see it.
//! - TLS 1.2 and 1.3 only, through rustls with aws-lc-rs (the provider reqwest and sqlx
//!   already use); no OpenSSL.
//! - ALPN offers `http/1.1` and nothing else. HTTP/2 is not offered because
//!   [`super::serve`] could not keep its bounds over it: hyper's HTTP/2 server has no
//!   header-read timer, its body and idle bounds are per connection while one HTTP/2
//!   connection multiplexes many requests (so a connection is never idle, and the connection
//!   cap no longer caps requests), and the JSON answers in place of hyper's own are found in
//!   HTTP/1.1 bytes.
//! - A [`PeerCertName`] in a request's extensions comes from a client certificate this
//!   handshake verified against `client_ca`; without `client_ca` none is asked for, so none
//!   is ever set.
//!
//! The handshake runs in [`super::serve`]'s connection task, where it holds a slot of the
//! connection cap and must finish within `header_timeout_secs`.
//!
//! Client certificates are checked against `client_ca` and their validity dates only: no
//! revocation list is read, so shutting out one holder means refusing its name where names
//! are authorised, or a new client CA.

mod peer_name;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;

pub use peer_name::PeerCertName;

use crate::config::TlsConfig;

const CERT: &str = "server.tls.cert";
const KEY: &str = "server.tls.key";
const CLIENT_CA: &str = "server.tls.client_ca";

/// Why a TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing, unreadable or not what its key needs.
    #[error("{key}: {}: {reason}", path.display())]
    File {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// rustls refused the protocol versions (not expected with its own provider).
    #[error("server.tls: {0}")]
    Setup(#[from] rustls::Error),
}

impl TlsError {
    fn file(key: &'static str, path: &Path, reason: impl Into<String>) -> TlsError {
        TlsError::File {
            key,
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// The TLS configuration in service, reloadable. Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    config: TlsConfig,
    current: ArcSwap<rustls::ServerConfig>,
    /// The files as they were at the last load or attempt. Held for the whole of a reload, so
    /// that two racing reloads cannot swap in the older files last; compared by the watch, so
    /// that a bad file is reported once rather than at every look.
    seen: Mutex<Vec<Stamp>>,
}

/// What the watch compares: a file's modification time, length and inode (a file replaced
/// by a rename, as `cp -p` or a mounted secret does, may keep its time). `None`: not there.
type Stamp = Option<(Option<SystemTime>, u64, u64)>;

impl Tls {
    /// Reads and checks the files. Errors name the key and the file.
    pub fn from_config(config: &TlsConfig) -> Result<Tls, TlsError> {
        let seen = stamps(config);
        let loaded = load(config)?;
        tracing::info!(
            cert = %config.cert.display(),
            serial = %loaded.serial,
            client_ca = ?config.client_ca.as_ref().map(|p| p.display().to_string()),
            client_cert_required = config.client_cert_required,
            "TLS certificate loaded"
        );
        Ok(Tls {
            inner: Arc::new(Inner {
                config: config.clone(),
                current: ArcSwap::from_pointee(loaded.server),
                seen: Mutex::new(seen),
            }),
        })
    }

    /// Reads the files again and puts them in service for new handshakes; if any is bad, the
    /// configuration in service stays and the error is logged (and returned).
    pub fn reload(&self) -> Result<(), TlsError> {
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        // Taken before reading: a file written meanwhile differs at the next look.
        *seen = stamps(&self.inner.config);
        match load(&self.inner.config) {
            Ok(loaded) => {
                self.inner.current.store(Arc::new(loaded.server));
                tracing::info!(
                    cert = %self.inner.config.cert.display(),
                    serial = %loaded.serial,
                    "TLS certificate reloaded"
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS reload failed; the certificate in service stays");
                Err(e)
            }
        }
    }

    /// Reloads whenever a file changes, looking every `watch_interval_secs` (none when 0),
    /// until the task is aborted.
    pub(crate) fn watch(&self) -> Option<JoinHandle<()>> {
        let every = Duration::from_secs(self.inner.config.watch_interval_secs);
        if every.is_zero() {
            return None;
        }
        let tls = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = stamps(&tls.inner.config);
                let changed = *tls.inner.seen.lock().unwrap_or_else(|p| p.into_inner()) != now;
                if changed {
                    tracing::info!("a TLS file changed; reloading");
                    let _ = tls.reload();
                }
            }
        }))
    }

    /// The server side of a handshake on `stream`, with the configuration in service now,
    /// and the name of the client's verified certificate, if it presented one.
    pub(crate) async fn accept(
        &self,
        stream: TcpStream,
    ) -> io::Result<(TlsStream<TcpStream>, Option<PeerCertName>)> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.inner.current.load_full());
        let stream = acceptor.accept(stream).await?;
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| {
                let name = PeerCertName::of_certificate(cert);
                if name.is_none() {
                    tracing::debug!(
                        "a verified client certificate has neither a CN nor a DNS name"
                    );
                }
                name
            });
        Ok((stream, peer))
    }
}

/// A configuration that loaded, and its certificate's serial number for the logs.
struct Loaded {
    server: rustls::ServerConfig,
    serial: String,
}

fn load(c: &TlsConfig) -> Result<Loaded, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = read_certs(CERT, &c.cert)?;
    // Parsed here so that a corrupt certificate fails now, naming its file, rather than at
    // a handshake.
    let serial = webpki::EndEntityCert::try_from(&chain[0])
        .map(|ee| hex(ee.serial()))
        .map_err(|e| TlsError::file(CERT, &c.cert, format!("the first certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_file(&c.key)
        .map_err(|e| TlsError::file(KEY, &c.key, pem_reason(e, "PRIVATE KEY")))?;
    let versions = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &c.client_ca {
        None => versions.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(CLIENT_CA, path)? {
                roots.add(cert).map_err(|e| {
                    TlsError::file(CLIENT_CA, path, format!("not a usable CA certificate: {e}"))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match c.client_cert_required {
                true => verifier,
                false => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::file(CLIENT_CA, path, e.to_string()))?;
            versions.with_client_cert_verifier(verifier)
        }
    };
    // rustls checks that the key is the certificate's.
    let mut server = builder.with_single_cert(chain, key).map_err(|e| {
        TlsError::file(
            KEY,
            &c.key,
            format!(
                "not usable with the certificate in {}: {e}",
                c.cert.display()
            ),
        )
    })?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Loaded { server, serial })
}

/// Every certificate in the PEM file at `path`; none is an error.
fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::file(key, path, pem_reason(e, "CERTIFICATE")))?;
    if certs.is_empty() {
        return Err(TlsError::file(key, path, "holds no CERTIFICATE block"));
    }
    Ok(certs)
}

fn pem_reason(e: pem::Error, wanted: &str) -> String {
    match e {
        pem::Error::NoItemsFound => format!("holds no {wanted} block"),
        pem::Error::Io(e) => format!("cannot read: {e}"),
        other => format!("not valid PEM: {other}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn stamps(c: &TlsConfig) -> Vec<Stamp> {
    [Some(&c.cert), Some(&c.key), c.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|path| {
            let m = std::fs::metadata(path).ok()?;
            #[cfg(unix)]
            let inode = std::os::unix::fs::MetadataExt::ino(&m);
            #[cfg(not(unix))]
            let inode = 0;
            Some((m.modified().ok(), m.len(), inode))
        })
        .collect()
}
