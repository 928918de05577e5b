//! The wasmtime policy for adapters, in one place: every engine knob and every bound on a
//! call, each with its reason.
//!
//! Invariant: no adapter call runs without all of these bounds: wall time (epoch deadline
//! and a tokio timeout), linear memory (a store limiter), wasm stack, the bytes handed in
//! and handed back, and the time and size of its HTTP answers.

use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::config::AdapterConfig;

/// How often the epoch ticks. A running call notices its deadline (and yields to the tokio
/// scheduler) at most this late, so an adapter in a loop holds a worker thread for at most
/// one tick at a time.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Deepest wasm stack: recursion beyond this traps instead of reaching the host's stack.
const MAX_WASM_STACK: usize = 1024 * 1024;

/// The fiber stack an async call runs on: the wasm stack plus room for host functions.
const ASYNC_STACK: usize = MAX_WASM_STACK + 1024 * 1024;

/// Calls that may run at the same time (the pooling allocator's slots); further calls wait
/// for a slot, so a burst queues instead of failing. The call timeout is wall time, so
/// callers should still keep their own concurrency near the number of cores.
pub const POOL_INSTANCES: u32 = 256;

/// Table elements per instance: Rust guests use a few hundred for indirect calls.
pub const MAX_TABLE_ELEMENTS: usize = 20_000;

/// Longest log line an adapter may write; the rest is cut.
pub const MAX_LOG_BYTES: usize = 4096;

/// The bounds one call runs under, from `[adapter]`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub call_timeout: Duration,
    pub memory_bytes: usize,
    pub max_input_bytes: usize,
    pub max_output_bytes: usize,
    pub http_timeout: Duration,
    pub http_max_response_bytes: usize,
}

impl Limits {
    /// The bounds `[adapter]` gives; its values were checked by [`AdapterConfig::check`].
    pub fn from_config(c: &AdapterConfig) -> Limits {
        Limits {
            call_timeout: Duration::from_millis(c.call_timeout_ms),
            memory_bytes: c.memory_limit_bytes,
            max_input_bytes: c.max_input_bytes,
            max_output_bytes: c.max_output_bytes,
            http_timeout: Duration::from_millis(c.http_timeout_ms),
            http_max_response_bytes: c.http_max_response_bytes,
        }
    }

    /// Epoch ticks a call may run before it is interrupted.
    pub fn deadline_ticks(&self) -> u64 {
        (self.call_timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }
}

fn base_config(limits: &Limits) -> Config {
    let mut c = Config::new();
    // Interfaces, not raw modules, are the contract (wit/adapter.wit).
    c.wasm_component_model(true);
    // Wall-time bound at the cost of a counter check per loop, unlike fuel's per-instruction
    // cost; the same check is where a long call yields to tokio.
    c.epoch_interruption(true);
    c.max_wasm_stack(MAX_WASM_STACK);
    c.async_stack_size(ASYNC_STACK);
    // Reserve only what the memory limit allows: many engines (tests start several
    // daemons in one process) must fit in the address space, and a memory never needs to
    // grow past the limit anyway. Explicit bounds checks cost little for this workload.
    let reservation = (limits.memory_bytes as u64).next_multiple_of(64 * 1024);
    c.memory_reservation(reservation);
    c.memory_guard_size(64 * 1024);
    c.memory_reservation_for_growth(0);
    c
}

/// The engine every adapter of this daemon runs on. The pooling allocator makes a fresh
/// instance per call cheap (~10 µs); where the machine refuses its address-space
/// reservation, instances are allocated on demand instead.
pub fn engine(limits: &Limits) -> anyhow::Result<(Engine, &'static str)> {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(POOL_INSTANCES)
        // A Rust wasip2 component holds a handful of core instances and memories (its own
        // and the WASI shims').
        .total_core_instances(POOL_INSTANCES * 8)
        .total_memories(POOL_INSTANCES * 2)
        .total_tables(POOL_INSTANCES * 4)
        .total_stacks(POOL_INSTANCES)
        .max_memory_size(limits.memory_bytes)
        .table_elements(MAX_TABLE_ELEMENTS);
    let mut pooled = base_config(limits);
    pooled.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    match Engine::new(&pooled) {
        Ok(engine) => Ok((engine, "pooling")),
        Err(e) => {
            tracing::warn!(error = %e, "pooling allocator unavailable; allocating adapter instances on demand");
            Ok((Engine::new(&base_config(limits))?, "on-demand"))
        }
    }
}

/// Advances `engine`'s epoch every [`EPOCH_TICK`] until the engine is dropped.
pub fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("adapter-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        });
    if let Err(e) = spawned {
        // Without a ticker no deadline fires; the tokio timeout still bounds each call.
        tracing::error!(error = %e, "cannot start the adapter epoch ticker");
    }
}
