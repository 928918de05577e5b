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

/// How long a pipeline test waits for a job's callback. A job takes about 4 s here, most of
/// it the consumer joining its group; a loaded CI machine has been seen to take far longer,
/// and a timing never decides a test, so the limit is generous.
pub const PIPELINE: Duration = Duration::from_secs(60);

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
    /// HTTPS only: connections whose TLS handshake failed (the client refused the
    /// certificate, or spoke no TLS).
    pub handshakes_failed: Arc<AtomicUsize>,
    scheme: &'static str,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Receiver {
            addr: listener.local_addr().unwrap(),
            calls: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            fail_first: Arc::default(),
            handshakes_failed: Arc::default(),
            scheme: "http",
        };
        let app = axum::Router::new()
            .route("/cb", post(record))
            .with_state(r.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        r
    }

    /// The same endpoint over HTTPS, presenting this certificate chain and key (PEM).
    pub async fn start_https(cert: &str, key: &str) -> Receiver {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Receiver {
            addr: listener.local_addr().unwrap(),
            calls: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            fail_first: Arc::default(),
            handshakes_failed: Arc::default(),
            scheme: "https",
        };
        let app = axum::Router::new()
            .route("/cb", post(record))
            .with_state(r.clone());
        let failed = r.handshakes_failed.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, app, failed) = (acceptor.clone(), app.clone(), failed.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        r
    }

    pub fn url(&self) -> String {
        format!("{}://{}/cb", self.scheme, self.addr)
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
        super::poll_until(limit, async || self.delivered().len() >= n).await;
        self.delivered()
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
    /// Whether the simulator publishes recall messages; a test that feeds file events
    /// itself turns it off, and then the daemon runs without a consumer.
    publishes: bool,
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
        let publishes = settings.kafka_brokers.is_some();
        let sim = ScoutSim::new(settings).unwrap();
        let node = sim.serve_loopback().await.unwrap();
        Tape {
            sim,
            node,
            cluster,
            publishes,
        }
    }

    /// Points a daemon's config at this tape system.
    pub fn configure(&self, c: &mut Config) {
        c.scout.nodes = vec![self.node.url()];
        c.scout.username = "scout".into();
        c.scout.password = Some(secret("scout-pw"));
        c.scout.retries = 1;
        c.scout.backoff_initial_ms = 50;
        c.kafka = kafka_config(
            &self.cluster.bootstrap_servers(),
            &format!("g{}", rand::random::<u32>()),
        );
        if !self.publishes {
            c.kafka.brokers.clear();
        }
    }
}

/// `[kafka]` for a mock cluster, with group timings sized for tests: a consumer joins in
/// seconds, not the production defaults' tens of seconds.
pub fn kafka_config(servers: &str, group: &str) -> KafkaConfig {
    let mut c = KafkaConfig {
        brokers: vec![servers.into()],
        topic: TOPIC.into(),
        group_id: group.into(),
        batch_max_wait_ms: 20,
        ..KafkaConfig::default()
    };
    for (k, v) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "300"),
        ("fetch.wait.max.ms", "20"),
        ("topic.metadata.refresh.interval.ms", "1000"),
    ] {
        c.extra.insert(k.into(), v.into());
    }
    c
}

/// Fast engine and callback timers, callbacks authenticated as asvo/cb-pw: what most tests
/// of the pipeline run with.
pub fn quick(c: &mut Config) {
    c.callbacks.username = "asvo".into();
    c.callbacks.password = Some(secret("cb-pw"));
    c.callbacks.error_delay_secs = 0;
    c.callbacks.retry_min_secs = 1;
    c.callbacks.retry_max_secs = 2;
    c.callbacks.timeout_secs = 5;
    c.jobs.retry_min_secs = 1;
    c.jobs.retry_max_secs = 2;
    c.jobs.sweep_interval_secs = 1;
}

pub fn secret(s: &str) -> Secret {
    toml::from_str::<toml::Table>(&format!("v = {s:?}")).unwrap()["v"]
        .clone()
        .try_into()
        .unwrap()
}
