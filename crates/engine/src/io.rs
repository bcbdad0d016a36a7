//! Tensor output on top of [`persona_lens_atomic`] (re-exported here for the engine's users):
//! safetensors files written atomically.

use crate::error::{EngineError, Result};
use candle_core::Tensor;
pub use persona_lens_atomic::{abort_writes, WriteError};
use std::collections::HashMap;
use std::path::Path;

/// Writes `bytes` to `path` atomically (temp file + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(persona_lens_atomic::write_atomic(path, bytes)?)
}

/// Checks that results can be written under `dir` (see [`persona_lens_atomic::check_output_dir`]).
pub fn check_output_dir(dir: &Path) -> Result<()> {
    Ok(persona_lens_atomic::check_output_dir(dir)?)
}

/// Saves named tensors (+ string metadata) as safetensors, atomically.
pub fn save_safetensors(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    let data: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let bytes = safetensors::serialize(data, Some(metadata))
        .map_err(|e| EngineError::Safetensors(e.to_string()))?;
    write_atomic(path, &bytes)
}
