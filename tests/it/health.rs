//! `/livez`, `/healthz` and `/readyz` against real parts: each readiness check is made to
//! fail for real (a database server crashed, a migration missing, a broker that is not
//! there, Scout nodes that refuse connections) and to recover where the fault goes away,
//! while liveness stays 200 throughout.

use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::Connection;
use staged_testkit::pg::Cluster;

use crate::common::{Kind, NO_CALLBACK, TestApp, files_job, poll_until, wait_for};

both_backends!(a_plain_daemon_is_live_and_ready);

/// Readiness as the endpoint gives it: status and body.
async fn readyz(app: &TestApp) -> (u16, Value) {
    app.get("/readyz").await
}

/// The named check of a `/readyz` body.
fn check<'a>(body: &'a Value, name: &str) -> Option<&'a Value> {
    body["checks"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

async fn a_plain_daemon_is_live_and_ready(kind: Kind) {
    let app = TestApp::start(kind).await;
    for path in ["/livez", "/healthz"] {
        let (status, body) = app.get(path).await;
        assert_eq!((status, &body["status"]), (200, &"ok".into()), "{path}");
    }
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true);
    assert!(body.get("errormsg").is_none(), "{body}");
    // Only what this configuration has is checked.
    let names: Vec<&str> = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["store"]);
    let (_, doc) = app.get("/openapi.json").await;
    for path in ["/livez", "/readyz"] {
        assert!(doc["paths"].get(path).is_some(), "{path} not documented");
    }
    app.stop().await;
}

/// The database server crashes: readiness says so within its bound and liveness does not;
/// when the server is back, the daemon is ready again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database_server() {
    let cluster = Cluster::start().expect("a PostgreSQL server of the test's own");
    let url = cluster.url();
    let app = TestApp::start_with(Kind::Sqlite, |c| c.database.url = url.clone()).await;
    assert_eq!(readyz(&app).await.0, 200);

    tokio::task::block_in_place(|| cluster.crash()).expect("crashing the server");
    let asked = Instant::now();
    let (status, body) = readyz(&app).await;
    let took = asked.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(check(&body, "store").unwrap()["ready"], false, "{body}");
    assert!(
        body["errormsg"]
            .as_str()
            .unwrap()
            .starts_with("not ready: store: "),
        "{body}"
    );
    assert!(
        took < Duration::from_secs(10),
        "a probe took {took:?} with the database gone"
    );
    assert_eq!(
        app.get("/livez").await.0,
        200,
        "liveness checks no dependency"
    );

    tokio::task::block_in_place(|| cluster.restart()).expect("restarting the server");
    wait_for(
        "readiness after the database came back",
        Duration::from_secs(30),
        async || readyz(&app).await.0 == 200,
    )
    .await;
    app.stop().await;
}

/// A database whose newest migration is not applied (an older build's) is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_needs_every_migration() {
    let app = TestApp::start(Kind::Sqlite).await;
    assert_eq!(readyz(&app).await.0, 200);
    let mut conn = sqlx::SqliteConnection::connect(&app.db.url).await.unwrap();
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    let reason = check(&body, "store").unwrap()["reason"].as_str().unwrap();
    assert!(reason.contains("this build needs"), "{reason}");
    app.stop().await;
}

/// A consumer with no broker to reach is not ready, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_a_consumer_without_a_broker() {
    let dead = crate::common::daemon::free_port();
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        c.kafka = crate::common::pipeline::kafka_config(&format!("127.0.0.1:{dead}"), "nobody");
    })
    .await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    let kafka = check(&body, "kafka").expect("a kafka check");
    assert_eq!(kafka["ready"], false);
    assert!(
        body["errormsg"].as_str().unwrap().contains("kafka: "),
        "{body}"
    );
    assert_eq!(check(&body, "store").unwrap()["ready"], true, "{body}");
    assert_eq!(app.get("/livez").await.0, 200);
    app.stop().await;
}

/// Scout nodes that refuse connections are ejected as the engine tries them: the daemon is
/// then not ready, naming the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_ejected_scout_nodes() {
    let ports = [
        crate::common::daemon::free_port(),
        crate::common::daemon::free_port(),
    ];
    let app = TestApp::start_with(Kind::Sqlite, |c| {
        c.scout.nodes = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}/"))
            .collect();
        c.scout.username = "scout".into();
        c.scout.password = Some(crate::common::pipeline::secret("scout-pw"));
        c.scout.retries = 1;
        c.scout.backoff_initial_ms = 50;
    })
    .await;
    let (status, body) = readyz(&app).await;
    assert_eq!(
        status, 200,
        "nodes are presumed healthy until tried: {body}"
    );
    assert_eq!(
        app.post_job(files_job(1, ["a/1"], NO_CALLBACK)).await.0,
        202
    );
    let mut last = Value::Null;
    let named = poll_until(Duration::from_secs(30), async || {
        let (status, body) = readyz(&app).await;
        let scout_down = check(&body, "scout").is_some_and(|c| c["ready"] == false);
        last = body;
        status == 503 && scout_down
    })
    .await;
    assert!(
        named,
        "the ejected nodes never made the daemon unready: {last}"
    );
    let reason = check(&last, "scout").unwrap()["reason"].as_str().unwrap();
    for port in ports {
        assert!(reason.contains(&format!("127.0.0.1:{port}")), "{reason}");
    }
    app.stop().await;
}
