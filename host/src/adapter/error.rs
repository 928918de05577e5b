//! What can go wrong with an adapter, typed so that the job engine can map each case to a
//! job outcome without parsing messages. Every message names the adapter.

use std::time::Duration;

/// A call into a loaded adapter failed. The store it ran in is gone; the adapter itself
/// stays loaded and the next call gets a fresh instance.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter {adapter}: {export} did not finish within {limit:?}")]
    Timeout {
        adapter: String,
        export: &'static str,
        limit: Duration,
    },
    #[error(
        "adapter {adapter}: {export} tried to grow its memory to {requested} bytes, over the limit of {limit}"
    )]
    MemoryExceeded {
        adapter: String,
        export: &'static str,
        requested: usize,
        limit: usize,
    },
    #[error("adapter {adapter}: {export} trapped: {message}")]
    Trap {
        adapter: String,
        export: &'static str,
        message: String,
    },
    #[error("adapter {adapter}: {export} was given {bytes} bytes, over the limit of {limit}")]
    InputTooLarge {
        adapter: String,
        export: &'static str,
        bytes: usize,
        limit: usize,
    },
    #[error("adapter {adapter}: {export} returned {bytes} bytes, over the limit of {limit}")]
    OutputTooLarge {
        adapter: String,
        export: &'static str,
        bytes: usize,
        limit: usize,
    },
    #[error("adapter {adapter}: {export} returned a malformed result: {reason}")]
    BadOutput {
        adapter: String,
        export: &'static str,
        reason: String,
    },
    #[error("adapter {adapter}: cannot instantiate for {export}: {message}")]
    Instantiate {
        adapter: String,
        export: &'static str,
        message: String,
    },
}

impl AdapterError {
    /// The export the call was for.
    pub fn export(&self) -> &'static str {
        match self {
            AdapterError::Timeout { export, .. }
            | AdapterError::MemoryExceeded { export, .. }
            | AdapterError::Trap { export, .. }
            | AdapterError::InputTooLarge { export, .. }
            | AdapterError::OutputTooLarge { export, .. }
            | AdapterError::BadOutput { export, .. }
            | AdapterError::Instantiate { export, .. } => export,
        }
    }

    /// The kind of failure, as `/metrics` labels it.
    pub fn kind(&self) -> &'static str {
        match self {
            AdapterError::Timeout { .. } => "timeout",
            AdapterError::MemoryExceeded { .. } => "memory_exceeded",
            AdapterError::Trap { .. } => "trap",
            AdapterError::InputTooLarge { .. } => "input_too_large",
            AdapterError::OutputTooLarge { .. } => "output_too_large",
            AdapterError::BadOutput { .. } => "bad_output",
            AdapterError::Instantiate { .. } => "instantiate",
        }
    }
}

/// `resolve-observation` gave no files. All but `Adapter` are the adapter's answers; the
/// job engine turns `Invalid` and `LookupFailed` into callback 100, `NotFound` into 101,
/// and retries `Unavailable` with back-off until the job expires.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error("invalid observation: {0}")]
    Invalid(String),
    #[error("observation not found: {0}")]
    NotFound(String),
    #[error("observation lookup failed: {0}")]
    LookupFailed(String),
    #[error("metadata service unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
}

/// A `.wasm` file could not become the adapter.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read adapter file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a WebAssembly component: {message}")]
    Compile { path: String, message: String },
    #[error("{path} is not a staging:adapter@1.0 or @1.1 component: {message}")]
    NotAnAdapter { path: String, message: String },
    #[error("{path}: the adapter failed its load check: {source}")]
    Check { path: String, source: AdapterError },
    #[error("{path}: the adapter's observation schema is unusable: {message}")]
    Schema { path: String, message: String },
    #[error("the adapter engine cannot be set up: {0}")]
    Engine(String),
}

/// `POST /admin/adapter/reload` or SIGHUP could not swap in a new adapter.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no adapter is configured (adapter.wasm is not set)")]
    NotConfigured,
    #[error("{0}; the previous adapter stays in service")]
    Load(#[from] LoadError),
}
