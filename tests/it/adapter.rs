//! The adapter host against real, freshly built components: the MWA adapter resolving real
//! HTTP answers of a metadata-service simulator, both adapters' path mapping, the report
//! wording, and every hostile adapter contained to the one call it spoils.

use std::time::{Duration, Instant};

use crate::common::adapters::{MetadataSim, adapter_config, settings, wasm};
use serde_json::json;
use staged::adapter::{
    AdapterError, Adapters, AllowList, JobSummaryForAdapter, LoadError, ResolveError,
};
use staged::config::AdapterConfig;
use staged::reports;

async fn load(config: &AdapterConfig) -> std::sync::Arc<staged::adapter::LoadedAdapter> {
    Adapters::from_config(config)
        .await
        .unwrap_or_else(|e| panic!("loading {:?}: {e}", config.wasm))
        .current()
        .expect("an adapter is in service")
}

async fn mwa_with_sim(sim: &MetadataSim) -> std::sync::Arc<staged::adapter::LoadedAdapter> {
    let mut c = adapter_config("mwa");
    c.http_allow = AllowList::parse(&[sim.allow()]).unwrap();
    c.settings = settings(&[("data_files_url", &sim.base)]);
    load(&c).await
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mwa_info_and_schema() {
    let a = load(&adapter_config("mwa")).await;
    assert_eq!(a.info().name, "mwa");
    assert_eq!(a.info().telescope, "Murchison Widefield Array");
    assert_eq!(a.observation_schema()["required"], json!(["obs_id"]));
    a.validate_observation(&json!({"obs_id": 1234567890, "start_time": 0, "duration": 0}))
        .unwrap();
    let why = a
        .validate_observation(&json!({"obs_id": "soon"}))
        .unwrap_err();
    assert!(why.contains("/obs_id"), "{why}");
    let why = a
        .validate_observation(&json!({"start_time": 5}))
        .unwrap_err();
    assert!(why.contains("obs_id"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mwa_resolves_bucket_folder_nulls_and_leading_slash() {
    let sim = MetadataSim::start().await;
    let a = mwa_with_sim(&sim).await;
    let mut paths = a
        .resolve_observation(&json!({"obs_id": 1000, "start_time": 0, "duration": 0}))
        .await
        .unwrap();
    paths.sort();
    assert_eq!(
        paths,
        strings(&[
            "mwa/1000/1000_flags.zip",
            "mwa/1000_orphan.dat",
            "mwa/mwaingest-1000/1000_metafits.fits",
            "mwa/mwaingest-1000/mwa/ingest/1000/1000_ch001.fits",
        ])
    );
    let q = sim.last_query();
    assert_eq!(q["obs_id"], "1000");
    assert_eq!(q["location"], "3");
    assert_eq!(q["terse"], "true");
    assert_eq!(q["all_files"], "false");
    assert!(
        !q.contains_key("mintime") && !q.contains_key("maxtime"),
        "{q:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mwa_vcs_time_window_only_when_both_are_set() {
    let sim = MetadataSim::start().await;
    let a = mwa_with_sim(&sim).await;
    let paths = a
        .resolve_observation(&json!({"obs_id": 2000, "start_time": 1200, "duration": 8}))
        .await
        .unwrap();
    assert_eq!(paths, strings(&["mwa/vcs/2000/1200/2000_1200_ch1.sub"]));
    let q = sim.last_query();
    assert_eq!(
        (q["mintime"].as_str(), q["maxtime"].as_str()),
        ("1200", "1208")
    );
    for obs in [
        json!({"obs_id": 2000, "start_time": 1200, "duration": 0}),
        json!({"obs_id": 2000, "start_time": 0, "duration": 8}),
        json!({"obs_id": 2000}),
    ] {
        a.resolve_observation(&obs).await.unwrap();
        let q = sim.last_query();
        assert!(
            !q.contains_key("mintime") && !q.contains_key("maxtime"),
            "{obs}: {q:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mwa_lookup_failures_are_typed() {
    let sim = MetadataSim::start().await;
    let a = mwa_with_sim(&sim).await;
    let resolve = |obs: serde_json::Value| {
        let a = a.clone();
        async move { a.resolve_observation(&obs).await.unwrap_err() }
    };
    match resolve(json!({"obs_id": 404})).await {
        ResolveError::NotFound(m) => assert!(m.contains("404"), "{m}"),
        other => panic!("404 should be not-found: {other:?}"),
    }
    match resolve(json!({"obs_id": 555})).await {
        ResolveError::NotFound(_) => {}
        other => panic!("no files should be not-found: {other:?}"),
    }
    // A 5xx, a timeout or no connection at all is an outage, not an answer: the job waits.
    match resolve(json!({"obs_id": 500})).await {
        ResolveError::Unavailable(m) => assert!(m.contains("HTTP 500"), "{m}"),
        other => panic!("500 should be unavailable: {other:?}"),
    }
    match resolve(json!({"obs_id": 999})).await {
        ResolveError::LookupFailed(m) => assert!(m.contains("not a JSON object"), "{m}"),
        other => panic!("garbage should be lookup-failed: {other:?}"),
    }
    match resolve(json!({"obs_id": 777})).await {
        ResolveError::LookupFailed(m) => assert!(m.contains("over the limit"), "{m}"),
        other => panic!("an oversized answer should be lookup-failed: {other:?}"),
    }
    let started = Instant::now();
    match resolve(json!({"obs_id": 888})).await {
        ResolveError::Unavailable(m) => assert!(m.contains("within"), "{m}"),
        other => panic!("a slow answer should be unavailable: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    let dead = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let mut c = adapter_config("mwa");
    c.http_allow = AllowList::parse(&[dead.to_string()]).unwrap();
    let url = format!("http://{dead}/metadata/data_files");
    c.settings = settings(&[("data_files_url", &url)]);
    let down = load(&c).await;
    match down.resolve_observation(&json!({"obs_id": 1000})).await {
        Err(ResolveError::Unavailable(m)) => assert!(m.contains("1000"), "{m}"),
        other => panic!("no connection should be unavailable: {other:?}"),
    }
    match resolve(json!({"obs_id": "x"})).await {
        ResolveError::Invalid(m) => assert!(m.contains("not an MWA observation"), "{m}"),
        other => panic!("a bad obs should be invalid: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_outside_the_allow_list_is_refused() {
    let sim = MetadataSim::start().await;
    for allow in [
        vec![],
        vec!["127.0.0.2".to_string()],
        vec!["*.example.org".into()],
    ] {
        let mut c = adapter_config("mwa");
        c.http_allow = AllowList::parse(&allow).unwrap();
        c.settings = settings(&[("data_files_url", &sim.base)]);
        let a = load(&c).await;
        match a.resolve_observation(&json!({"obs_id": 1000})).await {
            Err(ResolveError::LookupFailed(m)) => {
                assert!(m.contains("not in the adapter's HTTP allow-list"), "{m}")
            }
            other => panic!("{allow:?}: {other:?}"),
        }
    }
    assert!(
        sim.queries.lock().unwrap().is_empty(),
        "nothing reached the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mwa_maps_events_with_and_without_mount_prefix() {
    let names = strings(&[
        "mwa/mwaingest-1000/1000/1000_ch001.fits",
        "/vss/mwa/mwaingest-1000/1000/1000_ch002.fits",
        "vss/mwa/b/f",
        "other/telescope/file",
        "/mwa/b/f",
    ]);
    let plain = load(&adapter_config("mwa")).await;
    assert_eq!(
        plain.map_event_paths(&names).await.unwrap(),
        vec![
            Some("mwa/mwaingest-1000/1000/1000_ch001.fits".into()),
            None,
            None,
            None,
            Some("mwa/b/f".into()),
        ]
    );
    let job = strings(&["mwa/b/f1", "mwa/b/f2"]);
    assert_eq!(plain.stage_paths(&job).await.unwrap(), job);

    let mut c = adapter_config("mwa");
    c.settings = settings(&[("mount_prefix", "/vss/")]);
    let mounted = load(&c).await;
    assert_eq!(
        mounted.map_event_paths(&names).await.unwrap(),
        vec![
            Some("mwa/mwaingest-1000/1000/1000_ch001.fits".into()),
            Some("mwa/mwaingest-1000/1000/1000_ch002.fits".into()),
            None,
            None,
            Some("mwa/b/f".into()),
        ]
    );
    let staged = mounted.stage_paths(&job).await.unwrap();
    assert_eq!(staged, strings(&["/vss/mwa/b/f1", "/vss/mwa/b/f2"]));
    // What Scout is asked for maps back onto the job's paths.
    assert_eq!(
        mounted.map_event_paths(&staged).await.unwrap(),
        job.into_iter().map(Some).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filelist_maps_by_prefix() {
    let mut c = adapter_config("filelist");
    c.settings = settings(&[("job_prefix", "ska/"), ("stage_prefix", "/archive/ska/")]);
    let a = load(&c).await;
    assert_eq!(a.info().name, "filelist");
    let job = strings(&["ska/a/1", "ska/a/2", "/elsewhere/x"]);
    let staged = a.stage_paths(&job).await.unwrap();
    assert_eq!(
        staged,
        strings(&["/archive/ska/a/1", "/archive/ska/a/2", "/elsewhere/x"])
    );
    let events = strings(&["/archive/ska/a/1", "/archive/other/x", "/archive/ska/"]);
    assert_eq!(
        a.map_event_paths(&events).await.unwrap(),
        vec![Some("ska/a/1".to_string()), None, None]
    );
    // No observations: every obs fails the schema, and resolve says so.
    assert!(a.validate_observation(&json!({"obs_id": 1})).is_err());
    assert!(matches!(
        a.resolve_observation(&json!({})).await,
        Err(ResolveError::Invalid(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_and_comment_carry_the_original_facts() {
    let job = JobSummaryForAdapter {
        job_id: 7,
        return_code: 5,
        total_files: 3,
        ready_files: 1,
        error_files: strings(&["mwa/a/b/file1"]),
        missing_files: strings(&["mwa/a/b/file2"]),
    };
    for name in ["mwa", "filelist", "legacy"] {
        let a = load(&adapter_config(name)).await;
        let report = a.failure_report(&job).await.unwrap();
        assert_eq!(
            report,
            reports::render(7, 3, &job.error_files, &job.missing_files),
            "{name}"
        );
        assert!(report.starts_with("Job failure report for job 7: Out of a total of 3 files, 1 had errors and 1 failed to transfer.\n"));
        let parsed = reports::parse(&report, 0);
        assert_eq!(parsed.total_files, 3);
        assert_eq!(parsed.files, strings(&["mwa/a/b/file1", "mwa/a/b/file2"]));
        let comment = a.callback_comment(&job).await.unwrap();
        for fact in [
            "Job 7",
            "total of 3 files",
            "1 were staged",
            "1 had errors",
            "1 failed to transfer",
        ] {
            assert!(comment.contains(fact), "{name}: {comment:?} lacks {fact:?}");
        }
    }
}

/// A component built against `staging:adapter@1.0.0` (before `resolve-error` had
/// `unavailable`) still loads, and every export works through the host's 1.0.0 bindings,
/// its imports served by the current `host` interface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_built_against_1_0_still_loads_and_works() {
    let legacy = load(&adapter_config("legacy")).await;
    assert_eq!(legacy.wit_version(), "1.0.0");
    assert_eq!(legacy.info().name, "legacy");
    assert_eq!(load(&adapter_config("mwa")).await.wit_version(), "1.1.0");

    let files = json!({"files": ["legacy/a", "legacy/b"]});
    legacy.validate_observation(&files).unwrap();
    assert_eq!(
        legacy.resolve_observation(&files).await.unwrap(),
        strings(&["legacy/a", "legacy/b"])
    );
    for (fail, expect) in [
        ("invalid", "Invalid"),
        ("not-found", "NotFound"),
        ("lookup-failed", "LookupFailed"),
    ] {
        let e = legacy
            .resolve_observation(&json!({ "fail": fail }))
            .await
            .unwrap_err();
        assert!(format!("{e:?}").starts_with(expect), "{fail}: {e:?}");
    }
    assert_eq!(
        legacy
            .map_event_paths(&strings(&["legacy/x", "other/y"]))
            .await
            .unwrap(),
        vec![Some("legacy/x".to_string()), None]
    );
    assert_eq!(
        legacy.stage_paths(&strings(&["legacy/x"])).await.unwrap(),
        strings(&["legacy/x"])
    );
}

/// Each misbehaviour fails its own call with a typed error, within the bounds, and the
/// next call on the same adapter works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_calls_are_contained() {
    let a = load(&adapter_config("hostile")).await;
    let healthy = |a: std::sync::Arc<staged::adapter::LoadedAdapter>| async move {
        let names = strings(&["a", "b"]);
        assert_eq!(
            a.map_event_paths(&names).await.unwrap(),
            vec![Some("a".to_string()), Some("b".to_string())]
        );
    };

    let started = Instant::now();
    let e = a.map_event_paths(&strings(&["loop"])).await.unwrap_err();
    assert!(matches!(e, AdapterError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("hostile"), "names the adapter: {e}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    healthy(a.clone()).await;

    let e = a.map_event_paths(&strings(&["bomb"])).await.unwrap_err();
    match &e {
        AdapterError::MemoryExceeded {
            requested, limit, ..
        } => {
            assert_eq!(*limit, 16 * 1024 * 1024);
            assert!(requested > limit);
        }
        other => panic!("bomb: {other}"),
    }
    healthy(a.clone()).await;

    let e = a.map_event_paths(&strings(&["trap"])).await.unwrap_err();
    assert!(matches!(e, AdapterError::Trap { .. }), "{e}");
    healthy(a.clone()).await;

    let e = a.map_event_paths(&strings(&["huge"])).await.unwrap_err();
    match &e {
        AdapterError::OutputTooLarge { bytes, limit, .. } => assert!(bytes > limit),
        other => panic!("huge: {other}"),
    }
    healthy(a.clone()).await;

    let e = a
        .map_event_paths(&strings(&["wrong-count"]))
        .await
        .unwrap_err();
    assert!(matches!(e, AdapterError::BadOutput { .. }), "{e}");

    // The host answered the forbidden GET with a refusal, which the adapter reports back.
    let out = a
        .map_event_paths(&strings(&["forbidden-http"]))
        .await
        .unwrap();
    let said = out[0].as_deref().unwrap();
    assert!(
        said.starts_with("refused:") && said.contains("allow-list"),
        "{said}"
    );

    // No files, environment, sockets or time inside the sandbox.
    for (mode, expect) in [
        ("fs", "refused:"),
        ("env", "env vars: 0"),
        ("socket", "refused:"),
        ("clock", "now: 0ns"),
    ] {
        let out = a.map_event_paths(&strings(&[mode])).await.unwrap();
        let said = out[0].as_deref().unwrap();
        assert!(said.starts_with(expect), "{mode}: {said}");
    }

    // The same through resolve-observation, the path a job takes.
    match a.resolve_observation(&json!({"do": "loop"})).await {
        Err(ResolveError::Adapter(AdapterError::Timeout { .. })) => {}
        other => panic!("{other:?}"),
    }
    healthy(a.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_call_does_not_stall_others() {
    let a = load(&adapter_config("hostile")).await;
    let spinning = {
        let a = a.clone();
        tokio::spawn(async move { a.map_event_paths(&strings(&["loop"])).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Calls keep completing promptly while the loop burns its budget.
    for _ in 0..20 {
        let started = Instant::now();
        a.map_event_paths(&strings(&["x"])).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(500));
    }
    assert!(matches!(
        spinning.await.unwrap(),
        Err(AdapterError::Timeout { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_input_is_refused_before_the_call() {
    let mut c = adapter_config("mwa");
    c.max_input_bytes = 1000;
    let a = load(&c).await;
    let names: Vec<String> = (0..100).map(|i| format!("mwa/b/{i:020}")).collect();
    let e = a.map_event_paths(&names).await.unwrap_err();
    assert!(matches!(e, AdapterError::InputTooLarge { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_files_are_refused_at_load_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.wasm");
    std::fs::write(&text, "this is not WebAssembly").unwrap();
    let mut c = adapter_config("mwa");
    c.wasm = Some(text);
    match Adapters::from_config(&c).await {
        Err(e @ LoadError::Compile { .. }) => {
            assert!(
                e.to_string().contains("is not a WebAssembly component"),
                "{e}"
            )
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a text file loaded"),
    }
    c.wasm = Some(dir.path().join("missing.wasm"));
    assert!(matches!(
        Adapters::from_config(&c).await,
        Err(LoadError::Read { .. })
    ));
    // A hostile `info` that never returns fails the load check within the call bound.
    let mut c = adapter_config("hostile");
    c.settings = settings(&[("info", "loop")]);
    match Adapters::from_config(&c).await {
        Err(LoadError::Check {
            source: AdapterError::Timeout { .. },
            ..
        }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("loaded"),
    }
    assert!(wasm("mwa").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_calls() {
    // The budget is wall time, and 300 calls share two cores: give them room, this test
    // is about slots, not time.
    let mut c = adapter_config("mwa");
    c.call_timeout_ms = 60_000;
    let a = load(&c).await;
    let names: Vec<String> = (0..100).map(|i| format!("mwa/b/f{i}")).collect();
    let mut tasks = Vec::new();
    // More than the engine's instance slots: the excess waits for a slot, nothing fails.
    for _ in 0..300 {
        let a = a.clone();
        let names = names.clone();
        tasks.push(tokio::spawn(async move {
            a.map_event_paths(&names).await.unwrap().len()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 100);
    }
}
