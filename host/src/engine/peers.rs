//! The engine's peers, as the daemon really has them: the Scout client stages, the
//! telescope adapter resolves observations, maps job paths to Scout paths and words the
//! results. The adapter is looked up per call, so a hot swap takes effect at once.

use std::borrow::Cow;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::wording::{BuiltinWording, JobFacts, Wording};
use super::{ResolveError, Resolver, StageError, Stager};
use crate::adapter::{self, Adapters, JobSummaryForAdapter};
use crate::scout::{ScoutClient, ScoutError};

/// Stages through Scout, after the adapter's `stage-path` mapping (identity without one).
pub struct ScoutStager {
    pub scout: ScoutClient,
    pub adapters: Adapters,
}

impl ScoutStager {
    /// The paths Scout is sent for `paths`: the adapter's mapping, or `paths` themselves
    /// (borrowed: a copy of a 500,000-file job's paths is tens of MB).
    async fn scout_paths<'p>(&self, paths: &'p [String]) -> Result<Cow<'p, [String]>, String> {
        match self.adapters.current() {
            Some(a) => {
                let mut out = Vec::with_capacity(paths.len());
                for chunk in paths.chunks(adapter::PATHS_PER_CALL) {
                    out.extend(a.stage_paths(chunk).await.map_err(|e| e.to_string())?);
                }
                Ok(Cow::Owned(out))
            }
            None => Ok(Cow::Borrowed(paths)),
        }
    }
}

impl Stager for ScoutStager {
    fn stage<'a>(
        &'a self,
        job_id: i64,
        paths: &'a [String],
    ) -> BoxFuture<'a, Result<(), StageError>> {
        Box::pin(async move {
            // An adapter that cannot map paths is a bug in it; retrying will not help.
            let mapped = self.scout_paths(paths).await.map_err(StageError::Refused)?;
            match self.scout.stage(&mapped, &job_id.to_string()).await {
                Ok(_) => Ok(()),
                Err(e @ (ScoutError::Refused { .. } | ScoutError::PathTooLong { .. })) => {
                    Err(StageError::Refused(e.to_string()))
                }
                Err(e) => Err(StageError::Transient(e.to_string())),
            }
        })
    }

    fn cancel<'a>(&'a self, job_id: i64, paths: &'a [String]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mapped = self.scout_paths(paths).await?;
            if self.scout.cancel(&mapped, &job_id.to_string()).await {
                Ok(())
            } else {
                Err("Scout did not accept every cancel request".into())
            }
        })
    }
}

/// Resolves observations with the current adapter.
pub struct AdapterResolver(pub Adapters);

impl Resolver for AdapterResolver {
    fn resolve<'a>(
        &'a self,
        obs: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<Vec<String>, ResolveError>> {
        Box::pin(async move {
            let Some(a) = self.0.current() else {
                return Err(ResolveError::LookupFailed(
                    "no telescope adapter is configured".into(),
                ));
            };
            match a.resolve_observation(obs).await {
                Ok(paths) => Ok(paths),
                Err(adapter::ResolveError::NotFound(_)) => Err(ResolveError::NotFound),
                Err(adapter::ResolveError::LookupFailed(why)) => {
                    Err(ResolveError::LookupFailed(why))
                }
                Err(adapter::ResolveError::Invalid(why)) => Err(ResolveError::LookupFailed(
                    format!("invalid observation: {why}"),
                )),
                Err(adapter::ResolveError::Unavailable(why)) => Err(ResolveError::Unavailable(why)),
                Err(adapter::ResolveError::Adapter(e)) => {
                    Err(ResolveError::Internal(e.to_string()))
                }
            }
        })
    }
}

/// Words results with the current adapter, or the built-in wording without one.
pub struct AdapterWording(pub Adapters);

impl AdapterWording {
    fn summary(facts: &JobFacts) -> JobSummaryForAdapter {
        JobSummaryForAdapter {
            job_id: facts.job_id,
            return_code: facts.return_code.clamp(0, u32::MAX as i64) as u32,
            total_files: facts.total_files.max(0) as u64,
            ready_files: facts.ready_files.max(0) as u64,
            error_files: facts.error_paths.clone(),
            missing_files: facts.missing_paths.clone(),
        }
    }
}

impl Wording for AdapterWording {
    fn callback_comment<'a>(
        &'a self,
        facts: &'a JobFacts,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            match self.0.current() {
                Some(a) => a
                    .callback_comment(&Self::summary(facts))
                    .await
                    .map_err(|e| e.to_string()),
                None => Ok(BuiltinWording::comment(facts)),
            }
        })
    }

    fn failure_report<'a>(&'a self, facts: &'a JobFacts) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            match self.0.current() {
                Some(a) => a
                    .failure_report(&Self::summary(facts))
                    .await
                    .map_err(|e| e.to_string()),
                None => Ok(BuiltinWording::report(facts)),
            }
        })
    }
}

/// The parts of a daemon with what is configured.
pub fn parts(scout: Option<ScoutClient>, adapters: Adapters) -> super::EngineParts {
    super::EngineParts {
        stager: scout.map(|scout| {
            Arc::new(ScoutStager {
                scout,
                adapters: adapters.clone(),
            }) as Arc<dyn Stager>
        }),
        resolver: Some(Arc::new(AdapterResolver(adapters.clone()))),
        wording: Arc::new(AdapterWording(adapters)),
        ingest: None,
    }
}
