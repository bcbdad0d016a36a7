//! llama.cpp control vectors (the layout repeng writes): a GGUF file with architecture
//! `controlvector`, `controlvector.model_hint`, `controlvector.layer_count` and one f32 tensor
//! `direction.{l}` of width d_model per steered layer. llama.cpp adds `direction.{l}` (times the
//! user's scale) to the output of block l, counted from 0, and has no slot for l = 0's input;
//! here that is residual row l + 1 = `blocks.{l}.hook_resid_post`, the `--layer l` convention of
//! `persona-lens direction`.

use crate::{AnalysisError, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ControlVector {
    /// The model family the vector was made for (llama.cpp checks nothing; a hint for people).
    pub model_hint: String,
    /// Block index -> direction (already scaled: llama.cpp adds it as is, times its own scale).
    pub layers: BTreeMap<usize, Vec<f32>>,
}

impl ControlVector {
    pub fn layer(&self, l: usize) -> Result<Vec<f32>> {
        self.layers.get(&l).cloned().ok_or_else(|| {
            AnalysisError::Invalid(format!(
                "the control vector has no direction.{l} (layers: {:?}); steer at one of those layers",
                self.layers.keys().collect::<Vec<_>>()
            ))
        })
    }
}

/// Writes `cv` atomically.
pub fn write(path: &Path, cv: &ControlVector) -> Result<()> {
    if cv.layers.is_empty() {
        return Err(AnalysisError::Invalid(
            "a control vector needs at least one layer".into(),
        ));
    }
    if cv.layers.contains_key(&0) {
        return Err(AnalysisError::Invalid(
            "llama.cpp control vectors have no direction.0 (layer indices start at 1); steer at layer 1 or later".into(),
        ));
    }
    let width = cv.layers.values().next().map(Vec::len).unwrap_or(0);
    let mut tensors = Vec::new();
    for (l, v) in &cv.layers {
        if v.len() != width {
            return Err(AnalysisError::Invalid(format!(
                "direction.{l} has width {} but direction.{} has {width}",
                v.len(),
                cv.layers.keys().next().unwrap_or(&0)
            )));
        }
        crate::direction::check_direction(v, width)?;
        let t = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu)?;
        tensors.push((
            format!("direction.{l}"),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    let arch = Value::String("controlvector".into());
    let hint = Value::String(cv.model_hint.clone());
    let count = Value::U32(cv.layers.len() as u32);
    let meta: Vec<(&str, &Value)> = vec![
        ("general.architecture", &arch),
        ("controlvector.model_hint", &hint),
        ("controlvector.layer_count", &count),
    ];
    let tref: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut buf = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &meta, &tref)?;
    persona_lens_engine::io::write_atomic(path, buf.get_ref())?;
    Ok(())
}

/// Reads a control vector written by persona-lens, repeng or llama.cpp's tools.
pub fn read(path: &Path) -> Result<ControlVector> {
    let bad = |why: String| {
        AnalysisError::Invalid(format!(
            "{} is not a control vector ({why}); export one with `persona-lens control-vector export`",
            path.display()
        ))
    };
    let mut f = std::fs::File::open(path)
        .map_err(|e| AnalysisError::Invalid(format!("cannot read {}: {e}", path.display())))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| bad(e.to_string()))?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    if arch != "controlvector" {
        return Err(bad(format!("general.architecture is '{arch}'")));
    }
    let model_hint = content
        .metadata
        .get("controlvector.model_hint")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    let mut layers = BTreeMap::new();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let Some(l) = name
            .strip_prefix("direction.")
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        let t = content
            .tensor(&mut f, &name, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        layers.insert(l, t);
    }
    if layers.is_empty() {
        return Err(bad("no direction.{layer} tensors".into()));
    }
    Ok(ControlVector { model_hint, layers })
}
