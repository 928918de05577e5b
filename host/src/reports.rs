//! Failure reports: `<dir>/failed/<job_id>.txt`, one per job that did not end with code 0.
//!
//! The format is the original's, because operators read these files and
//! `/get_failed_job/` parses them back:
//!
//! ```text
//! Job failure report for job 7: Out of a total of 3 files, 1 had errors and 1 failed to transfer.
//!
//! Files with errors:
//!   mwa/a/b/file1
//!
//! Files that failed to transfer:
//!   mwa/a/b/file2
//! ```
//!
//! Reports are written whole (temporary file, then rename), so a reader never sees half of one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// A report as `/get_failed_job/` needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedReport {
    pub total_files: i64,
    /// Every file listed, with errors or never arrived.
    pub files: Vec<String>,
    /// Unix seconds of the report file's last change.
    pub mtime: i64,
}

pub fn failed_dir(reports_dir: &Path) -> PathBuf {
    reports_dir.join("failed")
}

fn report_path(reports_dir: &Path, job_id: i64) -> PathBuf {
    failed_dir(reports_dir).join(format!("{job_id}.txt"))
}

fn mtime_secs(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Reports on disk: (job id, mtime seconds), ordered by job id. Files whose name is not
/// `<integer>.txt` are ignored. A missing directory is an empty list.
pub fn list(reports_dir: &Path) -> std::io::Result<Vec<(i64, i64)>> {
    let dir = failed_dir(reports_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".txt"))
            .and_then(|n| n.parse::<i64>().ok())
        else {
            continue;
        };
        out.push((id, mtime_secs(&entry.metadata()?)));
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads and parses one job's report; `Ok(None)` when there is none.
pub fn read(reports_dir: &Path, job_id: i64) -> std::io::Result<Option<ParsedReport>> {
    let path = report_path(reports_dir, job_id);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mtime = mtime_secs(&std::fs::metadata(&path)?);
    Ok(Some(parse(&text, mtime)))
}

/// Parses report text the way the original did: the total is the first plain number on
/// the "Job failure" line; every indented line is a file.
pub fn parse(text: &str, mtime: i64) -> ParsedReport {
    let mut total_files = 0;
    let mut files = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with("Job failure") {
            total_files = line
                .split_whitespace()
                .find_map(|w| {
                    w.bytes()
                        .all(|b| b.is_ascii_digit())
                        .then(|| w.parse().ok())
                        .flatten()
                })
                .unwrap_or(0);
        } else if let Some(file) = line.strip_prefix("  ") {
            files.push(file.trim().to_string());
        }
    }
    ParsedReport {
        total_files,
        files,
        mtime,
    }
}

/// Renders a report in the original's wording.
pub fn render(job_id: i64, total_files: i64, error_files: &[String], missing: &[String]) -> String {
    let mut s = format!(
        "Job failure report for job {job_id}: Out of a total of {total_files} files, {} had errors and {} failed to transfer.\n\n",
        error_files.len(),
        missing.len()
    );
    for (title, list) in [
        ("Files with errors:", error_files),
        ("Files that failed to transfer:", missing),
    ] {
        if !list.is_empty() {
            s.push_str(title);
            s.push('\n');
            for f in list {
                s.push_str("  ");
                s.push_str(f);
                s.push('\n');
            }
            s.push('\n');
        }
    }
    s
}

/// Writes a job's report atomically (temporary file in the same directory, fsync, rename).
pub fn write(reports_dir: &Path, job_id: i64, text: &str) -> std::io::Result<PathBuf> {
    let dir = failed_dir(reports_dir);
    std::fs::create_dir_all(&dir)?;
    let path = report_path(reports_dir, job_id);
    let tmp = dir.join(format!(".{job_id}.txt.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Removes reports older than `expire_days`, never touching the newest `keep_newest`
/// (by modification time). Returns how many were removed.
pub fn prune(reports_dir: &Path, expire_days: u64, keep_newest: usize) -> std::io::Result<usize> {
    let mut reports = list(reports_dir)?;
    if reports.len() <= keep_newest {
        return Ok(0);
    }
    // Newest first; the original sorted by name assuming growing job ids, mtime is safer.
    reports.sort_by_key(|&(id, mtime)| std::cmp::Reverse((mtime, id)));
    let cutoff = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
        - (expire_days as i64) * 86_400;
    let mut removed = 0;
    for &(id, mtime) in &reports[keep_newest..] {
        if mtime < cutoff {
            match std::fs::remove_file(report_path(reports_dir, id)) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_then_parse_round_trips() {
        let errs = vec!["mwa/a/f1".to_string()];
        let missing = vec!["mwa/a/f2".to_string(), "mwa/a/f3".to_string()];
        let text = render(17, 5, &errs, &missing);
        assert!(text.starts_with(
            "Job failure report for job 17: Out of a total of 5 files, 1 had errors and 2 failed to transfer.\n\nFiles with errors:\n  mwa/a/f1\n"
        ));
        let p = parse(&text, 99);
        assert_eq!(p.total_files, 5);
        assert_eq!(p.files, vec!["mwa/a/f1", "mwa/a/f2", "mwa/a/f3"]);
        assert_eq!(p.mtime, 99);
    }

    #[test]
    fn prune_keeps_the_newest_and_the_young() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(40 * 86_400);
        for id in 0..5 {
            let path = write(dir.path(), id, "Job failure report\n").unwrap();
            if id < 4 {
                std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
            }
        }
        // Five reports, four of them 40 days old; keep the newest 2, expire after 30 days.
        assert_eq!(prune(dir.path(), 30, 2).unwrap(), 3);
        let left: Vec<i64> = list(dir.path()).unwrap().into_iter().map(|r| r.0).collect();
        assert_eq!(left.len(), 2);
        assert!(left.contains(&4), "the young one stays");
        assert_eq!(prune(dir.path(), 30, 2).unwrap(), 0);
    }

    #[test]
    fn write_list_read() {
        let dir = tempfile::tempdir().unwrap();
        assert!(list(dir.path()).unwrap().is_empty());
        write(dir.path(), 12, &render(12, 1, &[], &["x".into()])).unwrap();
        write(dir.path(), 3, &render(3, 1, &["y".into()], &[])).unwrap();
        std::fs::write(failed_dir(dir.path()).join("notes.txt"), "x").unwrap();
        let l = list(dir.path()).unwrap();
        assert_eq!(l.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 12]);
        assert_eq!(read(dir.path(), 12).unwrap().unwrap().files, vec!["x"]);
        assert!(read(dir.path(), 4).unwrap().is_none());
    }
}
