//! The run folder: `config.toml` (the resolved config, seed included), `metrics.jsonl` (one JSON
//! object per epoch or round) and `summary.json`, written as the run goes.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{CoordinatorError, Result};

/// An open run folder.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates `parent/name`, or `parent/name-2`, `-3`, … if it exists (never overwrites a run).
    pub fn create(parent: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(parent).map_err(|e| CoordinatorError::io(parent, e))?;
        for n in 1..10_000 {
            let candidate = if n == 1 {
                parent.join(name)
            } else {
                parent.join(format!("{name}-{n}"))
            };
            match std::fs::create_dir(&candidate) {
                Ok(()) => return Ok(RunDir { path: candidate }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(CoordinatorError::io(candidate, e)),
            }
        }
        Err(CoordinatorError::io(
            parent.join(name),
            std::io::Error::other("too many runs with this name"),
        ))
    }

    /// A handle on a folder that already exists (nothing is created).
    pub fn create_existing(path: &Path) -> Self {
        RunDir {
            path: path.to_path_buf(),
        }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a file in the folder atomically (temporary file, then rename).
    pub fn write(&self, file: &str, contents: &[u8]) -> Result<PathBuf> {
        let target = self.path.join(file);
        let tmp = self.path.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, contents).map_err(|e| CoordinatorError::io(&tmp, e))?;
        std::fs::rename(&tmp, &target).map_err(|e| CoordinatorError::io(&target, e))?;
        Ok(target)
    }

    /// Writes a value as pretty JSON.
    pub fn write_json(&self, file: &str, value: &impl Serialize) -> Result<PathBuf> {
        let text = serde_json::to_vec_pretty(value).map_err(|e| CoordinatorError::Config {
            origin: file.to_string(),
            message: format!("serialising: {e}"),
        })?;
        self.write(file, &text)
    }

    /// Appends one JSON line to `metrics.jsonl`.
    pub fn append_metric(&self, value: &impl Serialize) -> Result<()> {
        let path = self.path.join("metrics.jsonl");
        let mut line = serde_json::to_vec(value).map_err(|e| CoordinatorError::Config {
            origin: "metrics".into(),
            message: format!("serialising: {e}"),
        })?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| CoordinatorError::io(&path, e))?;
        f.write_all(&line)
            .map_err(|e| CoordinatorError::io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_overwrites_and_writes_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let a = RunDir::create(tmp.path(), "run").unwrap();
        let b = RunDir::create(tmp.path(), "run").unwrap();
        assert_ne!(a.path(), b.path());
        assert!(b.path().ends_with("run-2"));
        a.write_json("summary.json", &serde_json::json!({"x": 1}))
            .unwrap();
        a.append_metric(&serde_json::json!({"epoch": 1})).unwrap();
        a.append_metric(&serde_json::json!({"epoch": 2})).unwrap();
        let lines = std::fs::read_to_string(a.path().join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 2);
        let names: Vec<_> = std::fs::read_dir(a.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
    }
}
