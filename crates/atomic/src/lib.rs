//! Atomic file output: write to a temporary file in the destination folder, then rename, so an
//! interrupted run never leaves a half-written result. Every crate that writes results (engine,
//! analyses, report, study) writes through here; an interrupt handler calls [`abort_writes`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("io error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write results under {dir}: {source}")]
    NotWritable {
        dir: PathBuf,
        source: std::io::Error,
    },
}

impl WriteError {
    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WriteError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, WriteError>;

fn tmp_path(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Temp files being written now, and whether the process is shutting down (SIGINT). Creating
/// and renaming a temp file happen under this lock, so an interrupt handler that holds it can
/// delete every in-flight temp file and exit without a half-written result left behind.
static IN_FLIGHT: Mutex<(bool, Vec<PathBuf>)> = Mutex::new((false, Vec::new()));

fn in_flight() -> std::sync::MutexGuard<'static, (bool, Vec<PathBuf>)> {
    IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner())
}

fn interrupted(path: &Path) -> WriteError {
    WriteError::io(
        path,
        std::io::Error::new(std::io::ErrorKind::Interrupted, "interrupted"),
    )
}

/// Checks, before any work, that results can be written under `dir`: creates it and writes and
/// removes a probe file. A path under a regular file or on a read-only disk fails here, in one
/// line, instead of after minutes of model work.
pub fn check_output_dir(dir: &Path) -> Result<()> {
    let fail = |source: std::io::Error| WriteError::NotWritable {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(format!(".write-check.{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)?;
    Ok(())
}

/// Writes `bytes` to `path` atomically (temp file + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| WriteError::io(dir, e))?;
    }
    let tmp = tmp_path(path);
    let file = {
        let mut g = in_flight();
        if g.0 {
            return Err(interrupted(path));
        }
        let f = std::fs::File::create(&tmp).map_err(|e| WriteError::io(&tmp, e));
        if f.is_ok() {
            g.1.push(tmp.clone());
        }
        f?
    };
    let res = (|| {
        let mut f = file;
        f.write_all(bytes)?;
        f.sync_all()?;
        let mut g = in_flight();
        g.1.retain(|p| p != &tmp);
        if g.0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "interrupted",
            ));
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(WriteError::io(path, e));
    }
    Ok(())
}

/// For an interrupt handler: stops new atomic writes, deletes the temp files of writes in
/// flight, and returns how many it deleted. The caller then exits; the lock stays held by the
/// exiting process so no rename can slip in between.
pub fn abort_writes() -> usize {
    let mut g = in_flight();
    g.0 = true;
    let n = g.1.len();
    for p in g.1.drain(..) {
        let _ = std::fs::remove_file(p);
    }
    // Keep the guard alive until exit: leak it.
    std::mem::forget(g);
    n
}
