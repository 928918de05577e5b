//! Adapters in a running daemon, over real HTTP: both adapters loaded by config, `obs`
//! validated against the adapter's schema, the schema in `/openapi.json`, hot swap under
//! load (HTTP reload and SIGHUP), a hostile adapter that costs calls but not service, and
//! `staged adapter inspect` on the real binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::adapters::{MetadataSim, adapter_config, settings, wasm};
use crate::common::{Kind, TestApp};
use crate::common::{NO_CALLBACK, files_job, obs_job, wait_for};
use serde_json::{Value, json};
use staged::adapter::{AdapterError, AllowList};

fn job(id: i64, obs: Value) -> Value {
    obs_job(id, obs, NO_CALLBACK)
}

async fn reload(app: &TestApp) -> (u16, Value) {
    let r = app
        .http
        .post(app.url("/admin/adapter/reload"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn adapters(app: &TestApp) -> staged::adapter::Adapters {
    app.server.as_ref().unwrap().adapters.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mwa_in_the_daemon_validates_obs_and_documents_it() {
    let sim = MetadataSim::start().await;
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        c.adapter = adapter_config("mwa");
        c.adapter.http_allow = AllowList::parse(&[sim.allow()]).unwrap();
        c.adapter.settings = settings(&[("data_files_url", &sim.base)]);
    })
    .await;
    let (status, body) = app
        .post_job(job(
            1,
            json!({"obs_id": 1000, "start_time": 0, "duration": 0}),
        ))
        .await;
    assert_eq!((status, body), (202, Value::Null));
    let (status, body) = app.post_job(job(2, json!({"obs_id": "tomorrow"}))).await;
    assert_eq!(status, 422, "{body}");
    let msg = body["errormsg"].as_str().unwrap();
    assert!(
        msg.contains("mwa adapter") && msg.contains("/obs_id"),
        "{msg}"
    );
    assert_eq!(body["detail"][0]["loc"], json!(["body", "obs"]));
    // files still win over obs, whatever the obs.
    let (status, _) = app
        .post_job(json!({"job_id": 3, "notify_url": "http://h/cb", "files": ["mwa/a"], "obs": {"obs_id": "x"}}))
        .await;
    assert_eq!(status, 202);

    let (status, doc) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    let schema = &doc["components"]["schemas"]["Observation"];
    assert_eq!(schema["required"], json!(["obs_id"]), "{schema}");
    assert!(schema.get("$schema").is_none());
    assert_eq!(
        doc["components"]["schemas"]["NewJob"]["properties"]["obs"]["oneOf"][1]["$ref"],
        "#/components/schemas/Observation"
    );
    assert!(doc["paths"]["/admin/adapter/reload"]["post"].is_object());

    // The adapter the daemon loaded resolves through the simulator.
    let a = adapters(&app).current().unwrap();
    let paths = a
        .resolve_observation(&json!({"obs_id": 1000}))
        .await
        .unwrap();
    assert_eq!(paths.len(), 4);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filelist_in_the_daemon_refuses_obs_and_takes_files() {
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        c.adapter = adapter_config("filelist");
        c.adapter.settings = settings(&[("job_prefix", "ska/"), ("stage_prefix", "/t/")]);
    })
    .await;
    let (status, body) = app.post_job(job(1, json!({"obs_id": 1}))).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["errormsg"]
            .as_str()
            .unwrap()
            .contains("filelist adapter")
    );
    let (status, _) = app.post_job(files_job(2, ["ska/a"], "http://h/cb")).await;
    assert_eq!(status, 202);
    let a = adapters(&app).current().unwrap();
    assert_eq!(
        a.stage_paths(&["ska/a".into()]).await.unwrap(),
        vec!["/t/a"]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_adapter_obs_is_400_and_reload_is_409() {
    let app = TestApp::start(Kind::Sqlite).await;
    let (status, body) = app.post_job(job(1, json!({"obs_id": 1000}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["errormsg"]
            .as_str()
            .unwrap()
            .contains("no telescope adapter configured"),
        "{body}"
    );
    let (status, body) = reload(&app).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["errormsg"]
            .as_str()
            .unwrap()
            .contains("no adapter is configured")
    );
    let (_, doc) = app.get("/openapi.json").await;
    assert!(doc["components"]["schemas"].get("Observation").is_none());
    app.stop().await;
}

/// The app with adapter `name` loaded from a copy the test may overwrite before a reload;
/// the directory holding the copy lives as long as the returned guard.
async fn app_with_adapter_file(
    name: &str,
    tweak: impl FnOnce(&mut staged::config::Config),
) -> (TestApp, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter.wasm");
    std::fs::copy(wasm(name), &path).unwrap();
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        c.adapter = adapter_config(name);
        c.adapter.wasm = Some(path.clone());
        tweak(c);
    })
    .await;
    (app, path, dir)
}

/// Swaps mwa -> filelist -> mwa while requests and adapter calls run: nothing fails, each
/// call completes on the adapter it started with, and a broken file keeps the old adapter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_fails_nothing() {
    let (app, path, _dir) = app_with_adapter_file("mwa", |_| {}).await;
    let app = Arc::new(app);
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for w in 0..4i64 {
        let (app, stop, calls) = (app.clone(), stop.clone(), calls.clone());
        load.push(tokio::spawn(async move {
            let names: Vec<String> = (0..200).map(|i| format!("mwa/b/f{i}")).collect();
            let mut seen = std::collections::BTreeSet::new();
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let a = adapters(&app).current().unwrap();
                seen.insert(a.info().name.clone());
                let mapped = a.map_event_paths(&names).await.expect("no call fails");
                assert_eq!(mapped.len(), names.len());
                let id = 1_000_000 * (w + 1) + n;
                n += 1;
                let (status, body) = app.post_job(files_job(id, ["mwa/x"], "http://h/cb")).await;
                assert_eq!(status, 202, "{body}");
                calls.fetch_add(1, Ordering::Relaxed);
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (next, expect) in [
        ("filelist", "filelist"),
        ("mwa", "mwa"),
        ("filelist", "filelist"),
    ] {
        std::fs::copy(wasm(next), &path).unwrap();
        let (status, body) = reload(&app).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["adapter"]["name"], expect);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A file that is not an adapter: 422 with the reason, and filelist stays in service.
    std::fs::write(&path, b"\0asm garbage").unwrap();
    let (status, body) = reload(&app).await;
    assert_eq!(status, 422, "{body}");
    let msg = body["errormsg"].as_str().unwrap();
    assert!(
        msg.contains("not a WebAssembly component") && msg.contains("previous adapter stays"),
        "{msg}"
    );
    assert_eq!(adapters(&app).current().unwrap().info().name, "filelist");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = std::collections::BTreeSet::new();
    for t in load {
        seen.extend(t.await.expect("a load task failed"));
    }
    assert!(calls.load(Ordering::Relaxed) > 20, "load ran");
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec!["filelist", "mwa"]
    );
    Arc::into_inner(app).unwrap().stop().await;
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_adapter() {
    let (app, path, _dir) = app_with_adapter_file("mwa", |_| {}).await;
    // Registering here too makes sure the process has a SIGHUP handler before the signal
    // is raised (the daemon's own registration happens on a spawned task).
    let _hold = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::copy(wasm("filelist"), &path).unwrap();
    // SAFETY: sending a signal to our own process has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
    wait_for(
        "SIGHUP to swap the adapter",
        Duration::from_secs(10),
        async || adapters(&app).current().unwrap().info().name == "filelist",
    )
    .await;
    app.stop().await;
}

/// A hostile adapter in service: its bad calls fail with typed errors and a reload to an
/// adapter whose `info` hangs is refused, while the daemon keeps answering promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_adapter_costs_calls_not_the_daemon() {
    let (app, _, _dir) = app_with_adapter_file("hostile", |_| {}).await;
    let a = adapters(&app).current().unwrap();
    let bad = ["loop", "bomb", "trap", "huge", "wrong-count"].map(|mode| {
        let a = a.clone();
        tokio::spawn(async move { a.map_event_paths(&[mode.to_string()]).await })
    });
    // Meanwhile the API answers promptly.
    for i in 0..20 {
        let started = Instant::now();
        let (status, _) = app.post_job(files_job(i, ["f"], "http://h/cb")).await;
        assert_eq!(status, 202);
        assert!(started.elapsed() < Duration::from_millis(500));
    }
    let mut kinds = Vec::new();
    for t in bad {
        let e = t.await.unwrap().unwrap_err();
        assert!(e.to_string().starts_with("adapter hostile:"), "{e}");
        kinds.push(match e {
            AdapterError::Timeout { .. } => "timeout",
            AdapterError::MemoryExceeded { .. } => "memory",
            AdapterError::Trap { .. } => "trap",
            AdapterError::OutputTooLarge { .. } => "output",
            AdapterError::BadOutput { .. } => "bad-output",
            _ => "other",
        });
    }
    assert_eq!(kinds, ["timeout", "memory", "trap", "output", "bad-output"]);

    app.stop().await;
}

/// A reload to a build whose `info` never returns is refused within the call bound; the
/// adapter in service stays and the daemon keeps answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_to_a_hanging_adapter_keeps_the_old_one() {
    let (app, path, _dir) = app_with_adapter_file("mwa", |c| {
        // mwa ignores it; the hostile build hangs in `info` because of it.
        c.adapter.settings = settings(&[("info", "loop")]);
    })
    .await;
    std::fs::copy(wasm("hostile"), &path).unwrap();
    let app = Arc::new(app);
    let reloading = {
        let app = app.clone();
        tokio::spawn(async move { reload(&app).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let (status, _) = app.get("/ping/").await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_millis(500));
    let (status, body) = reloading.await.unwrap();
    assert_eq!(status, 422, "{body}");
    let msg = body["errormsg"].as_str().unwrap();
    assert!(msg.contains("info did not finish within"), "{msg}");
    assert_eq!(adapters(&app).current().unwrap().info().name, "mwa");
    Arc::into_inner(app).unwrap().stop().await;
}

#[test]
fn inspect_a_good_adapter_and_a_file_that_is_not_one() {
    let bin = env!("CARGO_BIN_EXE_staged");
    let out = std::process::Command::new(bin)
        .args(["adapter", "inspect"])
        .arg(wasm("mwa"))
        .env_remove("STAGED_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "name:      mwa",
        "telescope: Murchison Widefield Array",
        "\"obs_id\"",
        "map-event-paths",
        "resolve-observation {} -> invalid observation",
        "\nok",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from:\n{stdout}");
    }

    let dir = tempfile::tempdir().unwrap();
    let not = dir.path().join("readme.wasm");
    std::fs::write(&not, "plain text").unwrap();
    for file in [not, wasm("no-such-adapter")] {
        let out = std::process::Command::new(bin)
            .args(["adapter", "inspect"])
            .arg(&file)
            .env_remove("STAGED_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}", file.display());
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    }
}

/// A job naming a file the adapter would never recognise in a recall message could only
/// wait for its expiry: it is refused at intake (both adapters, with and without a mount
/// prefix), and the jobs the adapter recognises are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_the_adapter_never_recognises_are_refused_at_intake() {
    // (adapter, its settings, a path it recognises, one it never will)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: [Case; 3] = [
        ("mwa", vec![], "mwa/1234567890/a.fits", "1234567890/a.fits"),
        (
            "mwa",
            vec![("mount_prefix", "/vss")],
            "mwa/1234567890/a.fits",
            "/vss/mwa/1234567890/a.fits",
        ),
        (
            "filelist",
            vec![("job_prefix", "ska/"), ("stage_prefix", "/t/")],
            "ska/obs/a.ms",
            "elsewhere/a.ms",
        ),
    ];
    for (n, (name, opts, ours, foreign)) in cases.into_iter().enumerate() {
        let app = TestApp::start_with(Kind::Sqlite, |c| {
            c.adapter = adapter_config(name);
            c.adapter.settings = settings(&opts);
        })
        .await;
        let post = |id: i64, files: Vec<&str>| app.post_job(files_job(id, files, "http://h/cb"));
        let (status, body) = post(1, vec![ours]).await;
        assert_eq!((status, &body), (202, &Value::Null), "case {n}: {ours}");
        let (status, body) = post(2, vec![ours, foreign]).await;
        assert_eq!(status, 400, "case {n}: {foreign}: {body}");
        let msg = body["errormsg"].as_str().unwrap();
        assert!(
            msg.contains("file 1") && msg.contains(foreign) && msg.contains(name),
            "case {n}: {msg}"
        );
        // Nothing of the refused job was stored.
        let (status, _) = app.get("/staging/?job_id=2").await;
        assert_eq!(status, 404, "case {n}");
        app.stop().await;
    }
}
