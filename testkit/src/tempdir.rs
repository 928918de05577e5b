//! A directory under the system's temporary directory that exists for one run: created
//! empty, with a name no other run (or other directory of this run) has, and removed with
//! everything in it when dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Distinguishes the directories of one process.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The directory could not be created.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the directory {}", path.display())]
pub struct TempDirError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// A temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/<prefix>-<pid>-<n>-<random>`. The random part keeps a crashed run's
    /// leftovers, from a process that had the same id, from being reused.
    pub fn new(prefix: &str) -> Result<TempDir, TempDirError> {
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        match std::fs::create_dir(&path) {
            Ok(()) => Ok(TempDir { path }),
            Err(source) => Err(TempDirError { path, source }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Drop cannot fail; a directory left behind is worth a word, not a panic.
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_directory_is_new_and_removed_on_drop() {
        let a = TempDir::new("staged-testkit").unwrap();
        let b = TempDir::new("staged-testkit").unwrap();
        assert_ne!(a.path(), b.path());
        assert!(a.path().is_dir());
        std::fs::write(a.path().join("f"), "x").unwrap();
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists());
        assert!(b.path().is_dir());
    }
}
