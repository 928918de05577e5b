//! systemd integration: the real binary talks the notification protocol to a datagram
//! socket this test owns, as systemd's would be, and the shipped unit passes
//! `systemd-analyze verify`.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::net::UnixDatagram;

use crate::common::daemon::{BIN, Daemon, free_port, write_plain_config};
use crate::common::{Kind, TestDb};

/// The next notification that is not a watchdog ping, and how many pings came before it.
async fn next_state(sock: &UnixDatagram, pings: &mut usize) -> String {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), sock.recv(&mut buf))
            .await
            .expect("a notification within 30 s")
            .unwrap();
        let msg = String::from_utf8(buf[..n].to_vec()).unwrap();
        if msg == "WATCHDOG=1\n" {
            *pings += 1;
        } else {
            return msg;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_reload_and_stopping() {
    let db = TestDb::new(Kind::Sqlite).await;
    let port = free_port();
    let config = write_plain_config(db.dir.path(), &db.url, port);
    let sock_path = db.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut daemon = Daemon::start_with(&config, port, |c| {
        c.env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "200000");
    })
    .await;

    let mut pings = 0;
    assert_eq!(
        next_state(&sock, &mut pings).await,
        "READY=1\n",
        "the first notification"
    );
    assert_eq!(pings, 0, "a watchdog ping before READY=1");
    // Pings at half the 200 ms interval.
    let since = Instant::now();
    let mut buf = [0u8; 64];
    while pings < 5 {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
            .await
            .expect("watchdog pings")
            .unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1\n");
        pings += 1;
    }
    println!("5 watchdog pings in {:?}", since.elapsed());

    // A reload: RELOADING=1 with the monotonic time, then READY=1; the daemon lives on
    // (with no adapter configured, SIGHUP once ended it).
    daemon.signal(libc::SIGHUP);
    let reloading = next_state(&sock, &mut pings).await;
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading:?}");
    let usec: u128 = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(usec > 0);
    assert_eq!(next_state(&sock, &mut pings).await, "READY=1\n");
    let ping = reqwest::get(format!("{}/ping/", daemon.base))
        .await
        .unwrap();
    assert_eq!(ping.status(), 200, "the daemon did not survive SIGHUP");

    daemon.signal(libc::SIGTERM);
    assert_eq!(next_state(&sock, &mut pings).await, "STOPPING=1\n");
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
}

/// Without NOTIFY_SOCKET the daemon sends nothing and needs nothing (checked by every other
/// process test); with one that is gone, it still starts and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_socket_that_is_gone_costs_nothing() {
    let db = TestDb::new(Kind::Sqlite).await;
    let port = free_port();
    let config = write_plain_config(db.dir.path(), &db.url, port);
    let mut daemon = Daemon::start_with(&config, port, |c| {
        c.env("NOTIFY_SOCKET", db.dir.path().join("nobody-listens"))
            .env("WATCHDOG_USEC", "100000");
    })
    .await;
    let ping = reqwest::get(format!("{}/ping/", daemon.base))
        .await
        .unwrap();
    assert_eq!(ping.status(), 200);
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(Duration::from_secs(20)).success());
}

/// The shipped unit passes `systemd-analyze verify` (with ExecStart pointed at this build).
#[test]
fn the_shipped_unit_verifies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(root.join("config/staged.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/staged serve"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("staged.service");
    std::fs::write(&path, unit.replace("/usr/bin/staged", BIN)).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("systemd-analyze is needed (install the package `systemd`): {e}")
        });
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    let about_ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("staged.service"))
        .collect();
    assert!(
        about_ours.is_empty(),
        "warnings about the unit: {about_ours:#?}"
    );
}
