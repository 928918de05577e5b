//! The daemon's own TLS clients verify their peers: a callback destination's certificate
//! must chain to the system's roots or `callbacks.ca_file` (an unverified one never sees
//! the request, let alone the credentials), and PostgreSQL's to `database.ca_file` under
//! `verify-full`. Certificates are made here (rcgen); every peer is on loopback.

use std::sync::atomic::Ordering;
use std::time::Duration;

use staged::config::PgSslMode;
use staged::store::{Store, StoreOptions};
use staged_testkit::pg::Cluster;

use crate::common::certs::Ca;
use crate::common::pipeline::{PIPELINE, Receiver, Tape, quick, secret};
use crate::common::{Kind, TestApp, files_job, poll_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_go_only_to_destinations_whose_certificate_verifies() {
    let site = Ca::new("site CA");
    let stranger = Ca::new("stranger CA");
    let issued = site.server(1);
    let trusted = Receiver::start_https(&issued.cert, &issued.key).await;
    let other = stranger.server(3);
    let untrusted = Receiver::start_https(&other.cert, &other.key).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("site-ca.pem");
    std::fs::write(&ca_file, site.pem()).unwrap();

    let tape = Tape::start(|_| {}).await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        quick(c);
        tape.configure(c);
        c.callbacks.username = "asvo".into();
        c.callbacks.password = Some(secret("callback-password"));
        c.callbacks.ca_file = Some(ca_file.clone());
    })
    .await;
    assert_eq!(
        app.post_job(files_job(1, ["mwa/1/a.fits"], trusted.url()))
            .await
            .0,
        202
    );
    assert_eq!(
        app.post_job(files_job(2, ["mwa/2/a.fits"], untrusted.url()))
            .await
            .0,
        202
    );
    let delivered = trusted.wait_delivered(1, PIPELINE).await;
    assert_eq!(delivered.len(), 1, "{}", app.describe(1).await);
    assert_eq!(delivered[0].body["job_id"], 1);
    assert!(
        delivered[0].auth.is_some(),
        "credentials sent to the trusted destination"
    );

    // The other destination's handshakes fail, so it never receives a request.
    let refused = poll_until(PIPELINE, async || {
        untrusted.handshakes_failed.load(Ordering::SeqCst) > 0
    })
    .await;
    assert!(
        refused,
        "no attempt at the untrusted destination: {}",
        app.describe(2).await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        untrusted.attempts(),
        0,
        "a request reached an unverified destination"
    );
    let (status, _) = app.get("/staging/?job_id=2").await;
    assert_eq!(status, 200, "the undelivered job is kept for its retries");
    app.stop().await;
}

/// PostgreSQL serving TLS with a certificate of the test CA: `verify-full` with that CA
/// connects, with another CA it does not, and "auto" on loopback connects unverified; an
/// sslmode in both the URL and the key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_certificates_are_verified() {
    let ca = Ca::new("database CA");
    let other = Ca::new("another CA");
    let issued = ca.server(1);
    let cluster =
        tokio::task::spawn_blocking(move || Cluster::start_tls(&issued.cert, &issued.key))
            .await
            .unwrap()
            .expect("a TLS PostgreSQL cluster");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    let other_file = dir.path().join("other.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&other_file, other.pem()).unwrap();

    let opts = |mode: PgSslMode, ca: Option<&std::path::Path>, url: String| {
        let mut c = staged::config::Config::default();
        c.database.url = url;
        c.database.sslmode = mode;
        c.database.ca_file = ca.map(|p| p.to_path_buf());
        StoreOptions::from_config(&c.database, &c.jobs)
    };
    let url = cluster.url();

    let store = Store::open(&opts(PgSslMode::VerifyFull, Some(&ca_file), url.clone()))
        .await
        .expect("verify-full with the server's CA");
    assert!(store.check_ready().await.is_ok());
    store.close().await;

    let err = match Store::open(&opts(PgSslMode::VerifyFull, Some(&other_file), url.clone())).await
    {
        Ok(_) => panic!("verify-full accepted a certificate of another CA"),
        Err(e) => staged::error_text::chain(&e),
    };
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );

    let store = Store::open(&opts(PgSslMode::Auto, None, url.clone()))
        .await
        .expect("auto on loopback: encrypted if offered, unverified");
    store.close().await;

    let err = match Store::open(&opts(
        PgSslMode::VerifyFull,
        None,
        format!("{url}?sslmode=disable"),
    ))
    .await
    {
        Ok(_) => panic!("an sslmode in the URL and in the key was accepted"),
        Err(e) => staged::error_text::chain(&e),
    };
    assert!(err.contains("sslmode"), "{err}");
    drop(cluster);
}
