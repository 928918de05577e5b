//! The wording of failure reports and callback comments, shared by the adapters in this
//! workspace. The report layout is the original service's: the host parses it back for
//! `/get_failed_job/` (host/src/reports.rs), so the first line and the two list headings
//! must not change.

use crate::staging::adapter::types::JobSummary;

/// The report file: totals, then the files with errors, then those that never arrived (a
/// heading only when its list is not empty), exactly as the host's `reports::render`.
pub fn failure_report(job: &JobSummary) -> String {
    let mut out = format!(
        "Job failure report for job {}: Out of a total of {} files, {} had errors and {} failed to transfer.\n\n",
        job.job_id,
        job.total_files,
        job.error_files.len(),
        job.missing_files.len()
    );
    for (title, list) in [
        ("Files with errors:", &job.error_files),
        ("Files that failed to transfer:", &job.missing_files),
    ] {
        if !list.is_empty() {
            out.push_str(title);
            out.push('\n');
            for f in list {
                out.push_str("  ");
                out.push_str(f);
                out.push('\n');
            }
            out.push('\n');
        }
    }
    out
}

/// The callback's `comment`: one line with the same totals as the report's first line and
/// what the return code means.
pub fn callback_comment(job: &JobSummary) -> String {
    let what = match job.return_code {
        0 => "all files staged",
        5 => "finished with errors",
        10 => "expired before all files were staged",
        100 => "the observation's file lookup failed",
        101 => "the observation lookup found no files",
        102 => "the staging request to the tape system failed",
        199 => "internal error creating the job",
        _ => "finished",
    };
    format!(
        "Job {}: {what}. Out of a total of {} files, {} were staged, {} had errors and {} failed to transfer.",
        job.job_id,
        job.total_files,
        job.ready_files,
        job.error_files.len(),
        job.missing_files.len()
    )
}
