//! The Scout client against the simulator, over real HTTP on loopback: login and token
//! refresh per node, request splitting (by the limits, and after a 413), fail-over past
//! dead, slow, forbidding and garbling nodes, ejection, refusals; and the API endpoints that
//! ask Scout (`/filestatus/`, `/get_stats/`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{Kind, TestApp};
use serde_json::json;
use staged::config::ScoutConfig;
use staged::scout::{ScoutClient, ScoutError, ScoutSettings};
use staged_testkit::scout::{FileState, ScoutSim, SimNode, SimSettings};

/// A client of `nodes` with the simulator's credentials and test-sized timeouts.
fn settings(nodes: &[String]) -> ScoutSettings {
    let mut s = ScoutSettings::from_config(&ScoutConfig::default(), "recalls").unwrap();
    s.nodes = nodes.iter().map(|n| n.parse().unwrap()).collect();
    let sim = SimSettings::default();
    s.username = sim.username;
    s.password = sim.password;
    s.connect_timeout = Duration::from_millis(500);
    s.request_timeout = Duration::from_millis(1500);
    s.backoff_initial = Duration::from_millis(20);
    s.backoff_max = Duration::from_millis(100);
    s.retries = 2;
    s
}

async fn sim(n: usize) -> (ScoutSim, Vec<SimNode>) {
    sim_with(n, SimSettings::default()).await
}

async fn sim_with(n: usize, settings: SimSettings) -> (ScoutSim, Vec<SimNode>) {
    let sim = ScoutSim::new(settings).unwrap();
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(sim.serve_loopback().await.unwrap());
    }
    (sim, nodes)
}

fn urls(nodes: &[SimNode]) -> Vec<String> {
    nodes.iter().map(SimNode::url).collect()
}

/// A loopback URL where nothing listens.
async fn dead_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

fn paths(n: usize, len: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let p = format!("mwa/1/{i:08}_");
            format!("{p}{}", "x".repeat(len.saturating_sub(p.len())))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_in_once_and_reuses_the_token() {
    let (sim, nodes) = sim(2).await;
    let client = ScoutClient::new(settings(&urls(&nodes))).unwrap();
    assert_eq!(client.stage(&paths(3, 10), "1").await.unwrap(), 1);
    assert!(client.file_status("a").await.is_ok());
    client.stage(&paths(2, 10), "2").await.unwrap();
    let c = sim.counters();
    assert_eq!(c.logins, 2, "one per node");
    assert_eq!(c.stage_requests, 2);
    assert_eq!(c.staged_paths, 5);
    assert_eq!(client.counters().logins, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_calls_share_one_login_and_one_refresh() {
    let (sim, nodes) = sim(2).await;
    let client = ScoutClient::new(settings(&urls(&nodes))).unwrap();
    let run_100 = |client: ScoutClient| async move {
        let calls = (0..100).map(|i| {
            let c = client.clone();
            tokio::spawn(async move { c.file_status(&format!("f/{i}")).await })
        });
        for r in futures::future::join_all(calls).await {
            assert_eq!(r.unwrap().unwrap().offlineblocks, 16);
        }
    };
    // No token yet: a hundred callers, one login per node.
    run_100(client.clone()).await;
    assert_eq!(sim.counters().logins, 2);
    // The tokens expire: a hundred 403s, one refresh per node, every call retried once on
    // its node and served.
    sim.expire_tokens();
    run_100(client.clone()).await;
    assert_eq!(sim.counters().logins, 4);
    assert_eq!(client.counters().logins, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_requests_are_split_by_count() {
    let (sim, nodes) = sim(1).await;
    let client = ScoutClient::new(settings(&urls(&nodes))).unwrap();
    let n = client.stage(&paths(25_000, 12), "7").await.unwrap();
    assert_eq!(n, 3);
    let c = sim.counters();
    assert_eq!(c.stage_requests, 3);
    assert_eq!(c.staged_paths, 25_000);
    assert_eq!(c.largest_stage_paths, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_requests_are_split_by_bytes() {
    let (sim, nodes) = sim(1).await;
    let client = ScoutClient::new(settings(&urls(&nodes))).unwrap();
    // 9,000 paths of 1,000 bytes: under the count limit, ~9 MB of JSON.
    let n = client.stage(&paths(9_000, 1_000), "8").await.unwrap();
    assert_eq!(n, 3);
    let c = sim.counters();
    assert_eq!(c.staged_paths, 9_000);
    assert!(
        c.largest_stage_body <= 4_000_000,
        "{}",
        c.largest_stage_body
    );
    assert!(
        c.largest_stage_body > 3_900_000,
        "batches are filled: {}",
        c.largest_stage_body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_is_a_refusal_and_is_not_retried() {
    let (sim, nodes) = sim(2).await;
    let mut s = settings(&urls(&nodes));
    // Allow bodies the simulator refuses, to get its 413.
    s.max_body_bytes = 8 * 1024 * 1024;
    let client = ScoutClient::new(s).unwrap();
    client.file_status("warm-up").await.unwrap();
    let hits = || nodes.iter().map(SimNode::hits).sum::<u64>();

    // A body the node refuses as too large is sent again in halves...
    let before = hits() - sim.counters().logins;
    assert_eq!(client.stage(&paths(5_000, 1_000), "9").await.unwrap(), 2);
    assert_eq!(
        hits() - sim.counters().logins - before,
        3,
        "the whole once, then its two halves"
    );
    assert_eq!(client.counters().splits, 1);
    assert!(sim.counters().largest_stage_body <= SimSettings::default().max_body_bytes);
    // ...down to a single path: one path too large for the node is a refusal.
    let before = hits();
    let err = client
        .stage(&paths(1, 5 * 1024 * 1024), "9")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ScoutError::Refused { status: 413, .. }),
        "{err}"
    );
    assert_eq!(hits() - before, 1, "one request, no retry");

    sim.set_file("gone", FileState::Missing);
    let before = hits();
    let err = client.file_status("gone").await.unwrap_err();
    assert!(
        matches!(err, ScoutError::Refused { status: 404, .. }),
        "{err}"
    );
    assert_eq!(hits() - before, 1, "one request, no retry");
    assert_eq!(sim.counters().stage_requests, 2);

    // Bad credentials: the login is refused once, not retried.
    let mut s = settings(&urls(&nodes));
    s.password = "wrong".into();
    let bad = ScoutClient::new(s).unwrap();
    let before = hits();
    let err = bad.file_status("x").await.unwrap_err();
    assert!(
        matches!(err, ScoutError::Refused { status: 401, .. }),
        "{err}"
    );
    assert_eq!(hits() - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_past_a_dead_node_and_a_slow_one() {
    let (sim, nodes) = sim(2).await;
    let slow = &nodes[0];
    slow.set_latency(Duration::from_secs(5));
    let dead = dead_url().await;
    let mut s = settings(&[dead.clone(), slow.url(), nodes[1].url()]);
    s.request_timeout = Duration::from_millis(300);
    s.eject = Duration::from_secs(60);
    let client = ScoutClient::new(s).unwrap();
    let started = Instant::now();
    for i in 0..20 {
        client.stage(&paths(2, 10), &i.to_string()).await.unwrap();
    }
    // Each bad node costs at most one timeout before it is ejected for the rest of the test.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sim.counters().stage_requests, 20);
    let stats = client.node_stats();
    assert!(
        stats[0].failures >= 1 && stats[0].successes == 0,
        "{stats:?}"
    );
    assert!(
        stats[1].failures >= 1 && stats[1].successes == 0,
        "{stats:?}"
    );
    assert_eq!(
        stats[2].successes, 20,
        "20 stages (the login is part of the first): {stats:?}"
    );
    assert!(stats[0].ejected && stats[1].ejected && !stats[2].ejected);
    assert!(stats[2].latency_us_total > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_node_is_ejected_then_probed_back() {
    let (sim, nodes) = sim(2).await;
    nodes[0].set_failure_fraction(1.0);
    let mut s = settings(&urls(&nodes));
    s.eject = Duration::from_millis(400);
    let client = ScoutClient::new(s).unwrap();
    for i in 0..10 {
        client.stage(&paths(1, 10), &i.to_string()).await.unwrap();
    }
    assert_eq!(nodes[0].hits(), 1, "ejected after its first failure");
    assert!(client.node_stats()[0].ejected);

    // The node recovers; after the cool-down the rotation probes it and keeps it.
    nodes[0].set_failure_fraction(0.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..10 {
        client.stage(&paths(1, 10), &i.to_string()).await.unwrap();
    }
    let stats = client.node_stats();
    assert!(!stats[0].ejected, "{stats:?}");
    assert!(stats[0].successes >= 4, "back in the rotation: {stats:?}");
    assert_eq!(sim.counters().stage_requests, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_down_is_unavailable_after_retries_and_cancel_is_best_effort() {
    let dead = vec![dead_url().await, dead_url().await];
    let client = ScoutClient::new(settings(&dead)).unwrap();
    let err = client.stage(&paths(1, 10), "1").await.unwrap_err();
    // Two nodes, three rounds (the first and two retries).
    assert!(
        matches!(err, ScoutError::Unavailable { attempts: 6, .. }),
        "{err}"
    );
    assert!(!client.cancel(&paths(3, 10), "1").await);
    assert_eq!(client.counters().cancel_failures, 1);

    let (sim, nodes) = sim(1).await;
    let client = ScoutClient::new(settings(&urls(&nodes))).unwrap();
    assert!(client.cancel(&paths(3, 10), "1").await);
    assert_eq!(sim.counters().cancel_requests, 1);
}

/// Every exchange with a node is timed under that node and its operation, answered or not:
/// a dead node's failed logins are each timed (and it never gets further), the live node
/// shows one login and each operation the calls made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exchange_is_timed_by_node_and_operation() {
    use staged::scout::Operation;
    let (_sim, nodes) = sim(1).await;
    let dead = dead_url().await;
    let client = ScoutClient::new(settings(&[dead.clone(), nodes[0].url()])).unwrap();
    let staged = paths(2, 10);
    client.stage(&staged, "1").await.unwrap();
    client.file_status(&staged[0]).await.unwrap();
    client.cache_state().await.unwrap();
    assert!(client.cancel(&staged, "1").await);

    let stats = client.node_stats();
    // The family as a scrape encodes it: a histogram's count is only read that way.
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("r", "r", client.request_seconds().clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let count = |node: &str, operation: Operation| -> u64 {
        let series = format!(
            "r_count{{node=\"{node}\",operation=\"{}\"}} ",
            operation.as_str()
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |v| v.parse().unwrap())
    };
    let (dead_stats, live) = (&stats[0], &stats[1].base);
    assert_eq!(
        count(&dead_stats.base, Operation::Login),
        dead_stats.failures
    );
    assert_eq!(count(live, Operation::Login), 1);
    for op in [
        Operation::Stage,
        Operation::FileStatus,
        Operation::CacheState,
        Operation::Cancel,
    ] {
        assert_eq!(count(&dead_stats.base, op), 0, "{}", op.as_str());
        assert_eq!(count(live, op), 1, "{}", op.as_str());
    }
}

/// Tokens good only on the node that issued them, and a node that refuses every token: each
/// node logs in for itself, the forbidding node is a failure of that node, and every call is
/// served by the others (never a 403 refusal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_tokens_and_a_forbidding_node() {
    let (sim, nodes) = sim_with(
        3,
        SimSettings {
            per_node_tokens: true,
            ..SimSettings::default()
        },
    )
    .await;
    nodes[1].set_forbidden_fraction(1.0);
    let client = ScoutClient::new(settings(&urls(&nodes))).unwrap();
    for i in 0..30 {
        client.stage(&paths(1, 10), &i.to_string()).await.unwrap();
        client.file_status(&format!("f/{i}")).await.unwrap();
    }
    assert_eq!(sim.counters().stage_requests, 30);
    let stats = client.node_stats();
    assert_eq!(stats[1].successes, 0, "{stats:?}");
    assert!(client.counters().forbidden_after_login >= 1);
    assert_eq!(client.counters().refusals, 0);
    // Every node refuses every token: the tape system is unavailable, not refusing.
    for n in &nodes {
        n.set_forbidden_fraction(1.0);
    }
    let err = client.stage(&paths(1, 10), "x").await.unwrap_err();
    assert!(matches!(err, ScoutError::Unavailable { .. }), "{err}");
}

/// A node answering 200 with an HTML page (a proxy in front of it) is a failure of that
/// node, whether to a login, a stage request or a file status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_something_not_json_is_passed_over() {
    let (sim, nodes) = sim(3).await;
    nodes[0].set_garbage_fraction(1.0);
    let client = ScoutClient::new(settings(&urls(&nodes))).unwrap();
    for i in 0..10 {
        client.stage(&paths(1, 10), &i.to_string()).await.unwrap();
        assert_eq!(client.file_status("f").await.unwrap().offlineblocks, 16);
    }
    assert_eq!(
        sim.counters().stage_requests,
        10,
        "every stage reached a real node"
    );
    assert_eq!(client.node_stats()[0].successes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_state_accepts_numbers_as_strings() {
    let (sim, nodes) = sim(1).await;
    let client = ScoutClient::new(settings(&urls(&nodes))).unwrap();
    sim.set_cache_state(json!({
        "availdatasz": "12345", "health": "2", "healthstatus": "warning",
        "releaseable": 7, "nonreleaseable": "8", "pending": 0, "totdatasz": "99999",
    }));
    let c = client.cache_state().await.unwrap();
    assert_eq!(c.availdatasz, Some(12345));
    assert_eq!(c.health, Some(2));
    assert_eq!(c.healthstatus.as_deref(), Some("warning"));
    assert_eq!(c.releaseable, Some(7));
    assert_eq!(c.nonreleaseable, Some(8));
    assert_eq!(c.pending, Some(0));
    assert_eq!(c.totdatasz, Some(99999));
}

both_backends!(filestatus_and_stats_ask_scout);

async fn filestatus_and_stats_ask_scout(kind: Kind) {
    let (sim, nodes) = sim(2).await;
    let nodes = Arc::new(nodes);
    let node_urls = urls(&nodes);
    let app = TestApp::start_with(kind, |c| {
        c.scout.nodes = node_urls.clone();
        c.scout.username = SimSettings::default().username;
        c.scout.password = Some(
            toml::Value::String(SimSettings::default().password)
                .try_into()
                .unwrap(),
        );
        c.scout.request_timeout_secs = 1.0;
        c.scout.retries = 0;
    })
    .await;
    sim.set_file("on/disk", FileState::Online);
    for path in ["/filestatus/", "/filestatus"] {
        let r = app
            .http
            .post(app.url(path))
            .json(&json!({"files": ["on/disk", "on/tape"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body, json!({"on/disk": true, "on/tape": false}));
    }
    sim.set_file("gone", FileState::Missing);
    let r = app
        .http
        .post(app.url("/filestatus/"))
        .json(&json!({"files": ["on/disk", "gone"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["errormsg"].as_str().unwrap().contains("gone"),
        "{body}"
    );

    let (status, stats) = app.get("/get_stats/").await;
    assert_eq!(status, 200);
    assert_eq!(stats["availdatasz"], json!(500_000_000_000_i64));
    assert_eq!(stats["health"], json!(1));
    assert_eq!(stats["healthstatus"], json!("ok"));
    assert_eq!(stats["nonreleaseable"], json!(2000));
    assert_eq!(stats["kafka_alive"], json!(false), "no Kafka configured");

    // Scout stops answering: the figures are null, the rest is still served.
    let nodes = Arc::try_unwrap(nodes).ok().unwrap();
    for n in nodes {
        n.shutdown().await;
    }
    let (status, stats) = app.get("/get_stats/").await;
    assert_eq!(status, 200);
    assert_eq!(stats["availdatasz"], json!(null));
    assert_eq!(stats["health"], json!(null));
    assert!(stats["completed_jobs"].is_i64());
    app.stop().await;
}

/// Many `/filestatus/` requests at once cost Scout no more calls in flight than
/// `server.filestatus_concurrency`, and a request naming more files than
/// `server.max_filestatus_files` is refused before Scout is asked anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filestatus_is_bounded_across_requests() {
    let sim = ScoutSim::new(SimSettings {
        file_status_delay: Duration::from_millis(50),
        ..SimSettings::default()
    })
    .unwrap();
    let node = sim.serve_loopback().await.unwrap();
    let app = Arc::new(
        TestApp::start_with(Kind::Sqlite, |c| {
            c.scout.nodes = vec![node.url()];
            c.scout.username = SimSettings::default().username;
            c.scout.password = Some(
                toml::Value::String(SimSettings::default().password)
                    .try_into()
                    .unwrap(),
            );
            c.server.max_filestatus_files = 40;
            c.server.filestatus_concurrency = 4;
        })
        .await,
    );
    let post = |files: Vec<String>| {
        let app = app.clone();
        async move {
            let r = app
                .http
                .post(app.url("/filestatus/"))
                .json(&json!({ "files": files }))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };

    let too_many: Vec<String> = (0..41).map(|i| format!("f/{i}")).collect();
    let (status, body) = post(too_many).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["errormsg"]
            .as_str()
            .unwrap()
            .contains("server.max_filestatus_files"),
        "{body}"
    );
    assert_eq!(sim.counters().file_status_requests, 0, "Scout was asked");

    let clients: Vec<_> = (0..8)
        .map(|c| {
            let files: Vec<String> = (0..40).map(|i| format!("c{c}/{i}")).collect();
            tokio::spawn(post(files))
        })
        .collect();
    for client in clients {
        let (status, body) = client.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body.as_object().unwrap().len(), 40);
    }
    let c = sim.counters();
    assert_eq!(c.file_status_requests, 8 * 40);
    assert!(
        c.most_file_status_in_flight <= 4,
        "{} Scout calls in flight at once",
        c.most_file_status_in_flight
    );
    println!(
        "8 requests of 40 files: at most {} Scout calls at once",
        c.most_file_status_in_flight
    );
    Arc::try_unwrap(app).ok().unwrap().stop().await;
}
