//! The real `staged` binary: crash safety (SIGKILL right after 202), graceful stop on
//! SIGTERM, the config checks of the command line.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Kind, TestDb};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_staged");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, db_url: &str, port: u16) -> PathBuf {
    let path = dir.join(format!("staged-{port}.toml"));
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[database]\nurl = {}\n\n[reports]\ndir = {}\n",
        toml_str(db_url),
        toml_str(&dir.join("reports").display().to_string()),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

struct Daemon {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Daemon {
    async fn start(config: &Path, port: u16) -> Daemon {
        let log = config.with_extension(format!("{}.log", rand::random::<u32>()));
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        d.wait_ready().await;
        d
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        while Instant::now() < deadline {
            if let Ok(r) = http.get(format!("{}/ping/", self.base)).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "daemon did not answer /ping/ within 30 s; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0);
    }

    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "daemon did not exit within {limit:?}; log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

both_backends!(sigkill_right_after_202_loses_no_job, sigterm_stops_cleanly);

/// Jobs acknowledged with 202 survive a SIGKILL that follows at once.
async fn sigkill_right_after_202_loses_no_job(kind: Kind) {
    let db = TestDb::new(kind).await;
    let port = free_port();
    let config = write_config(db.dir.path(), &db.url, port);
    let mut daemon = Daemon::start(&config, port).await;
    let http = reqwest::Client::new();
    let url = format!("{}/staging/", daemon.base);

    // Many concurrent posts so that several group-commit batches are in flight.
    let mut tasks = Vec::new();
    for id in 0..200i64 {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"job_id": id, "files": [format!("f/{id}/a"), format!("f/{id}/b")], "notify_url": "http://127.0.0.1:9/cb"});
            http.post(url).json(&body).send().await.map(|r| r.status().as_u16())
        }));
    }
    let mut acknowledged = Vec::new();
    for (id, t) in tasks.into_iter().enumerate() {
        if let Ok(Ok(202)) = t.await {
            acknowledged.push(id as i64);
        }
    }
    // The very last one: kill as soon as its 202 is in.
    let r = http
        .post(&url)
        .json(&json!({"job_id": 1000, "files": ["last"], "notify_url": "http://127.0.0.1:9/cb"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    daemon.signal(libc::SIGKILL);
    acknowledged.push(1000);
    daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(
        acknowledged.len(),
        201,
        "all posts were acknowledged before the kill"
    );

    let daemon = Daemon::start(&config, port).await;
    for id in acknowledged {
        let r = http
            .get(format!(
                "{}/staging/?job_id={id}&include_files=true",
                daemon.base
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "job {id} lost after SIGKILL");
        let v: Value = r.json().await.unwrap();
        let expected = if id == 1000 { 1 } else { 2 };
        assert_eq!(v["total_files"], expected, "job {id}");
        assert_eq!(
            v["files"].as_object().unwrap().len(),
            expected as usize,
            "job {id}'s files"
        );
    }
}

/// SIGTERM: in-flight work finishes, the store closes, exit status 0.
async fn sigterm_stops_cleanly(kind: Kind) {
    let db = TestDb::new(kind).await;
    let port = free_port();
    let config = write_config(db.dir.path(), &db.url, port);
    let mut daemon = Daemon::start(&config, port).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/staging", daemon.base))
        .json(&json!({"job_id": 1, "files": ["a"], "notify_url": "http://127.0.0.1:9/cb"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status:?}");
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(log.contains("stopped"), "{log}");
    // The port is free again and the job is there on restart.
    let daemon = Daemon::start(&config, port).await;
    let r = http
        .get(format!("{}/staging/?job_id=1", daemon.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn check_config_names_unknown_keys_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:8000\"\nlisen_port = 5\n",
    )
    .unwrap();
    let out = run(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lisen_port"), "{err}");
    assert!(err.contains("bad.toml"), "{err}");

    std::fs::write(&file, "[database]\nmax_connections = \"many\"\n").unwrap();
    let out = run(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_connections"), "{err}");

    // serve refuses the same file before doing anything.
    let out = run(&["serve", "--config", file.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_connections"));

    let out = run(&["check-config", "--config", "/no/such/file.toml"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file.toml"));
}

#[test]
fn check_config_prints_effective_config_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("kafka-pw");
    std::fs::write(&secret_file, "kafka-secret-value\n").unwrap();
    let file = dir.path().join("ok.toml");
    std::fs::write(
        &file,
        format!(
            "[database]\nurl = \"postgres://staged:url-secret@db.example/staged\"\n\
             [scout]\nnodes = [\"https://vss-1:8080\"]\nusername = \"svc\"\npassword = {{ env = \"STAGED_T_SCOUT_PW\" }}\n\
             [kafka]\npassword = {{ file = {} }}\n\
             [callbacks]\nusername = \"asvo\"\npassword = \"inline-secret\"\n",
            toml_str(secret_file.to_str().unwrap())
        ),
    )
    .unwrap();
    let out = run(
        &["check-config", "--config", file.to_str().unwrap()],
        &[("STAGED_T_SCOUT_PW", "env-secret-value")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in [
        "url-secret",
        "env-secret-value",
        "kafka-secret-value",
        "inline-secret",
    ] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
    }
    assert!(stdout.contains("https://vss-1:8080"));
    assert!(
        stdout.contains("listen = \"127.0.0.1:8000\""),
        "defaults shown:\n{stdout}"
    );
    assert!(stdout.contains("env STAGED_T_SCOUT_PW"));

    // Without the environment variable the secret cannot be resolved: an error naming it.
    let out = run(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("STAGED_T_SCOUT_PW"));
}

/// The shipped configs are valid as they stand (the production one given its secrets).
#[test]
fn shipped_configs_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let envs = [
        ("STAGED_DB_PASSWORD", "x"),
        ("STAGED_SCOUT_PASSWORD", "x"),
        ("STAGED_KAFKA_PASSWORD", "x"),
        ("STAGED_RESULT_PASSWORD", "x"),
    ];
    for name in ["staged.example.toml", "embedded.toml"] {
        let path = root.join("config").join(name);
        let out = run(&["check-config", "--config", path.to_str().unwrap()], &envs);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn migrate_subcommand_prepares_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("m.db").display());
    let out = run(&["migrate", "--database", &url], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("sqlite"));
    // Again: nothing to do, still success.
    assert!(run(&["migrate", "--database", &url], &[]).status.success());
    let out = run(&["migrate", "--database", "mysql://nope"], &[]);
    assert!(!out.status.success());
}
