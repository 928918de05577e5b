//! The real `staged` binary: crash safety (SIGKILL right after 202), graceful stop on
//! SIGTERM, the config checks of the command line.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::daemon::{
    BIN, Daemon, free_port, toml_str, write_pipeline_config, write_plain_config,
};
use crate::common::{Kind, TestDb};
use crate::common::{NO_CALLBACK, files_job, poll_until, wait_for};
use serde_json::Value;

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
    let config = write_plain_config(db.dir.path(), &db.url, port);
    let mut daemon = Daemon::start(&config, port).await;
    let http = reqwest::Client::new();
    let url = format!("{}/staging/", daemon.base);

    // Many concurrent posts so that several group-commit batches are in flight.
    let mut tasks = Vec::new();
    for id in 0..200i64 {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let body = files_job(id, [format!("f/{id}/a"), format!("f/{id}/b")], NO_CALLBACK);
            http.post(url)
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
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
        .json(&files_job(1000, ["last"], NO_CALLBACK))
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
    let config = write_plain_config(db.dir.path(), &db.url, port);
    let mut daemon = Daemon::start(&config, port).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/staging", daemon.base))
        .json(&files_job(1, ["a"], NO_CALLBACK))
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
        ("STAGED_TOKEN_ASVO", "asvo-token-0123456789"),
        ("STAGED_TOKEN_OPS", "ops-token-0123456789"),
        ("STAGED_TOKEN_PROMETHEUS", "prometheus-token-0123456789"),
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

/// `staged demo` runs the whole pipeline: every sample job calls back with the code its
/// story calls for, the API stays up, and SIGTERM ends it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_its_jobs_to_their_callbacks() {
    use std::io::{BufRead, BufReader};
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut callbacks = Vec::new();
    let mut finished = false;
    while Instant::now() < deadline && !finished {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if line.contains("callback for job") {
                    callbacks.push(line.clone());
                }
                finished = line.starts_with("all 4 sample jobs have called back");
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    assert!(
        finished,
        "demo did not finish its jobs; callbacks so far: {callbacks:#?}"
    );
    let code_of = |job: &str| {
        callbacks
            .iter()
            .find(|l| l.contains(&format!("callback for job {job}:")))
            .and_then(|l| l.split("return_code ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_string)
    };
    assert_eq!(code_of("101").as_deref(), Some("0"), "{callbacks:#?}");
    assert_eq!(code_of("102").as_deref(), Some("0"), "{callbacks:#?}");
    assert_eq!(code_of("103").as_deref(), Some("5"), "{callbacks:#?}");
    assert_eq!(code_of("104").as_deref(), Some("101"), "{callbacks:#?}");

    // Still serving: the finished jobs are gone, as after any delivered callback. The
    // demo prints a callback as its receiver gets it, a moment before the daemon hears the
    // 200 and removes the job, so both are awaited (bounded) rather than read at once.
    let base = format!("http://127.0.0.1:{port}");
    let status_becomes = |path: String, want: u16| async move {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let status = reqwest::get(&path).await.unwrap().status().as_u16();
            if status == want || Instant::now() > until {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(
        status_becomes(format!("{base}/staging/?job_id=101"), 404).await,
        404
    );
    assert_eq!(
        status_becomes(format!("{base}/get_failed_job/?job_id=103"), 200).await,
        200,
        "the code-5 job left a failure report"
    );

    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "demo did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "demo exit status {status:?}");
    // A clean run logs no errors, shutdown included (the simulator's Kafka producer once
    // outlived the mock broker and logged its loss).
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "the demo logged errors: {errors:#?}");
}

/// Posts a job until some daemon has it: 202, or 403 when an earlier attempt was stored
/// but its answer was lost to a kill.
async fn post_until_stored(http: &reqwest::Client, bases: &[String], body: &Value) {
    for attempt in 0..1200usize {
        let base = &bases[attempt % bases.len()];
        if let Ok(r) = http
            .post(format!("{base}/staging/"))
            .json(body)
            .send()
            .await
            && matches!(r.status().as_u16(), 202 | 403)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {} was never stored", body["job_id"]);
}

/// Delivered callbacks per job id.
fn deliveries(
    receiver: &crate::common::pipeline::Receiver,
) -> std::collections::HashMap<i64, Vec<Value>> {
    let mut by_job: std::collections::HashMap<i64, Vec<Value>> = std::collections::HashMap::new();
    for r in receiver.delivered() {
        by_job
            .entry(r.body["job_id"].as_i64().unwrap())
            .or_default()
            .push(r.body);
    }
    by_job
}

async fn wait_all_called_back(
    receiver: &crate::common::pipeline::Receiver,
    jobs: i64,
    limit: Duration,
) {
    let all = poll_until(limit, async || deliveries(receiver).len() as i64 == jobs).await;
    let got = deliveries(receiver).len();
    assert!(all, "only {got} of {jobs} jobs called back");
}

/// SIGKILL at random moments during a 1,000-job run, restarting each time: every job
/// reaches its callback; a job is called back twice only if its delivery was in flight at
/// a kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_thousand_job_run_loses_nothing() {
    const JOBS: i64 = 1000;
    const KILLS: usize = 3;
    let tape =
        crate::common::pipeline::Tape::start(|s| s.recall_delay = Duration::from_millis(200)).await;
    let receiver = crate::common::pipeline::Receiver::start().await;
    let db = TestDb::new(Kind::Sqlite).await;
    let port = free_port();
    let config = write_pipeline_config(db.dir.path(), &db.url, port, &tape, "crash-test", 3, "");
    let mut daemon = Daemon::start(&config, port).await;
    let base = vec![daemon.base.clone()];

    let http = reqwest::Client::new();
    let notify = receiver.url();
    let poster = tokio::spawn({
        let (http, base) = (http.clone(), base.clone());
        async move {
            use futures::StreamExt;
            futures::stream::iter(0..JOBS)
                .for_each_concurrent(32, |id| {
                    let body = files_job(id, [format!("c/{id}/a"), format!("c/{id}/b")], &notify);
                    let (http, base) = (http.clone(), base.clone());
                    async move { post_until_stored(&http, &base, &body).await }
                })
                .await;
        }
    });
    for _ in 0..KILLS {
        let wait = 1500 + rand::random::<u64>() % 2500;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        daemon.signal(libc::SIGKILL);
        daemon.wait_exit(Duration::from_secs(10));
        daemon = Daemon::start(&config, port).await;
    }
    poster.await.unwrap();
    let debug_base = daemon.base.clone();
    let all = poll_until(Duration::from_secs(240), async || {
        deliveries(&receiver).len() as i64 == JOBS
    })
    .await;
    if !all {
        let stats = reqwest::get(format!("{debug_base}/get_stats/"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let list: Value = reqwest::get(format!("{debug_base}/get_joblist/"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let left: Vec<&Value> = list["jobs"].as_object().unwrap().values().take(5).collect();
        eprintln!(
            "stats: {stats}\njobs left: {}, e.g. {left:?}\nsim: {:?}",
            list["jobs"].as_object().unwrap().len(),
            tape.sim.counters()
        );
        panic!(
            "only {} of {JOBS} jobs called back",
            deliveries(&receiver).len()
        );
    }

    let by_job = deliveries(&receiver);
    let repeats = by_job.values().filter(|d| d.len() > 1).count();
    assert!(
        repeats <= KILLS * 16,
        "{repeats} jobs called back twice; at most the 16 in flight at each of {KILLS} kills may be"
    );
    for (id, d) in &by_job {
        assert_eq!(d[0]["return_code"], 0, "job {id}: {:?}", d[0]);
        assert_eq!(d[0]["ready_files"], 2, "job {id}");
    }
    drop(daemon);
}

/// Two daemons share one PostgreSQL and one consumer group; one is killed mid-run. The
/// survivor finishes every job, and only callbacks in flight at the kill may repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_the_work_and_survive_one_kill() {
    const JOBS: i64 = 300;
    let tape =
        crate::common::pipeline::Tape::start(|s| s.recall_delay = Duration::from_millis(200)).await;
    let receiver = crate::common::pipeline::Receiver::start().await;
    let db = TestDb::new(Kind::Postgres).await;
    let (pa, pb) = (free_port(), free_port());
    let ca = write_pipeline_config(db.dir.path(), &db.url, pa, &tape, "shared-group", 3, "");
    let cb = write_pipeline_config(db.dir.path(), &db.url, pb, &tape, "shared-group", 3, "");
    let mut a = Daemon::start(&ca, pa).await;
    let b = Daemon::start(&cb, pb).await;
    let bases = vec![a.base.clone(), b.base.clone()];

    let http = reqwest::Client::new();
    let notify = receiver.url();
    let poster = tokio::spawn({
        let (http, bases) = (http.clone(), bases.clone());
        async move {
            use futures::StreamExt;
            futures::stream::iter(0..JOBS)
                .for_each_concurrent(16, |id| {
                    let body = files_job(id, [format!("t/{id}/a")], &notify);
                    // Alternate the daemon each job is posted to.
                    let mut order = bases.clone();
                    order.rotate_left(id as usize % 2);
                    let http = http.clone();
                    async move { post_until_stored(&http, &order, &body).await }
                })
                .await;
        }
    });
    wait_for(
        "progress before the kill",
        Duration::from_secs(60),
        async || deliveries(&receiver).len() >= (JOBS / 3) as usize,
    )
    .await;
    a.signal(libc::SIGKILL);
    a.wait_exit(Duration::from_secs(10));
    poster.await.unwrap();
    wait_all_called_back(&receiver, JOBS, Duration::from_secs(180)).await;

    let by_job = deliveries(&receiver);
    let repeats = by_job.values().filter(|d| d.len() > 1).count();
    assert!(repeats <= 16, "{repeats} jobs called back twice");
    assert!(by_job.values().all(|d| d[0]["return_code"] == 0));
    drop(b);
}

/// The original's template `.envrc` (from its README, in fixtures/) imports into a config that
/// `check-config` accepts once the secrets it names are set; no secret is written.
#[test]
fn import_env_of_the_original_template_passes_check_config() {
    let template = include_str!("fixtures/original.envrc");
    let dir = tempfile::tempdir().unwrap();
    let envrc = dir.path().join(".envrc");
    std::fs::write(
        &envrc,
        format!("{template}\nexport DBPASSWORD='hunter2'\nexport SOMETHING_ELSE=1\n"),
    )
    .unwrap();
    let config = dir.path().join("staged.toml");
    let import = || {
        run(
            &[
                "import-env",
                envrc.to_str().unwrap(),
                "--out",
                config.to_str().unwrap(),
            ],
            &[],
        )
    };
    let out = import();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    for secret in [
        "STAGED_SCOUT_PASSWORD",
        "STAGED_RESULT_PASSWORD",
        "STAGED_DB_PASSWORD",
        "STAGED_KAFKA_PASSWORD",
    ] {
        assert!(said.contains(secret), "{secret} not named: {said}");
    }
    assert!(said.contains("HAProxy front"), "{said}");
    assert!(said.contains("unknown variables: SOMETHING_ELSE"), "{said}");
    let toml = std::fs::read_to_string(&config).unwrap();
    assert!(!toml.contains("hunter2"), "a secret was copied:\n{toml}");
    let envs = [
        ("STAGED_DB_PASSWORD", "x"),
        ("STAGED_SCOUT_PASSWORD", "x"),
        ("STAGED_KAFKA_PASSWORD", "x"),
        ("STAGED_RESULT_PASSWORD", "x"),
    ];
    let check = run(
        &["check-config", "--config", config.to_str().unwrap()],
        &envs,
    );
    assert!(
        check.status.success(),
        "check-config refused the import: {}\n{toml}",
        String::from_utf8_lossy(&check.stderr)
    );
    let effective = String::from_utf8_lossy(&check.stdout);
    assert!(effective.contains("ws.mwatelescope.org"), "{effective}");
    assert!(effective.contains("691200"), "{effective}");
    // An existing file is never overwritten.
    let again = import();
    assert!(!again.status.success());
}

/// `check-config` accepts an unsafe but allowed combination and says why it is unsafe.
#[test]
fn check_config_warns_about_unsafe_combinations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("open.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"0.0.0.0:8000\"\nallow_unauthenticated = true\n\
         [scout]\nnodes = [\"https://scout.example:8080\"]\ninsecure_skip_tls_verify = true\n\
         [callbacks]\npassword = \"pw\"\n",
    )
    .unwrap();
    let out = run(&["check-config", "--config", path.to_str().unwrap()], &[]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    for expected in [
        "warning: server.listen is 0.0.0.0:8000",
        "warning: scout.insecure_skip_tls_verify",
        "warning: callbacks.allow is empty",
    ] {
        assert!(said.contains(expected), "{expected:?} not in:\n{said}");
    }
    // The shipped template has none of them.
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/staged.example.toml");
    let envs = [
        ("STAGED_DB_PASSWORD", "x"),
        ("STAGED_SCOUT_PASSWORD", "x"),
        ("STAGED_KAFKA_PASSWORD", "x"),
        ("STAGED_RESULT_PASSWORD", "x"),
        ("STAGED_TOKEN_ASVO", "asvo-token-0123456789"),
        ("STAGED_TOKEN_OPS", "ops-token-0123456789"),
        ("STAGED_TOKEN_PROMETHEUS", "prometheus-token-0123456789"),
    ];
    let out = run(
        &["check-config", "--config", example.to_str().unwrap()],
        &envs,
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !said.contains("warning"), "{said}");
}
