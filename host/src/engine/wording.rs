//! The words of callbacks and failure reports. The telescope adapter may supply its own;
//! these built-in ones are the original service's, used when there is no adapter or the
//! adapter fails (a wording failure must never cost a callback).

use futures::future::BoxFuture;

use crate::store::codes;

/// The facts a comment or report is worded from.
#[derive(Debug, Clone)]
pub struct JobFacts {
    pub job_id: i64,
    pub return_code: i64,
    pub total_files: i64,
    pub ready_files: i64,
    pub error_files: i64,
    /// Seconds after which jobs expire (for the code-10 wording).
    pub expiry_secs: u64,
    /// Files with errors and files that never arrived (filled for reports only).
    pub error_paths: Vec<String>,
    pub missing_paths: Vec<String>,
}

pub trait Wording: Send + Sync {
    /// The callback's `comment` for codes 0, 5 and 10 (error codes carry their own).
    fn callback_comment<'a>(&'a self, facts: &'a JobFacts)
    -> BoxFuture<'a, Result<String, String>>;
    /// The text of `<reports>/failed/<job_id>.txt`.
    fn failure_report<'a>(&'a self, facts: &'a JobFacts) -> BoxFuture<'a, Result<String, String>>;
}

/// The original service's wording.
#[derive(Debug, Default, Clone)]
pub struct BuiltinWording;

impl BuiltinWording {
    pub fn comment(facts: &JobFacts) -> String {
        let JobFacts {
            total_files: total,
            ready_files: ready,
            error_files: errors,
            ..
        } = *facts;
        match facts.return_code {
            codes::SUCCESS => format!("All {total} files staged successfully"),
            codes::FILE_ERRORS => format!(
                "Out of {total} files in total, {ready} were staged successfully, but {errors} files had errors"
            ),
            codes::EXPIRED => format!(
                "Job timed out after {} seconds. Out of {total} files in total, {ready} staged successfully, and {errors} files had errors",
                facts.expiry_secs
            ),
            other => format!("Job ended with return code {other}"),
        }
    }

    pub fn report(facts: &JobFacts) -> String {
        crate::reports::render(
            facts.job_id,
            facts.total_files,
            &facts.error_paths,
            &facts.missing_paths,
        )
    }
}

impl Wording for BuiltinWording {
    fn callback_comment<'a>(
        &'a self,
        facts: &'a JobFacts,
    ) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move { Ok(Self::comment(facts)) })
    }

    fn failure_report<'a>(&'a self, facts: &'a JobFacts) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move { Ok(Self::report(facts)) })
    }
}
