//! Builds the running service from a [`Config`]: store, HTTP listener, graceful stop.
//!
//! Tests start the same service in-process on port 0 with [`start`], so what they exercise is
//! what `staged serve` runs.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{self, AppState};
use crate::config::{Config, redact_url};
use crate::store::{Store, StoreOptions};

/// A started service.
pub struct Server {
    pub addr: SocketAddr,
    pub store: Store,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
    grace: Duration,
}

/// Opens the store (applying migrations) and starts serving on `config.server.listen`.
pub async fn start(config: &Config) -> anyhow::Result<Server> {
    let opts = StoreOptions::from_config(
        &config.database,
        Duration::from_secs(config.jobs.expiry_secs),
    );
    let store = Store::open(&opts)
        .await
        .with_context(|| format!("opening the store at {}", redact_url(&config.database.url)))?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("listening on {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    let app = api::router(AppState::new(store.clone(), config));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    tracing::info!(%addr, store = store.backend_name(), "staged is listening");
    Ok(Server {
        addr,
        store,
        stop: Some(stop),
        task,
        grace: Duration::from_secs(config.server.shutdown_grace_secs),
    })
}

impl Server {
    /// Stops accepting connections, lets in-flight requests finish (up to the grace
    /// period), then closes the store.
    pub async fn stop(mut self) -> anyhow::Result<()> {
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
        self.store.close().await;
        Ok(())
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
