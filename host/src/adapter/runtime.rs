//! One call into an adapter: a fresh store, the host imports it may use, and the
//! translation of whatever went wrong into an [`AdapterError`].
//!
//! Invariant: a store serves exactly one export call and is dropped after it, whatever the
//! outcome, so a trap, a timeout or a guest's corrupted state never reaches another call.
//!
//! Two sets of bindings: the current package version (`wit/adapter.wit`) and, in [`v1_0`],
//! version 1.0.0 (`wit/1.0.0/adapter.wit`), for components built against it. The linker
//! defines only the current `host` interface: wasmtime resolves a component's import of
//! `host@1.0.0` to it by semver, which is sound because `host` did not change. The exports
//! differ (a 1.0.0 `resolve-error` has one case fewer, and wasmtime checks variants case by
//! case), so a component is typed against one set or the other at load.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

use super::error::AdapterError;
use super::policy::{Limits, MAX_LOG_BYTES, MAX_TABLE_ELEMENTS};
use crate::allow_list::AllowList;

wasmtime::component::bindgen!({
    path: "../wit",
    world: "adapter",
    imports: { "staging:adapter/host.http-get": async },
    exports: { default: async },
});

pub use staging::adapter::host::{HttpResponse, Level};
pub use staging::adapter::types::ResolveError as WitResolveError;

/// Bindings of `staging:adapter@1.0.0`, used only for the exports of components built
/// against it; their imports are served by the current `host` (see the module docs).
pub mod v1_0 {
    wasmtime::component::bindgen!({
        path: "../wit/1.0.0",
        world: "adapter",
        imports: { "staging:adapter/host.http-get": async },
        exports: { default: async },
    });

    pub use staging::adapter::types::ResolveError as WitResolveError;
}

/// Compiled and linked bindings of either version, instantiable into a call's store.
pub trait Bindings: Send + Sync + 'static {
    type Instance: Send + Sync;
    fn engine(&self) -> &wasmtime::Engine;
    fn instantiate<'a>(&'a self, store: &'a mut Store<CallState>)
    -> CallFuture<'a, Self::Instance>;
}

impl Bindings for AdapterPre<CallState> {
    type Instance = Adapter;
    fn engine(&self) -> &wasmtime::Engine {
        AdapterPre::engine(self)
    }
    fn instantiate<'a>(&'a self, store: &'a mut Store<CallState>) -> CallFuture<'a, Adapter> {
        Box::pin(self.instantiate_async(store))
    }
}

impl Bindings for v1_0::AdapterPre<CallState> {
    type Instance = v1_0::Adapter;
    fn engine(&self) -> &wasmtime::Engine {
        v1_0::AdapterPre::engine(self)
    }
    fn instantiate<'a>(&'a self, store: &'a mut Store<CallState>) -> CallFuture<'a, v1_0::Adapter> {
        Box::pin(self.instantiate_async(store))
    }
}

/// What every call of one loaded adapter shares: read-only after load.
pub struct Shared {
    pub name: String,
    pub limits: Limits,
    pub allow: AllowList,
    pub settings_json: String,
    pub http: reqwest::Client,
    /// Instance slots of the engine, shared by every adapter loaded on it (the old one
    /// keeps running calls while a new one is swapped in).
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Call times and failures, shared by every adapter loaded from the same source.
    pub metrics: super::call_metrics::AdapterMetrics,
}

/// The data of one call's store.
pub struct CallState {
    shared: Arc<Shared>,
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    /// Bytes the guest has pulled in through `http-get` so far this call, so that many
    /// small answers cannot add up to more than one large one.
    http_bytes: usize,
}

/// Refuses memory growth past the limit, remembering the request so that the error says
/// what happened instead of "unreachable".
struct MemoryLimiter {
    limit: usize,
    exceeded: Option<usize>,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exceeded = Some(desired);
            // An error traps the guest at the growth itself; `false` would let its
            // allocator abort somewhere less telling.
            return Err(wasmtime::Error::msg("memory limit exceeded"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Clocks frozen at zero: an adapter has no business knowing the time, and a frozen clock
/// keeps its answers reproducible.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }
    fn now(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

impl CallState {
    fn new(shared: Arc<Shared>) -> CallState {
        // What a wasm32-wasip2 component needs in order to instantiate, and nothing it
        // could use: no preopens, env or args, stdin closed and output discarded (the
        // builder's defaults), no sockets, frozen clocks.
        let wasi = WasiCtx::builder()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .build();
        let limit = shared.limits.memory_bytes;
        CallState {
            shared,
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                limit,
                exceeded: None,
            },
            http_bytes: 0,
        }
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl staging::adapter::types::Host for CallState {}

impl staging::adapter::host::Host for CallState {
    async fn http_get(&mut self, url: String) -> Result<HttpResponse, String> {
        let shared = self.shared.clone();
        let budget = shared
            .limits
            .http_max_response_bytes
            .saturating_sub(self.http_bytes);
        let result = http_get(&shared, &url, budget).await;
        match &result {
            Ok(r) => {
                self.http_bytes += r.body.len();
                tracing::debug!(adapter = %shared.name, %url, status = r.status, bytes = r.body.len(), "adapter GET");
            }
            Err(e) => {
                tracing::warn!(adapter = %shared.name, %url, error = %e, "adapter GET failed")
            }
        }
        result
    }

    fn log(&mut self, level: Level, message: String) {
        let mut message = message;
        if message.len() > MAX_LOG_BYTES {
            let mut cut = MAX_LOG_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("…[cut]");
        }
        let adapter = self.shared.name.as_str();
        match level {
            Level::Debug => tracing::debug!(adapter, "{message}"),
            Level::Info => tracing::info!(adapter, "{message}"),
            Level::Warn => tracing::warn!(adapter, "{message}"),
            Level::Error => tracing::error!(adapter, "{message}"),
        }
    }

    fn settings(&mut self) -> String {
        self.shared.settings_json.clone()
    }
}

/// Starts the reason of an `http-get` error that asking again cannot cure (the WIT's
/// contract since 1.1.0); any other error may pass.
const REFUSED: &str = "refused: ";

/// The allow-listed GET: no redirects, bounded in time and, while streaming, in size.
async fn http_get(shared: &Shared, url: &str, budget: usize) -> Result<HttpResponse, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{REFUSED}not a URL: {e}"))?;
    if !shared.allow.allows(&parsed) {
        return Err(format!(
            "{REFUSED}{} is not in the adapter's HTTP allow-list ({})",
            crate::config::redact_url(url),
            shared.allow
        ));
    }
    let fetch = async {
        let resp = shared
            .http
            .get(parsed)
            .send()
            .await
            .map_err(|e| request_error(&e, shared))?;
        let status = resp.status().as_u16();
        if let Some(len) = resp.content_length()
            && len > budget as u64
        {
            return Err(format!(
                "{REFUSED}the answer of {len} bytes is over the limit of {budget}"
            ));
        }
        let mut body = Vec::new();
        let mut resp = resp;
        while let Some(chunk) = resp.chunk().await.map_err(|e| request_error(&e, shared))? {
            if body.len() + chunk.len() > budget {
                return Err(format!(
                    "{REFUSED}the answer is over the limit of {budget} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpResponse { status, body })
    };
    match tokio::time::timeout(shared.limits.http_timeout, fetch).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no complete answer within {:?}",
            shared.limits.http_timeout
        )),
    }
}

fn request_error(e: &reqwest::Error, shared: &Shared) -> String {
    if e.is_timeout() {
        format!("no complete answer within {:?}", shared.limits.http_timeout)
    } else {
        // reqwest's own message stops at the outermost layer; the cause says why.
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        msg
    }
}

/// A future borrowing the instance and its store, as the generated bindings return.
pub type CallFuture<'a, R> = Pin<Box<dyn Future<Output = wasmtime::Result<R>> + Send + 'a>>;

/// Runs one export in a fresh store: instantiate, call, classify the outcome. The store is
/// dropped when this returns. The call is timed from when it has its instance slot (the
/// time its budget counts), and a failure counted, in `shared.metrics`.
pub async fn call<B: Bindings, R: Send>(
    pre: &B,
    shared: &Arc<Shared>,
    export: &'static str,
    f: impl for<'a> FnOnce(&'a B::Instance, &'a mut Store<CallState>) -> CallFuture<'a, R> + Send,
) -> Result<R, AdapterError> {
    // Never closed: the semaphore lives as long as the engine.
    let _slot = shared.slots.acquire().await.ok();
    let started = Instant::now();
    let out = call_in_slot(pre, shared, export, started, f).await;
    shared
        .metrics
        .called(export, started.elapsed().as_secs_f64());
    out.map_err(|e| shared.metrics.failed(e))
}

async fn call_in_slot<B: Bindings, R: Send>(
    pre: &B,
    shared: &Arc<Shared>,
    export: &'static str,
    started: Instant,
    f: impl for<'a> FnOnce(&'a B::Instance, &'a mut Store<CallState>) -> CallFuture<'a, R> + Send,
) -> Result<R, AdapterError> {
    let limits = &shared.limits;
    let mut store = Store::new(pre.engine(), CallState::new(shared.clone()));
    store.limiter(|s| &mut s.limiter);
    // Tick by tick, yielding to tokio each time, until the call's budget is spent.
    let budget = limits.call_timeout;
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if started.elapsed() >= budget {
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
    let name = || shared.name.clone();
    let run = async {
        let instance = pre.instantiate(&mut store).await.map_err(|e| (true, e))?;
        f(&instance, &mut store).await.map_err(|e| (false, e))
    };
    // The tokio timeout covers what the epoch cannot: time spent awaiting host imports.
    let outcome = tokio::time::timeout(budget, run).await;
    let exceeded = store.data().limiter.exceeded;
    match outcome {
        Ok(Ok(r)) => Ok(r),
        Err(_) => Err(AdapterError::Timeout {
            adapter: name(),
            export,
            limit: budget,
        }),
        Ok(Err((instantiating, e))) => {
            if let Some(requested) = exceeded {
                return Err(AdapterError::MemoryExceeded {
                    adapter: name(),
                    export,
                    requested,
                    limit: limits.memory_bytes,
                });
            }
            if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                return Err(AdapterError::Timeout {
                    adapter: name(),
                    export,
                    limit: budget,
                });
            }
            // The first line names the trap; the wasm backtrace that follows is for
            // debug logs only.
            let full = format!("{e:?}");
            tracing::debug!(adapter = %shared.name, export, error = %full, "adapter call failed");
            let message = trap_summary(&e);
            if instantiating {
                Err(AdapterError::Instantiate {
                    adapter: name(),
                    export,
                    message,
                })
            } else {
                Err(AdapterError::Trap {
                    adapter: name(),
                    export,
                    message,
                })
            }
        }
    }
}

fn trap_summary(e: &wasmtime::Error) -> String {
    crate::error_text::join(e.chain())
}
