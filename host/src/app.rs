//! Builds the running service from a [`Config`]: store, HTTP listener (bounded, see
//! [`api::serve`]), graceful stop.
//!
//! Tests start the same service in-process on port 0 with [`start`], so what they exercise is
//! what `staged serve` runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::adapter::Adapters;
use crate::api;
use crate::config::{Config, redact_url};
use crate::engine::{self, Engine};
use crate::kafka;
use crate::scout::{ScoutClient, ScoutSettings};
use crate::store::{Store, StoreOptions};

/// A started service.
pub struct Server {
    pub addr: SocketAddr,
    pub store: Store,
    /// The telescope adapter in service (hot-swappable).
    pub adapters: Adapters,
    /// The API's TLS certificate, with `[server.tls]` (reloadable).
    pub tls: Option<api::tls::Tls>,
    /// Reloads the adapter, the TLS certificate and the API tokens on SIGHUP while the server runs.
    reload_on_hup: JoinHandle<()>,
    /// Samples the dashboard's throughput.
    sampler: JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    ingest: Option<kafka::IngestHandle>,
    engine: Option<Engine>,
    grace: Duration,
}

/// Opens the store (applying migrations) and starts serving on `config.server.listen`.
pub async fn start(config: &Config) -> anyhow::Result<Server> {
    if let Some(risk) = crate::auth::unauthenticated_exposure(&config.server)
        && !config.server.allow_unauthenticated
    {
        anyhow::bail!(
            "{risk}; add [[server.auth.tokens]] (see the README's \"Securing staged\"), listen on loopback, \
             or set server.allow_unauthenticated = true if something in front of the daemon checks callers"
        );
    }
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let opts = StoreOptions::from_config(&config.database, &config.jobs);
    let store = Store::open(&opts)
        .await
        .with_context(|| format!("opening the store at {}", redact_url(&config.database.url)))?;
    // A configured adapter that does not load stops the start: jobs with `obs` would
    // otherwise be refused for a reason the operator may not see.
    let adapters = Adapters::from_config(&config.adapter)
        .await
        .context("loading the telescope adapter")?;
    let tls = config.server.tls.as_ref().map(api::tls::Tls::from_config);
    let tls = tls.transpose().context("loading [server.tls]")?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("listening on {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    let scout = match config.scout.nodes.is_empty() {
        true => None,
        false => Some(
            ScoutSettings::from_config(&config.scout, &config.kafka.topic)
                .and_then(ScoutClient::new)
                .context("setting up the Scout client")?,
        ),
    };
    // The adapter maps the tape system's names to job paths (identity without one).
    let ingest = match config.kafka.brokers.is_empty() {
        true => None,
        false => Some(
            kafka::start_with(
                kafka_client(&config.kafka, addr),
                kafka::IngestSettings::from_config(&config.kafka),
                store.clone(),
                Arc::new(kafka::AdapterMapper(adapters.clone())),
            )
            .context("starting the Kafka consumer")?,
        ),
    };
    let mut parts = engine::peers::parts(scout.clone(), adapters.clone());
    parts.ingest = ingest.as_ref().map(|i| i.status());
    let engine = Engine::start(store.clone(), config, parts);
    let mut state = api::AppParts::new(store.clone(), config);
    state.adapters = adapters.clone();
    state.scout = scout;
    state.kafka = ingest.as_ref().map(|i| i.status());
    state.engine_counters = Some(engine.counters.clone());
    state.tape_rest = api::tape_rest::Facade::from_config(config, addr)
        .context("setting up [tape_rest]")?
        .map(Arc::new);
    if let Some(f) = &state.tape_rest {
        if f.verifier.is_on() || state.auth.is_on() {
            tracing::info!(endpoint = %f.endpoint, "serving the WLCG Tape REST API");
        } else {
            tracing::warn!(endpoint = %f.endpoint, "serving the WLCG Tape REST API to loopback clients only: no API tokens or token issuers are configured");
        }
    }
    state.throughput_sources = api::throughput::Sources {
        engine: Some(engine.counters.clone()),
        kafka: ingest.as_ref().map(|i| i.status()),
    };
    let sampler = state
        .throughput
        .start_sampling(state.throughput_sources.clone());
    let auth = state.auth.clone();
    let facade = state.tape_rest.clone();
    let app = api::router(state.into());
    let (stop, stopped) = oneshot::channel::<()>();
    let bounds = api::serve::Bounds::from_config(&config.server);
    let task = tokio::spawn(api::serve::serve(
        listener,
        app,
        bounds,
        tls.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    tracing::info!(%addr, store = store.backend_name(), "staged is listening");
    // Caught even with no adapter to reload: SIGHUP's default action would end the daemon,
    // and a service manager's reload must not.
    let reload_on_hup = reload_on_sighup(
        adapters.clone(),
        tls.clone(),
        auth,
        facade,
        config.source.clone(),
    );
    Ok(Server {
        addr,
        store,
        adapters,
        tls,
        reload_on_hup,
        sampler,
        stop: Some(stop),
        task,
        ingest,
        engine: Some(engine),
        grace: Duration::from_secs(config.server.shutdown_grace_secs),
    })
}

impl Server {
    /// The engine's counters, for statistics and metrics (None once stopping).
    pub fn engine_counters(&self) -> Option<Arc<engine::EngineCounters>> {
        self.engine.as_ref().map(|e| e.counters.clone())
    }

    /// What the Kafka consumer sees, when `[kafka]` is configured.
    pub fn kafka_status(&self) -> Option<kafka::IngestStatus> {
        self.ingest.as_ref().map(|i| i.status())
    }

    /// Stops accepting connections, lets in-flight requests finish (up to the grace
    /// period), then closes the store.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.reload_on_hup.abort();
        self.sampler.abort();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(self.grace, &mut self.task).await {
            Ok(joined) => joined.context("HTTP server task")??,
            Err(_) => {
                tracing::warn!(grace = ?self.grace, "in-flight requests did not finish in time");
                self.task.abort();
            }
        }
        // The batch in hand is applied, and the offsets applied so far committed
        // synchronously (or the batch left for redelivery), before the store closes.
        if let Some(ingest) = self.ingest.take() {
            ingest.stop().await;
        }
        // Claimed work not finished now stays leased and is picked up after a restart.
        if let Some(engine) = self.engine.take() {
            engine.stop().await;
        }
        self.store.close().await;
        Ok(())
    }
}

/// On every SIGHUP, reloads the adapter and the TLS certificate, and reads the config file
/// again for its API tokens, telling systemd (RELOADING=1, then READY=1). A failed reload
/// keeps what is in service (and logs why); other changes to the file take effect at the
/// next start.
fn reload_on_sighup(
    adapters: Adapters,
    tls: Option<api::tls::Tls>,
    auth: api::access::Auth,
    facade: Option<Arc<api::tape_rest::Facade>>,
    source: Option<std::path::PathBuf>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = match signal(SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install the SIGHUP handler; reload with POST /admin/adapter/reload");
                    return;
                }
            };
            while hup.recv().await.is_some() {
                crate::systemd::reloading();
                if adapters.is_configured() {
                    tracing::info!("SIGHUP: reloading the adapter");
                    let _ = adapters.reload().await;
                } else {
                    tracing::info!("SIGHUP: no adapter is configured, so none to reload");
                }
                if let Some(tls) = &tls {
                    let _ = tls.reload();
                }
                if let Some(path) = &source {
                    reload_tokens(&auth, facade.as_deref(), path);
                }
                crate::systemd::ready();
            }
        }
        #[cfg(not(unix))]
        drop((adapters, tls, auth, facade, source));
    })
}

/// Puts the tokens of the config file at `path` in force, or keeps the current ones if the
/// file no longer reads.
fn reload_tokens(
    auth: &api::access::Auth,
    facade: Option<&api::tape_rest::Facade>,
    path: &std::path::Path,
) {
    match Config::load(path) {
        Ok(new) => {
            auth.replace(crate::auth::TokenTable::from_config(&new.server.auth));
            // Config::load has read the issuers' key files already; an error here is one
            // that came between the two reads.
            if let Some(f) = facade
                && let Err(e) = f.verifier.replace(&new)
            {
                tracing::error!(
                    error = format!("{e:#}"),
                    "SIGHUP: keeping the token issuers in force"
                );
            }
        }
        Err(e) => tracing::error!(
            error = format!("{e:#}"),
            "SIGHUP: the config file does not read; keeping the API tokens in force"
        ),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The Kafka client for `[kafka]`, with this daemon's `group.instance.id` (the configured
/// one, or derived from the address it listens on).
fn kafka_client(
    c: &crate::config::KafkaConfig,
    listen: std::net::SocketAddr,
) -> rdkafka::ClientConfig {
    let mut client = kafka::client_config(c);
    if c.instance_id.is_empty() && !c.extra.contains_key("group.instance.id") {
        client.set(
            "group.instance.id",
            kafka::default_instance_id(&c.client_id, listen),
        );
    }
    client
}
