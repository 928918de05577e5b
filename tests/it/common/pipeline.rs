//! The tape system and ASVO as tests see them: the Scout simulator on loopback publishing to
//! a mock Kafka cluster in the test process, and a callback receiver recording what the
//! daemon sends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use serde_json::Value;
use staged::config::{Config, KafkaConfig, Secret};
use staged_testkit::scout::{ScoutSim, SimNode, SimSettings};

pub const TOPIC: &str = "recalls";

/// One callback as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub auth: Option<String>,
    pub body: Value,
    pub at: Instant,
}

/// An HTTP endpoint standing in for ASVO: records every callback and answers with a
/// status the test controls.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    pub calls: Arc<Mutex<Vec<(Received, u16)>>>,
    pub status: Arc<AtomicU16>,
    /// Answer 500 to this many calls first.
    pub fail_first: Arc<AtomicUsize>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Receiver {
            addr: listener.local_addr().unwrap(),
            calls: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            fail_first: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/cb", post(record))
            .with_state(r.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        r
    }

    pub fn url(&self) -> String {
        format!("http://{}/cb", self.addr)
    }

    /// Callbacks answered 200, i.e. delivered.
    pub fn delivered(&self) -> Vec<Received> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| *s == 200)
            .map(|(r, _)| r.clone())
            .collect()
    }

    pub fn attempts(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    pub async fn wait_delivered(&self, n: usize, limit: Duration) -> Vec<Received> {
        let deadline = Instant::now() + limit;
        loop {
            let d = self.delivered();
            if d.len() >= n || Instant::now() > deadline {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn record(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    let status = if r
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        500
    } else {
        r.status.load(Ordering::SeqCst)
    };
    let received = Received {
        auth: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: serde_json::from_str(&body).unwrap_or(Value::Null),
        at: Instant::now(),
    };
    r.calls.lock().unwrap().push((received, status));
    StatusCode::from_u16(status).unwrap()
}

/// The tape system: the Scout simulator on one node, publishing to a mock Kafka cluster.
/// Fields drop in order: the simulator's producer before the cluster.
pub struct Tape {
    pub sim: ScoutSim,
    pub node: SimNode,
    pub cluster: MockCluster<'static, DefaultProducerContext>,
}

impl Tape {
    pub async fn start(tweak: impl FnOnce(&mut SimSettings)) -> Tape {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic(TOPIC, 2, 1).unwrap();
        let mut settings = SimSettings {
            kafka_brokers: Some(cluster.bootstrap_servers()),
            default_topic: TOPIC.into(),
            recall_delay: Duration::from_millis(50),
            ..SimSettings::default()
        };
        tweak(&mut settings);
        let sim = ScoutSim::new(settings).unwrap();
        let node = sim.serve_loopback().await.unwrap();
        Tape { sim, node, cluster }
    }

    /// Points a daemon's config at this tape system.
    pub fn configure(&self, c: &mut Config) {
        c.scout.nodes = vec![self.node.url()];
        c.scout.username = "scout".into();
        c.scout.password = Some(secret("scout-pw"));
        c.scout.retries = 1;
        c.scout.backoff_initial_ms = 50;
        c.kafka = KafkaConfig {
            brokers: vec![self.cluster.bootstrap_servers()],
            topic: TOPIC.into(),
            group_id: format!("g{}", rand::random::<u32>()),
            batch_max_wait_ms: 20,
            ..KafkaConfig::default()
        };
        for (k, v) in [
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "300"),
            ("fetch.wait.max.ms", "20"),
            ("topic.metadata.refresh.interval.ms", "1000"),
        ] {
            c.kafka.extra.insert(k.into(), v.into());
        }
    }
}

pub fn secret(s: &str) -> Secret {
    toml::from_str::<toml::Table>(&format!("v = {s:?}")).unwrap()["v"]
        .clone()
        .try_into()
        .unwrap()
}
