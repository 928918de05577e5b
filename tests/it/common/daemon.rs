//! The real `staged` binary as a child process, for the tests that need a process of its
//! own (signals, SIGKILL, resource limits, the command line).
//!
//! Invariant: a [`Daemon`] never outlives its test. It is killed and reaped when dropped,
//! so a failing assertion leaves no daemon behind holding a port or a database.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_staged");

/// How long a started daemon may take to answer `/ping/` (a debug build on a loaded CI
/// machine, running its migrations).
const READY_LIMIT: Duration = Duration::from_secs(30);

/// A loopback port free a moment ago (the daemon binds it itself).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A string as a TOML basic string (JSON's escaping is a subset of TOML's).
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

pub struct Daemon {
    pub child: Child,
    pub base: String,
    pub addr: SocketAddr,
    /// Every start with the same config appends here, so a failure shows the whole run.
    pub log: PathBuf,
}

impl Daemon {
    /// `staged serve --config <config>` listening on `port`, once it answers `/ping/`.
    pub async fn start(config: &Path, port: u16) -> Daemon {
        Self::start_with(config, port, |_| {}).await
    }

    /// As [`Daemon::start`], after `tweak` has adjusted the command (environment, limits).
    pub async fn start_with(config: &Path, port: u16, tweak: impl FnOnce(&mut Command)) -> Daemon {
        let log = config.with_extension("log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(file);
        tweak(&mut cmd);
        let d = Daemon {
            child: cmd.spawn().unwrap(),
            base: format!("http://127.0.0.1:{port}"),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        };
        d.wait_ready().await;
        d
    }

    async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        let ping = format!("{}/ping/", self.base);
        let up = super::poll_until(
            READY_LIMIT,
            async || matches!(http.get(&ping).send().await, Ok(r) if r.status() == 200),
        )
        .await;
        assert!(
            up,
            "daemon did not answer /ping/ within {READY_LIMIT:?}; log:\n{}",
            self.log_text()
        );
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "signal {sig} to the daemon failed");
    }

    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// Waits for the daemon to exit; kills it and fails the test after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "daemon did not exit within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The log's last 20 kB: what matters, where a long run's whole log would drown the
    /// failure.
    pub fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(20_000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }

    /// Peak and current resident memory, in MiB, from /proc.
    pub fn rss_mib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                / 1024
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    /// Waits for `what` to hold of this daemon, with its log in the failure.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        condition: impl AsyncFnMut() -> bool,
    ) {
        if !super::poll_until(limit, condition).await {
            panic!(
                "timed out after {limit:?} waiting for {what}; log:\n{}",
                self.log_text()
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon config wired to the test's tape system and its callback receiver's credentials,
/// with leases of `lease_secs` and retries of a second or two, so that recovery after a kill
/// takes seconds, not minutes; `more` is appended (sections of the test's own).
pub fn write_pipeline_config(
    dir: &Path,
    db_url: &str,
    port: u16,
    tape: &super::pipeline::Tape,
    group: &str,
    lease_secs: u32,
    more: &str,
) -> PathBuf {
    let path = dir.join(format!("pipeline-{port}.toml"));
    let text = format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[database]
url = {db}

[reports]
dir = {reports}

[logging]
level = "warn"

[jobs]
retry_min_secs = 1
retry_max_secs = 2
sweep_interval_secs = 1
lease_secs = {lease_secs}

[callbacks]
username = "asvo"
password = "cb-pw"
error_delay_secs = 0
retry_min_secs = 1
retry_max_secs = 1
timeout_secs = 5
concurrency = 16
# The 200-a-minute default would make a 1,000-job run last five minutes.
per_minute = 100000

[scout]
nodes = ["{scout}"]
username = "scout"
password = "scout-pw"
retries = 1
backoff_initial_ms = 50

[kafka]
brokers = ["{brokers}"]
topic = "{topic}"
group_id = "{group}"
batch_max_wait_ms = 20
extra = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "300", "fetch.wait.max.ms" = "20", "topic.metadata.refresh.interval.ms" = "1000" }}
{more}"#,
        db = toml_str(db_url),
        reports = toml_str(&dir.join("reports").display().to_string()),
        scout = tape.node.url(),
        brokers = tape.cluster.bootstrap_servers(),
        topic = super::pipeline::TOPIC,
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A config of the embedded defaults but for the port, the database and the reports
/// directory (inside `dir`); written to `dir`, its path returned.
pub fn write_plain_config(dir: &Path, db_url: &str, port: u16) -> PathBuf {
    let path = dir.join(format!("staged-{port}.toml"));
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[database]\nurl = {}\n\n[reports]\ndir = {}\n",
        toml_str(db_url),
        toml_str(&dir.join("reports").display().to_string()),
    );
    std::fs::write(&path, text).unwrap();
    path
}
