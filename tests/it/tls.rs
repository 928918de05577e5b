//! The API's own TLS (`[server.tls]`), on loopback with certificates made here by rcgen: HTTPS
//! through the daemon, clients that do not speak TLS or never finish a handshake, the
//! certificate reloaded (file watch, `reload()`, SIGHUP to the real binary) while an old
//! connection finishes its request, client certificates and the name they give a request,
//! and bad files at start and in `check-config`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::get;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use staged::api::serve::{Bounds, serve};
use staged::api::tls::{PeerCertName, Tls};
use staged::config::{ServerConfig, TlsConfig};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};
use tokio_rustls::client::TlsStream;

use crate::common::certs::{Ca, Issued};
use crate::common::daemon::{self, Daemon, free_port, toml_str, write_plain_config};
use crate::common::{Kind, TestApp, capture_logs, poll_until, wait_for};

/// Long enough for anything that must happen on a loaded CI machine; never a timing claim.
const LIMIT: Duration = Duration::from_secs(20);

/// The PEM files `[server.tls]` names, in a directory of the test's own.
struct Files {
    dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

impl Files {
    fn new(server: &Issued) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let files = Files {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            client_ca: dir.path().join("client-ca.pem"),
            dir,
        };
        files.write(server);
        files
    }

    /// Overwrites the certificate and the key in place, as an operator renewing them would.
    fn write(&self, server: &Issued) {
        std::fs::write(&self.cert, &server.cert).unwrap();
        std::fs::write(&self.key, &server.key).unwrap();
    }

    fn config(&self) -> TlsConfig {
        TlsConfig {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ..TlsConfig::default()
        }
    }
}

/// A rustls client trusting `ca` only, presenting `identity` if given.
fn client_config(ca: &str, identity: Option<&Issued>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(id.cert.as_bytes()).unwrap()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(id.key.as_bytes()).unwrap(),
            )
            .unwrap(),
    }
}

async fn tls_connect(addr: SocketAddr, ca: &str) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca, None)));
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The serial number of the certificate the server presented on `stream`.
fn serial_of(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate");
    webpki::EndEntityCert::try_from(&chain[0])
        .unwrap()
        .serial()
        .to_vec()
}

/// The serial a new connection sees now.
async fn serial_now(addr: SocketAddr, ca: &str) -> Vec<u8> {
    serial_of(&tls_connect(addr, ca).await.expect("TLS handshake"))
}

/// An HTTPS client trusting `ca` only, presenting `identity` if given.
fn https_client(ca: &str, identity: Option<&Issued>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes()).unwrap()])
        .timeout(LIMIT);
    if let Some(id) = identity {
        let pem = format!("{}{}", id.cert, id.key);
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// The server's own loop (`api::serve::serve`) around a router of the test's, over `tls`.
struct Served {
    addr: SocketAddr,
    tls: Tls,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    async fn start(
        router: Router,
        tls: &TlsConfig,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Served {
        capture_logs();
        let mut server = ServerConfig::default();
        tweak(&mut server);
        let tls = Tls::from_config(tls).expect("the TLS files load");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            router,
            Bounds::from_config(&server),
            Some(tls.clone()),
            async {
                let _ = stopped.await;
            },
        ));
        Served {
            addr,
            tls,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

/// Answers with the name of the client's certificate, or "none".
async fn whoami(req: Request<Body>) -> String {
    match req.extensions().get::<PeerCertName>() {
        Some(PeerCertName(name)) => name.clone(),
        None => "none".into(),
    }
}

/// Starts the daemon in-process with `[server.tls]` from `files`.
async fn tls_app(files: &Files, tweak: impl FnOnce(&mut staged::config::Config)) -> TestApp {
    let tls = files.config();
    TestApp::start_with(Kind::Sqlite, |c| {
        c.server.tls = Some(tls);
        tweak(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_ping_through_the_daemon() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server(1));
    let app = tls_app(&files, |_| {}).await;
    let addr = app.server.as_ref().unwrap().addr;
    let http = https_client(&ca.pem(), None);
    let r = http
        .get(format!("https://{addr}/ping/"))
        .send()
        .await
        .expect("GET /ping/ over TLS");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "null");
    // Only http/1.1 is offered.
    let stream = tls_connect(addr, &ca.pem()).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut alpn = client_config(&ca.pem(), None);
    alpn.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let stream = tokio_rustls::TlsConnector::from(Arc::new(alpn))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // TLS 1.2 is spoken too (1.3 is what rustls clients pick first).
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let tls12 = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls12))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("a TLS 1.2 handshake");
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    // A client that does not trust the certificate's CA does not get in.
    let other = https_client(&Ca::new("another CA").pem(), None);
    assert!(
        other
            .get(format!("https://{addr}/ping/"))
            .send()
            .await
            .is_err()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_the_tls_port_is_closed_cleanly() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server(1));
    // Two slots: a refused client that kept its slot would soon leave none.
    let app = tls_app(&files, |c| c.server.max_connections = 2).await;
    let addr = app.server.as_ref().unwrap().addr;
    for _ in 0..5 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /ping/ HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(LIMIT, tcp.read_to_end(&mut got))
            .await
            .expect("the daemon closes the connection");
        // Closed (perhaps after a TLS alert, perhaps with a reset), never an HTTP answer.
        assert!(!got.starts_with(b"HTTP/"), "{read:?}: {got:?}");
    }
    let plain = reqwest::Client::builder().timeout(LIMIT).build().unwrap();
    assert!(
        plain
            .get(format!("http://{addr}/ping/"))
            .send()
            .await
            .is_err()
    );
    let http = https_client(&ca.pem(), None);
    for _ in 0..3 {
        let r = http
            .get(format!("https://{addr}/ping/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_says_hello_is_bounded() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server(1));
    let app = tls_app(&files, |c| c.server.header_timeout_secs = 1).await;
    let addr = app.server.as_ref().unwrap().addr;
    // Closed by the header timeout.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(LIMIT, silent.read(&mut buf))
        .await
        .expect("the daemon closes a silent connection");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    app.stop().await;

    // Counted against the cap: with one slot, a connection that never starts its handshake
    // holds it, well within its header timeout, until a new client needs it, and is closed
    // to let that one in.
    let app = tls_app(&files, |c| {
        c.server.max_connections = 1;
        c.server.header_timeout_secs = 60;
    })
    .await;
    let addr = app.server.as_ref().unwrap().addr;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), silent.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "closed before anyone needed its slot: {early:?}"
    );
    let http = https_client(&ca.pem(), None);
    let r = http
        .get(format!("https://{addr}/ping/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let n = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut buf))
        .await
        .expect("the silent connection was closed to make room, long before its timeout");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    app.stop().await;
}

/// A router whose `/slow` holds its answer until `release` is notified, telling `entered`
/// when a request is in hand.
fn slow_router(entered: Arc<Notify>, release: Arc<Notify>) -> Router {
    Router::new().route(
        "/slow",
        get(move || {
            let (entered, release) = (entered.clone(), release.clone());
            async move {
                entered.notify_one();
                release.notified().await;
                "finished"
            }
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_served_to_new_connections_while_old_ones_finish() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server(1));
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let tls = TlsConfig {
        watch_interval_secs: 1,
        ..files.config()
    };
    let served = Served::start(slow_router(entered.clone(), release.clone()), &tls, |_| {}).await;
    assert_eq!(serial_now(served.addr, &ca.pem()).await, [1]);

    // A request in flight on a connection made with the first certificate.
    let mut old = tls_connect(served.addr, &ca.pem()).await.unwrap();
    old.write_all(b"GET /slow HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, entered.notified())
        .await
        .expect("the slow request reaches its handler");

    files.write(&ca.server(2));
    wait_for(
        "new connections to see the new certificate",
        LIMIT,
        async || serial_now(served.addr, &ca.pem()).await == [2],
    )
    .await;

    // A bad file keeps the certificate in service.
    std::fs::write(&files.cert, "not a certificate\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(serial_now(served.addr, &ca.pem()).await, [2]);
    let err = served.tls.reload().unwrap_err().to_string();
    assert!(
        err.contains("server.tls.cert") && err.contains(&files.cert.display().to_string()),
        "{err}"
    );

    release.notify_one();
    let mut answer = String::new();
    tokio::time::timeout(LIMIT, old.read_to_string(&mut answer))
        .await
        .expect("the old connection's answer")
        .ok();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with("finished"), "{answer:?}");
    assert_eq!(serial_of(&old), [1]);
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_certificate() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server(1));
    // No watch: only `reload()` loads the new files.
    let tls = TlsConfig {
        watch_interval_secs: 0,
        ..files.config()
    };
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let served = Served::start(slow_router(entered.clone(), release.clone()), &tls, |_| {}).await;
    let mut old = tls_connect(served.addr, &ca.pem()).await.unwrap();
    old.write_all(b"GET /slow HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, entered.notified())
        .await
        .expect("the slow request reaches its handler");

    files.write(&ca.server(2));
    assert_eq!(
        serial_now(served.addr, &ca.pem()).await,
        [1],
        "no reload yet"
    );
    served.tls.reload().expect("the new files load");
    assert_eq!(serial_now(served.addr, &ca.pem()).await, [2]);

    // A key that is not the certificate's is refused as a whole.
    let other = ca.server(3);
    std::fs::write(&files.cert, &other.cert).unwrap();
    let err = served.tls.reload().unwrap_err().to_string();
    assert!(err.contains("server.tls.key"), "{err}");
    assert_eq!(serial_now(served.addr, &ca.pem()).await, [2]);

    release.notify_one();
    let mut answer = String::new();
    let _ = tokio::time::timeout(LIMIT, old.read_to_string(&mut answer)).await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("finished"),
        "{answer:?}"
    );
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_verified_and_named() {
    let ca = Ca::new("test CA");
    let clients = Ca::new("client CA");
    let stranger = Ca::new("another CA");
    let files = Files::new(&ca.server(1));
    std::fs::write(&files.client_ca, clients.pem()).unwrap();
    let router = || Router::new().route("/whoami", get(whoami));
    let url = |s: &Served| format!("https://{}/whoami", s.addr);
    let asvo = clients.client("asvo");
    let impostor = stranger.client("asvo");

    // Required: only a certificate the client CA signed gets in, and names the request.
    let required = TlsConfig {
        client_ca: Some(files.client_ca.clone()),
        client_cert_required: true,
        ..files.config()
    };
    let served = Served::start(router(), &required, |_| {}).await;
    let r = https_client(&ca.pem(), Some(&asvo))
        .get(url(&served))
        .send()
        .await
        .expect("a client with a certificate of the client CA");
    assert_eq!(r.text().await.unwrap(), "asvo");
    for (who, client) in [
        ("no certificate", https_client(&ca.pem(), None)),
        (
            "another CA's certificate",
            https_client(&ca.pem(), Some(&impostor)),
        ),
    ] {
        let r = client.get(url(&served)).send().await;
        assert!(r.is_err(), "{who}: {r:?}");
    }
    served.stop().await;

    // Optional: a client may come without one (and use a token), but not with a bad one.
    let optional = TlsConfig {
        client_cert_required: false,
        ..required
    };
    let served = Served::start(router(), &optional, |_| {}).await;
    let r = https_client(&ca.pem(), None)
        .get(url(&served))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "none");
    let asvo_client = https_client(&ca.pem(), Some(&asvo));
    for _ in 0..2 {
        // The second request reuses the connection and still carries the name.
        let r = asvo_client.get(url(&served)).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "asvo");
    }
    let r = https_client(&ca.pem(), Some(&impostor))
        .get(url(&served))
        .send()
        .await;
    assert!(r.is_err(), "another CA's certificate: {r:?}");
    served.stop().await;

    // Without client_ca no certificate is asked for, so none names a request.
    let served = Served::start(router(), &files.config(), |_| {}).await;
    let r = https_client(&ca.pem(), Some(&asvo))
        .get(url(&served))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "none");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_name_the_key_and_the_file() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server(1));
    let missing = files.dir.path().join("missing.pem");
    let garbage = files.dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let other_key = files.dir.path().join("other-key.pem");
    std::fs::write(&other_key, ca.server(2).key).unwrap();
    let cases = [
        (
            "server.tls.cert",
            &missing,
            TlsConfig {
                cert: missing.clone(),
                ..files.config()
            },
        ),
        (
            "server.tls.cert",
            &garbage,
            TlsConfig {
                cert: garbage.clone(),
                ..files.config()
            },
        ),
        // A certificate where the key should be: no PRIVATE KEY block.
        (
            "server.tls.key",
            &files.cert,
            TlsConfig {
                key: files.cert.clone(),
                ..files.config()
            },
        ),
        (
            "server.tls.key",
            &other_key,
            TlsConfig {
                key: other_key.clone(),
                ..files.config()
            },
        ),
        (
            "server.tls.client_ca",
            &missing,
            TlsConfig {
                client_ca: Some(missing.clone()),
                ..files.config()
            },
        ),
        (
            "server.tls.client_ca",
            &files.key,
            TlsConfig {
                client_ca: Some(files.key.clone()),
                ..files.config()
            },
        ),
    ];
    for (key, file, config) in &cases {
        let err = match Tls::from_config(config) {
            Ok(_) => panic!("{key} = {} loaded", file.display()),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(key) && err.contains(&file.display().to_string()),
            "{key}: {err}"
        );
    }

    // The daemon does not start on one, and check-config reports it.
    let (_, file, config) = &cases[3];
    let db = tempfile::tempdir().unwrap();
    let mut c = staged::config::Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.database.url = format!("sqlite://{}", db.path().join("staged.db").display());
    c.server.tls = Some(config.clone());
    let err = match staged::app::start(&c).await {
        Ok(_) => panic!("the daemon started with a key that is not the certificate's"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("server.tls.key") && err.contains(&file.display().to_string()),
        "{err}"
    );

    let path = config_file(db.path(), "sqlite://x.db", free_port(), config);
    let out = Command::new(daemon::BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check-config passed: {stderr}");
    assert!(
        stderr.contains("server.tls.key") && stderr.contains(&file.display().to_string()),
        "{stderr}"
    );
    let good = config_file(db.path(), "sqlite://x.db", free_port(), &files.config());
    let out = Command::new(daemon::BIN)
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("[server.tls]"));
}

/// A plain daemon config (see `write_plain_config`) with a `[server.tls]` section.
fn config_file(dir: &Path, db_url: &str, port: u16, tls: &TlsConfig) -> PathBuf {
    let path = write_plain_config(dir, db_url, port);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "\n[server.tls]\ncert = {}\nkey = {}\nwatch_interval_secs = {}\n",
        toml_str(&tls.cert.display().to_string()),
        toml_str(&tls.key.display().to_string()),
        tls.watch_interval_secs,
    ));
    if let Some(ca) = &tls.client_ca {
        text.push_str(&format!(
            "client_ca = {}\n",
            toml_str(&ca.display().to_string())
        ));
    }
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_of_the_real_binary() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server(1));
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("staged.db").display());
    let port = free_port();
    // No watch: only the signal reloads.
    let tls = TlsConfig {
        watch_interval_secs: 0,
        ..files.config()
    };
    let config = config_file(dir.path(), &db, port, &tls);
    let log = config.with_extension("log");
    let child = Command::new(daemon::BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let d = Daemon {
        child,
        base: format!("https://127.0.0.1:{port}"),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        log,
    };
    let http = https_client(&ca.pem(), None);
    let ping = format!("{}/ping/", d.base);
    d.wait_for(
        "the daemon to answer over TLS",
        Duration::from_secs(60),
        async || matches!(http.get(&ping).send().await, Ok(r) if r.status() == 200),
    )
    .await;
    assert_eq!(serial_now(d.addr, &ca.pem()).await, [1]);
    files.write(&ca.server(2));
    d.signal(libc::SIGHUP);
    let seen = poll_until(LIMIT, async || serial_now(d.addr, &ca.pem()).await == [2]).await;
    assert!(
        seen,
        "SIGHUP did not reload the certificate; log:\n{}",
        d.log_text()
    );
    let r = http.get(&ping).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// A client certificate holds the API token of its name: with `client_ca` set, a token
/// with no secret is reached only by a certificate named for it; a bearer token, when sent,
/// is what counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_holds_the_token_of_its_name() {
    let ca = Ca::new("test CA");
    let clients = Ca::new("client CA");
    let files = Files::new(&ca.server(1));
    std::fs::write(&files.client_ca, clients.pem()).unwrap();
    let tokens = "[[server.auth.tokens]]\nname = \"robot\"\nscopes = [\"read\"]\n\
                  [[server.auth.tokens]]\nname = \"person\"\nsecret = \"person-secret-0123456789\"\nscopes = [\"submit\"]\n";
    let client_ca = files.client_ca.clone();
    let app = tls_app(&files, |c| {
        c.server.tls.as_mut().unwrap().client_ca = Some(client_ca.clone());
        let with_ca = format!(
            "[server.tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = {}\n{tokens}",
            toml_str(&client_ca.display().to_string())
        );
        c.server.auth = staged::config::Config::parse(&with_ca).unwrap().server.auth;
    })
    .await;
    let port = app.server.as_ref().unwrap().addr.port();
    let stats = format!("https://127.0.0.1:{port}/get_stats/");
    let status = async |client: reqwest::Client, bearer: Option<&str>| {
        let mut req = client.get(&stats);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        req.send().await.unwrap().status().as_u16()
    };
    let robot = clients.client("robot");
    let stranger = clients.client("stranger");
    assert_eq!(
        status(https_client(&ca.pem(), Some(&robot)), None).await,
        200
    );
    assert_eq!(status(https_client(&ca.pem(), None), None).await, 401);
    assert_eq!(
        status(https_client(&ca.pem(), Some(&stranger)), None).await,
        401,
        "a certificate named for no token"
    );
    // The bearer token decides: a wrong one is refused however good the certificate, and
    // person's holds only submit.
    assert_eq!(
        status(
            https_client(&ca.pem(), Some(&robot)),
            Some("wrong-secret-0123456789")
        )
        .await,
        401
    );
    assert_eq!(
        status(
            https_client(&ca.pem(), Some(&robot)),
            Some("person-secret-0123456789")
        )
        .await,
        403
    );
    app.stop().await;
}
