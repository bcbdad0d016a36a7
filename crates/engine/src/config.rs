//! Architecture-independent model hyper-parameters. Each architecture file fills this from GGUF
//! metadata or `config.json`; nothing here is specific to one model size.

use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file;
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Gemma2,
    Gemma3,
    Llama,
    Gpt2,
}

impl Architecture {
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3",
            Architecture::Llama => "llama",
            Architecture::Gpt2 => "gpt2",
        }
    }
}

/// Rotary scaling variants found in the configs we load.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor` (Gemma 3 4B+ global layers).
    Linear { factor: f64 },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_mlp: usize,
    pub vocab_size: usize,
    pub max_position: usize,
    pub rms_norm_eps: f64,
    /// Rope base of global (full-attention) layers.
    pub rope_theta: f64,
    /// Rope base of sliding-window layers (Gemma 3: 10 000); equals `rope_theta` where unused.
    pub rope_local_theta: f64,
    /// Scaling applied to the global layers' rope (Gemma 3) or to all layers (Llama 3).
    pub rope_scaling: Option<RopeScaling>,
    pub sliding_window: Option<usize>,
    /// Per layer: true where the layer attends within `sliding_window` only.
    pub layer_is_sliding: Vec<bool>,
    /// Attention scores are multiplied by `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f64,
    pub attn_logit_softcap: Option<f64>,
    pub final_logit_softcap: Option<f64>,
    pub tie_word_embeddings: bool,
    /// The MLP's activation.
    pub activation: crate::layers::Activation,
}

impl ModelConfig {
    pub fn attn_scale(&self) -> f64 {
        self.query_pre_attn_scalar.powf(-0.5)
    }
}

/// Typed access to GGUF metadata with one-line errors naming the missing key.
pub struct GgufMeta<'a> {
    pub md: &'a HashMap<String, gguf_file::Value>,
    pub file: String,
}

impl<'a> GgufMeta<'a> {
    fn get(&self, key: &str) -> Result<&gguf_file::Value> {
        self.md.get(key).ok_or_else(|| EngineError::MissingField {
            file: self.file.clone(),
            field: key.to_string(),
        })
    }
    fn bad(&self, key: &str, e: impl std::fmt::Display) -> EngineError {
        EngineError::BadField {
            file: self.file.clone(),
            field: key.into(),
            reason: e.to_string(),
        }
    }
    pub fn has(&self, key: &str) -> bool {
        self.md.contains_key(key)
    }
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n = match v {
            gguf_file::Value::U8(x) => *x as u64,
            gguf_file::Value::U16(x) => *x as u64,
            gguf_file::Value::U32(x) => *x as u64,
            gguf_file::Value::U64(x) => *x,
            gguf_file::Value::I32(x) if *x >= 0 => *x as u64,
            gguf_file::Value::I64(x) if *x >= 0 => *x as u64,
            other => {
                return Err(self.bad(key, format!("expected an unsigned integer, got {other:?}")))
            }
        };
        Ok(n as usize)
    }
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.has(key) {
            self.usize(key)
        } else {
            Ok(default)
        }
    }
    pub fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        match v {
            gguf_file::Value::F32(x) => Ok(*x as f64),
            gguf_file::Value::F64(x) => Ok(*x),
            other => other
                .to_u64()
                .map(|x| x as f64)
                .map_err(|e| self.bad(key, e)),
        }
    }
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        if self.has(key) {
            self.f64(key)
        } else {
            Ok(default)
        }
    }
    pub fn string(&self, key: &str) -> Result<String> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|e| self.bad(key, e))
    }
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.md.get(key) {
            None => Ok(default),
            Some(v) => v.to_bool().map_err(|e| self.bad(key, e)),
        }
    }
}

/// Typed access to a `config.json` object.
pub struct HfJson<'a> {
    pub v: &'a serde_json::Value,
    pub file: String,
}

impl<'a> HfJson<'a> {
    fn missing(&self, key: &str) -> EngineError {
        EngineError::MissingField {
            file: self.file.clone(),
            field: key.into(),
        }
    }
    pub fn opt(&self, key: &str) -> Option<&serde_json::Value> {
        self.v.get(key).filter(|x| !x.is_null())
    }
    pub fn usize(&self, key: &str) -> Result<usize> {
        let x = self.opt(key).ok_or_else(|| self.missing(key))?;
        x.as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| EngineError::BadField {
                file: self.file.clone(),
                field: key.into(),
                reason: format!("expected an unsigned integer, got {x}"),
            })
    }
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.opt(key).is_some() {
            self.usize(key)
        } else {
            Ok(default)
        }
    }
    pub fn f64(&self, key: &str) -> Result<f64> {
        let x = self.opt(key).ok_or_else(|| self.missing(key))?;
        x.as_f64().ok_or_else(|| EngineError::BadField {
            file: self.file.clone(),
            field: key.into(),
            reason: format!("expected a number, got {x}"),
        })
    }
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        if self.opt(key).is_some() {
            self.f64(key)
        } else {
            Ok(default)
        }
    }
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        if self.opt(key).is_some() {
            self.f64(key).map(Some)
        } else {
            Ok(None)
        }
    }
    pub fn bool_or(&self, key: &str, default: bool) -> bool {
        self.opt(key).and_then(|x| x.as_bool()).unwrap_or(default)
    }
    pub fn str(&self, key: &str) -> Option<&str> {
        self.opt(key).and_then(|x| x.as_str())
    }

    /// `rope_scaling` of a HF config, where present.
    pub fn rope_scaling(&self, key: &str) -> Result<Option<RopeScaling>> {
        let Some(rs) = self.opt(key) else {
            return Ok(None);
        };
        let sub = HfJson {
            v: rs,
            file: format!("{}:{key}", self.file),
        };
        let kind = sub
            .str("rope_type")
            .or_else(|| sub.str("type"))
            .unwrap_or("default");
        match kind {
            "default" => Ok(None),
            "linear" => Ok(Some(RopeScaling::Linear {
                factor: sub.f64("factor")?,
            })),
            "llama3" => Ok(Some(RopeScaling::Llama3 {
                factor: sub.f64("factor")?,
                low_freq_factor: sub.f64("low_freq_factor")?,
                high_freq_factor: sub.f64("high_freq_factor")?,
                original_max_position_embeddings: sub.f64("original_max_position_embeddings")?,
            })),
            other => Err(EngineError::BadField {
                file: self.file.clone(),
                field: key.into(),
                reason: format!(
                    "rope_type '{other}' is not supported (supported: default, linear, llama3)"
                ),
            }),
        }
    }
}

impl<'a> HfJson<'a> {
    /// Rope base and scaling for a layer type (`full_attention` / `sliding_attention`), from
    /// transformers 5's `rope_parameters` (flat or per layer type) or the older `rope_theta` /
    /// `rope_local_base_freq` / `rope_scaling` fields.
    pub fn rope(
        &self,
        layer_type: &str,
        legacy_theta_key: &str,
        default_theta: f64,
    ) -> Result<(f64, Option<RopeScaling>)> {
        if let Some(rp) = self.opt("rope_parameters") {
            let sub_v = rp.get(layer_type).filter(|v| v.is_object()).unwrap_or(rp);
            let sub = HfJson {
                v: sub_v,
                file: format!("{}:rope_parameters", self.file),
            };
            let theta = sub.f64_or("rope_theta", default_theta)?;
            // The parameters object itself carries rope_type and the scaling fields.
            let wrapper = serde_json::json!({ "s": sub_v });
            let w = HfJson {
                v: &wrapper,
                file: sub.file.clone(),
            };
            return Ok((theta, w.rope_scaling("s")?));
        }
        let theta = self.f64_or(legacy_theta_key, default_theta)?;
        let scaling = if layer_type == "sliding_attention" {
            None
        } else {
            self.rope_scaling("rope_scaling")?
        };
        Ok((theta, scaling))
    }
}
