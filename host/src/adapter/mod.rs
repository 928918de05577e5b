//! Telescope adapters: WebAssembly components implementing `wit/adapter.wit`, run in a
//! sandbox so that a buggy or hostile adapter can cost a job but never the daemon.
//!
//! This module narrows wasmtime to what `staged` needs: one engine per daemon
//! ([`policy`] owns every knob), each adapter compiled once into an `InstancePre`, and a
//! fresh store per call (`runtime`). The rest of the daemon sees [`Adapters`] (what is in
//! service, hot-swappable) and [`LoadedAdapter`] (typed, bounded calls).
//!
//! Invariants:
//! - Every call is bounded (time, memory, stack, bytes in and out, HTTP); a failure is an
//!   [`AdapterError`] for that call alone, logged with the adapter's name.
//! - An adapter is in service only after it compiled, linked against exactly the imports we
//!   grant (the `host` interface and an empty WASI), matched the exports of a package
//!   version the host speaks (the current one, or 1.0.0: see `runtime`), answered `info`
//!   and gave a usable observation schema.
//! - A swap is one atomic pointer store: a call holds the `Arc<LoadedAdapter>` it started
//!   with and finishes on it; a new file that fails its checks never replaces the old one.
//! - Every call is timed and every failure counted by kind ([`call_metrics`]), in figures
//!   that outlive a reload.

pub mod call_metrics;
mod error;
pub mod policy;
mod runtime;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwapOption;
use serde_json::Value;
use wasmtime::Engine;
use wasmtime::component::{Component, HasSelf, Linker};

pub use crate::allow_list::{AllowList, AllowListError};
pub use call_metrics::AdapterMetrics;
pub use error::{AdapterError, LoadError, ReloadError, ResolveError};
pub use policy::Limits;

use crate::config::AdapterConfig;
use runtime::{Adapter, AdapterPre, CallState, Shared, v1_0};

/// The package version of `wit/adapter.wit`, the newest the host speaks.
pub const WIT_VERSION: &str = "1.1.0";

/// Most paths given to one path-mapping call (`stage-paths`, `map-event-paths`): a Scout
/// stage request's worth, so that a 500,000-file job's mapping is many bounded calls (each
/// within the call's time, memory and size limits) rather than one that holds it all.
pub const PATHS_PER_CALL: usize = 10_000;

/// A compiled adapter, typed against the package version it was built for.
enum Pre {
    Current(AdapterPre<CallState>),
    V1_0(v1_0::AdapterPre<CallState>),
}

impl Pre {
    /// Types `instance_pre` against the current version, else against 1.0.0.
    fn new(instance_pre: wasmtime::component::InstancePre<CallState>) -> wasmtime::Result<Pre> {
        match AdapterPre::new(instance_pre.clone()) {
            Ok(p) => Ok(Pre::Current(p)),
            Err(current) => match v1_0::AdapterPre::new(instance_pre) {
                Ok(p) => Ok(Pre::V1_0(p)),
                // The current version's complaint is the one worth reading.
                Err(_) => Err(current),
            },
        }
    }

    fn version(&self) -> &'static str {
        match self {
            Pre::Current(_) => WIT_VERSION,
            Pre::V1_0(_) => "1.0.0",
        }
    }
}

/// Runs one export on either version's bindings, with `$body` written once: it compiles
/// against each version's generated types, which share names where the versions agree.
macro_rules! on_pre {
    ($pre:expr, $shared:expr, $export:expr, |$a:ident, $s:ident| $body:expr) => {
        match $pre {
            Pre::Current(p) => {
                runtime::call(p, $shared, $export, move |$a, $s| {
                    Box::pin(async move { $body })
                })
                .await
            }
            Pre::V1_0(p) => {
                runtime::call(p, $shared, $export, move |$a, $s| {
                    Box::pin(async move { $body })
                })
                .await
            }
        }
    };
}

/// Who an adapter says it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdapterInfo {
    pub name: String,
    pub version: String,
    pub telescope: String,
}

/// The facts of a finished job that the adapter words its report and comment from.
#[derive(Debug, Clone, Default)]
pub struct JobSummaryForAdapter {
    pub job_id: i64,
    pub return_code: u32,
    pub total_files: u64,
    pub ready_files: u64,
    /// Files the tape system reported an error for, in job order.
    pub error_files: Vec<String>,
    /// Files that never arrived, in job order.
    pub missing_files: Vec<String>,
}

impl JobSummaryForAdapter {
    fn to_wit(&self) -> runtime::JobSummary {
        runtime::JobSummary {
            job_id: self.job_id,
            return_code: self.return_code,
            total_files: self.total_files,
            ready_files: self.ready_files,
            error_files: self.error_files.clone(),
            missing_files: self.missing_files.clone(),
        }
    }

    fn to_wit_1_0(&self) -> v1_0::JobSummary {
        v1_0::JobSummary {
            job_id: self.job_id,
            return_code: self.return_code,
            total_files: self.total_files,
            ready_files: self.ready_files,
            error_files: self.error_files.clone(),
            missing_files: self.missing_files.clone(),
        }
    }

    fn bytes(&self) -> usize {
        strings_bytes(&self.error_files) + strings_bytes(&self.missing_files) + 32
    }
}

fn strings_bytes(list: &[String]) -> usize {
    // Each string also costs its (pointer, length) pair in the guest.
    list.iter().map(|s| s.len() + 8).sum()
}

/// The adapter in service, swappable while calls run. Cheap to clone.
#[derive(Clone)]
pub struct Adapters {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` when no adapter is configured.
    source: Option<Source>,
    current: ArcSwapOption<LoadedAdapter>,
    /// One reload at a time, so two racing reloads cannot swap in the older file last.
    reloading: tokio::sync::Mutex<()>,
}

/// Everything needed to (re)load the configured file.
struct Source {
    path: PathBuf,
    engine: Engine,
    linker: Linker<CallState>,
    limits: Limits,
    /// How the adapter's HTTPS peers are checked (`adapter.ca_file`).
    trust: crate::tls_trust::Trust,
    allow: AllowList,
    settings_json: String,
    allocator: &'static str,
    slots: Arc<tokio::sync::Semaphore>,
    metrics: AdapterMetrics,
}

impl Adapters {
    /// No adapter: jobs must list their files.
    pub fn none() -> Adapters {
        Adapters {
            inner: Arc::new(Inner {
                source: None,
                current: ArcSwapOption::empty(),
                reloading: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Sets up the engine and loads `config.wasm`, if any. A configured file that does not
    /// load is an error: the daemon should not start without the adapter it was told to use.
    pub async fn from_config(config: &AdapterConfig) -> Result<Adapters, LoadError> {
        let Some(path) = config.wasm.clone() else {
            return Ok(Adapters::none());
        };
        let source = Source::new(path, config)?;
        let loaded = source.load().await?;
        tracing::info!(
            adapter = %loaded.info.name,
            version = %loaded.info.version,
            telescope = %loaded.info.telescope,
            path = %source.path.display(),
            allocator = loaded.allocator,
            "adapter loaded"
        );
        Ok(Adapters {
            inner: Arc::new(Inner {
                source: Some(source),
                current: ArcSwapOption::from_pointee(loaded),
                reloading: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The adapter in service now. Hold the `Arc` for the duration of one piece of work
    /// (a request, a batch): a reload meanwhile does not change what that work talks to.
    pub fn current(&self) -> Option<Arc<LoadedAdapter>> {
        self.inner.current.load_full()
    }

    /// Call times and failures of the configured adapter, across reloads (`None` without
    /// one).
    pub fn metrics(&self) -> Option<&AdapterMetrics> {
        self.inner.source.as_ref().map(|s| &s.metrics)
    }

    /// Whether an adapter is configured at all.
    pub fn is_configured(&self) -> bool {
        self.inner.source.is_some()
    }

    /// Loads the configured file again and swaps it in if it passes the load checks;
    /// otherwise the adapter in service stays.
    pub async fn reload(&self) -> Result<Arc<LoadedAdapter>, ReloadError> {
        let source = self
            .inner
            .source
            .as_ref()
            .ok_or(ReloadError::NotConfigured)?;
        let _one_at_a_time = self.inner.reloading.lock().await;
        match source.load().await {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                self.inner.current.store(Some(loaded.clone()));
                tracing::info!(adapter = %loaded.info.name, version = %loaded.info.version, "adapter reloaded");
                Ok(loaded)
            }
            Err(e) => {
                tracing::error!(error = %e, "adapter reload failed; the previous adapter stays");
                Err(e.into())
            }
        }
    }
}

impl Source {
    fn new(path: PathBuf, config: &AdapterConfig) -> Result<Source, LoadError> {
        let engine_err = |e: anyhow::Error| LoadError::Engine(format!("{e:#}"));
        // A config from `Config::parse` passed this check already; one built in code (tests,
        // `staged demo`) gets it here.
        config.check().context("adapter").map_err(engine_err)?;
        let limits = Limits::from_config(config);
        let trust = crate::tls_trust::Trust::from_config(
            "adapter",
            config.ca_file.as_deref(),
            config.insecure_skip_tls_verify,
        )
        .map_err(LoadError::Engine)?;
        let allow = config.http_allow.clone();
        let settings_json = serde_json::to_string(&config.settings)
            .map_err(|e| LoadError::Engine(format!("adapter.settings: {e}")))?;
        let (engine, allocator) = policy::engine(&limits).map_err(engine_err)?;
        policy::start_epoch_ticker(&engine);
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        Adapter::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        Ok(Source {
            path,
            engine,
            linker,
            limits,
            trust,
            allow,
            settings_json,
            allocator,
            slots: Arc::new(tokio::sync::Semaphore::new(policy::POOL_INSTANCES as usize)),
            metrics: AdapterMetrics::default(),
        })
    }

    async fn load(&self) -> Result<LoadedAdapter, LoadError> {
        let path = self.path.clone();
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|source| LoadError::Read {
                path: path.display().to_string(),
                source,
            })?;
        let engine = self.engine.clone();
        // Compiling takes a CPU for a while: keep it off the async workers.
        let component = tokio::task::spawn_blocking(move || Component::new(&engine, &bytes))
            .await
            .map_err(|e| LoadError::Engine(format!("compiler task: {e}")))?
            .map_err(|e| LoadError::Compile {
                path: path.display().to_string(),
                message: format!("{e:#}"),
            })?;
        let not_adapter = |e: wasmtime::Error| LoadError::NotAnAdapter {
            path: path.display().to_string(),
            message: format!("{e:#}"),
        };
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(not_adapter)?;
        let pre = Pre::new(instance_pre).map_err(not_adapter)?;
        let shared = Arc::new(Shared {
            // Until `info` answers, errors name the file.
            name: file_name(&path),
            limits: self.limits.clone(),
            allow: self.allow.clone(),
            settings_json: self.settings_json.clone(),
            slots: self.slots.clone(),
            metrics: self.metrics.clone(),
            http: http_client(&self.limits, &self.trust)
                .map_err(|e| LoadError::Engine(format!("{e:#}")))?,
        });
        LoadedAdapter::check(pre, shared, &path, self.allocator).await
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn http_client(
    limits: &Limits,
    trust: &crate::tls_trust::Trust,
) -> reqwest::Result<reqwest::Client> {
    trust
        .apply(reqwest::Client::builder())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(limits.http_timeout)
        .user_agent(concat!("staged/", env!("CARGO_PKG_VERSION"), " adapter"))
        .build()
}

/// One compiled, checked adapter. Every method is one bounded call in a fresh instance.
pub struct LoadedAdapter {
    info: AdapterInfo,
    schema: Value,
    validator: jsonschema::Validator,
    pre: Pre,
    shared: Arc<Shared>,
    allocator: &'static str,
}

impl LoadedAdapter {
    async fn check(
        pre: Pre,
        mut shared: Arc<Shared>,
        path: &Path,
        allocator: &'static str,
    ) -> Result<LoadedAdapter, LoadError> {
        let failed = |source| LoadError::Check {
            path: path.display().to_string(),
            source,
        };
        let info = on_pre!(&pre, &shared, "info", |a, s| a.call_info(s).await.map(
            |i| {
                AdapterInfo {
                    name: i.name,
                    version: i.version,
                    telescope: i.telescope,
                }
            }
        ))
        .map_err(failed)?;
        if info.name.is_empty() || info.name.len() > 64 {
            return Err(failed(AdapterError::BadOutput {
                adapter: shared.name.clone(),
                export: "info",
                reason: "the name must be 1 to 64 bytes".into(),
            }));
        }
        if let Some(s) = Arc::get_mut(&mut shared) {
            s.name = info.name.clone();
        }
        let schema_text = on_pre!(&pre, &shared, "observation-schema", |a, s| a
            .call_observation_schema(s)
            .await)
        .map_err(failed)?;
        let schema_err = |message: String| LoadError::Schema {
            path: path.display().to_string(),
            message,
        };
        let schema: Value =
            serde_json::from_str(&schema_text).map_err(|e| schema_err(format!("not JSON: {e}")))?;
        // The default options resolve no remote or file references (the crate is built
        // without those features): a schema must stand alone.
        let validator =
            jsonschema::validator_for(&schema).map_err(|e| schema_err(e.to_string()))?;
        Ok(LoadedAdapter {
            info,
            schema,
            validator,
            pre,
            shared,
            allocator,
        })
    }

    /// Name, version and telescope, as answered at load.
    pub fn info(&self) -> &AdapterInfo {
        &self.info
    }

    /// The version of the `staging:adapter` package the component was built against.
    pub fn wit_version(&self) -> &'static str {
        self.pre.version()
    }

    /// The JSON Schema of `obs`, as answered at load (for `/openapi.json`).
    pub fn observation_schema(&self) -> &Value {
        &self.schema
    }

    /// Checks a request's `obs` against the schema: `Err` holds every reason, for a 422.
    /// No adapter call: this runs on every `POST /staging/` with an observation.
    pub fn validate_observation(&self, obs: &Value) -> Result<(), String> {
        let reasons: Vec<String> = self
            .validator
            .iter_errors(obs)
            .take(10)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                }
            })
            .collect();
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
    }

    fn check_input(&self, export: &'static str, bytes: usize) -> Result<(), AdapterError> {
        let limit = self.shared.limits.max_input_bytes;
        if bytes > limit {
            return Err(self.shared.metrics.failed(AdapterError::InputTooLarge {
                adapter: self.info.name.clone(),
                export,
                bytes,
                limit,
            }));
        }
        Ok(())
    }

    fn check_output(&self, export: &'static str, bytes: usize) -> Result<(), AdapterError> {
        let limit = self.shared.limits.max_output_bytes;
        if bytes > limit {
            return Err(self.shared.metrics.failed(AdapterError::OutputTooLarge {
                adapter: self.info.name.clone(),
                export,
                bytes,
                limit,
            }));
        }
        Ok(())
    }

    fn bad_output(&self, export: &'static str, reason: String) -> AdapterError {
        self.shared.metrics.failed(AdapterError::BadOutput {
            adapter: self.info.name.clone(),
            export,
            reason,
        })
    }

    fn logged<T>(&self, r: Result<T, AdapterError>) -> Result<T, AdapterError> {
        if let Err(e) = &r {
            tracing::warn!(adapter = %self.info.name, error = %e, "adapter call failed");
        }
        r
    }

    /// The files of an observation (already valid against the schema). The job engine
    /// calls it once when it takes up a job created with `obs`, after the 202: `Invalid`
    /// and `LookupFailed` become callback 100, `NotFound` 101, `Adapter` 199, and
    /// `Unavailable` a retry with back-off until the job expires.
    pub async fn resolve_observation(&self, obs: &Value) -> Result<Vec<String>, ResolveError> {
        const EXPORT: &str = "resolve-observation";
        let text = obs.to_string();
        self.logged(self.check_input(EXPORT, text.len()))?;
        let out = match &self.pre {
            Pre::Current(p) => {
                runtime::call(p, &self.shared, EXPORT, move |a, s| {
                    Box::pin(async move { a.call_resolve_observation(s, &text).await })
                })
                .await
            }
            Pre::V1_0(p) => {
                runtime::call(p, &self.shared, EXPORT, move |a, s| {
                    Box::pin(async move {
                        use v1_0::WitResolveError as Old;
                        let out = a.call_resolve_observation(s, &text).await?;
                        Ok::<_, wasmtime::Error>(out.map_err(|e| match e {
                            Old::Invalid(m) => runtime::WitResolveError::Invalid(m),
                            Old::NotFound(m) => runtime::WitResolveError::NotFound(m),
                            Old::LookupFailed(m) => runtime::WitResolveError::LookupFailed(m),
                        }))
                    })
                })
                .await
            }
        };
        let out = self.logged(out)?;
        let bytes = match &out {
            Ok(paths) => strings_bytes(paths),
            Err(
                runtime::WitResolveError::Invalid(m)
                | runtime::WitResolveError::NotFound(m)
                | runtime::WitResolveError::LookupFailed(m)
                | runtime::WitResolveError::Unavailable(m),
            ) => m.len(),
        };
        self.logged(self.check_output(EXPORT, bytes))?;
        match out {
            Ok(paths) => {
                if let Some(bad) = paths.iter().find(|p| p.is_empty() || p.contains('\0')) {
                    let e = self.bad_output(EXPORT, format!("path {bad:?}"));
                    return Err(self.logged::<()>(Err(e)).unwrap_err().into());
                }
                Ok(paths)
            }
            Err(runtime::WitResolveError::Invalid(m)) => Err(ResolveError::Invalid(m)),
            Err(runtime::WitResolveError::NotFound(m)) => Err(ResolveError::NotFound(m)),
            Err(runtime::WitResolveError::LookupFailed(m)) => Err(ResolveError::LookupFailed(m)),
            Err(runtime::WitResolveError::Unavailable(m)) => Err(ResolveError::Unavailable(m)),
        }
    }

    /// Kafka `Filename`s to job paths (`None`: not this telescope's file). The Kafka
    /// consumer calls it once per polled batch, before touching the database, and drops
    /// the `None`s; an error fails the batch, which is then retried (not committed).
    pub async fn map_event_paths(
        &self,
        names: &[String],
    ) -> Result<Vec<Option<String>>, AdapterError> {
        const EXPORT: &str = "map-event-paths";
        self.check_input(EXPORT, strings_bytes(names))?;
        let names = names.to_vec();
        let expected = names.len();
        let out = on_pre!(&self.pre, &self.shared, EXPORT, |a, s| a
            .call_map_event_paths(s, &names)
            .await);
        let out = self.logged(out)?;
        let bytes = out
            .iter()
            .map(|p| p.as_ref().map_or(1, |p| p.len() + 8))
            .sum();
        self.logged(self.check_output(EXPORT, bytes))?;
        if out.len() != expected {
            return self.logged(Err(self.bad_output(
                EXPORT,
                format!("{} entries for {expected} names", out.len()),
            )));
        }
        Ok(out)
    }

    /// Job paths to the paths Scout is asked to stage, in order. Callers pass at most
    /// [`PATHS_PER_CALL`] paths at a time.
    pub async fn stage_paths(&self, paths: &[String]) -> Result<Vec<String>, AdapterError> {
        const EXPORT: &str = "stage-paths";
        self.check_input(EXPORT, strings_bytes(paths))?;
        let paths = paths.to_vec();
        let expected = paths.len();
        let out = on_pre!(&self.pre, &self.shared, EXPORT, |a, s| a
            .call_stage_paths(s, &paths)
            .await);
        let out = self.logged(out)?;
        self.logged(self.check_output(EXPORT, strings_bytes(&out)))?;
        if out.len() != expected {
            return self.logged(Err(self.bad_output(
                EXPORT,
                format!("{} entries for {expected} paths", out.len()),
            )));
        }
        Ok(out)
    }

    /// The failure report's text for a job that did not end with code 0. The job engine
    /// writes it with `reports::write`; if the adapter fails, it falls back to
    /// `reports::render`, so a report is never lost to an adapter bug.
    pub async fn failure_report(&self, job: &JobSummaryForAdapter) -> Result<String, AdapterError> {
        self.wording("failure-report", job).await
    }

    /// The callback's `comment`. The callback sender asks for it just before sending; on
    /// an error it sends a plain comment of its own rather than holding the callback back.
    pub async fn callback_comment(
        &self,
        job: &JobSummaryForAdapter,
    ) -> Result<String, AdapterError> {
        self.wording("callback-comment", job).await
    }

    async fn wording(
        &self,
        export: &'static str,
        job: &JobSummaryForAdapter,
    ) -> Result<String, AdapterError> {
        self.check_input(export, job.bytes())?;
        let report = export == "failure-report";
        let out = match &self.pre {
            Pre::Current(p) => {
                let summary = job.to_wit();
                runtime::call(p, &self.shared, export, move |a, s| {
                    Box::pin(async move {
                        if report {
                            a.call_failure_report(s, &summary).await
                        } else {
                            a.call_callback_comment(s, &summary).await
                        }
                    })
                })
                .await
            }
            Pre::V1_0(p) => {
                let summary = job.to_wit_1_0();
                runtime::call(p, &self.shared, export, move |a, s| {
                    Box::pin(async move {
                        if report {
                            a.call_failure_report(s, &summary).await
                        } else {
                            a.call_callback_comment(s, &summary).await
                        }
                    })
                })
                .await
            }
        };
        let out = self.logged(out)?;
        self.logged(self.check_output(export, out.len()))?;
        Ok(out)
    }

    /// How instances are allocated: "pooling", or "on-demand" where the machine refused
    /// the pool's address-space reservation.
    pub fn allocator(&self) -> &'static str {
        self.allocator
    }

    /// The bounds this adapter's calls run under.
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }
}

/// `staged adapter inspect`: loads `path` with `config`'s limits and settings and runs a
/// self-test that needs no network (`resolve-observation` is asked about `{}`, which every
/// adapter must refuse or answer without trapping). Returns the lines to print.
pub async fn inspect(path: &Path, config: &AdapterConfig) -> Result<Vec<String>, LoadError> {
    // No HTTP: a self-test must not depend on, or reach, the network.
    let config = AdapterConfig {
        wasm: Some(path.to_path_buf()),
        call_timeout_ms: config.call_timeout_ms,
        memory_limit_bytes: config.memory_limit_bytes,
        max_input_bytes: config.max_input_bytes,
        max_output_bytes: config.max_output_bytes,
        http_allow: AllowList::default(),
        http_timeout_ms: config.http_timeout_ms,
        http_max_response_bytes: config.http_max_response_bytes,
        ca_file: None,
        insecure_skip_tls_verify: false,
        settings: config.settings.clone(),
    };
    let adapters = Adapters::from_config(&config).await?;
    let a = adapters.current().expect("a configured adapter is loaded");
    let mut out = vec![
        format!("file:      {}", path.display()),
        format!("name:      {}", a.info.name),
        format!("version:   {}", a.info.version),
        format!("telescope: {}", a.info.telescope),
        format!("contract:  staging:adapter@{}", a.wit_version()),
        "observation schema:".to_string(),
        serde_json::to_string_pretty(&a.schema).unwrap_or_default(),
        "self-test:".to_string(),
    ];
    let fail = |e: AdapterError| LoadError::Check {
        path: path.display().to_string(),
        source: e,
    };
    let names = vec!["mwa/1/1_ch001.fits".to_string(), "other/file".to_string()];
    let mapped = a.map_event_paths(&names).await.map_err(fail)?;
    out.push(format!("  map-event-paths {names:?} -> {mapped:?}"));
    let staged = a.stage_paths(&names[..1]).await.map_err(fail)?;
    out.push(format!("  stage-paths {:?} -> {staged:?}", &names[..1]));
    let job = JobSummaryForAdapter {
        job_id: 1,
        return_code: 5,
        total_files: 2,
        ready_files: 1,
        error_files: vec![names[0].clone()],
        missing_files: Vec::new(),
    };
    let report = a.failure_report(&job).await.map_err(fail)?;
    out.push(format!(
        "  failure-report: {} lines",
        report.lines().count()
    ));
    let comment = a.callback_comment(&job).await.map_err(fail)?;
    out.push(format!("  callback-comment: {comment:?}"));
    let resolved = match a.resolve_observation(&serde_json::json!({})).await {
        Ok(paths) => format!("{} paths", paths.len()),
        Err(ResolveError::Adapter(e)) => return Err(fail(e)),
        Err(e) => e.to_string(),
    };
    out.push(format!("  resolve-observation {{}} -> {resolved}"));
    out.push("ok".to_string());
    Ok(out)
}
