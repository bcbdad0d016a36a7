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
    Qwen2,
    Qwen3,
    Mistral,
    Phi3,
    Olmo2,
}

impl Architecture {
    pub const ALL: [Architecture; 9] = [
        Architecture::Gemma2,
        Architecture::Gemma3,
        Architecture::Llama,
        Architecture::Gpt2,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Mistral,
        Architecture::Phi3,
        Architecture::Olmo2,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3",
            Architecture::Llama => "llama",
            Architecture::Gpt2 => "gpt2",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Mistral => "mistral",
            Architecture::Phi3 => "phi3",
            Architecture::Olmo2 => "olmo2",
        }
    }
}

/// Rotary scaling variants, as Hugging Face's `modeling_rope_utils` defines them (plus llama.cpp's
/// per-frequency factors, how GGUF files store Llama 3 scaling).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Frequencies divided by `factor` (Gemma 3 4B+ global layers).
    Linear { factor: f64 },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Dynamic NTK: past `max_position_embeddings` the base grows with the sequence length.
    /// Computed from each forward call's longest position (HF caches the largest length seen;
    /// the two agree for a fresh forward and for cached generation).
    Dynamic {
        factor: f64,
        max_position_embeddings: f64,
    },
    /// YaRN: a ramp between interpolated and extrapolated frequencies, cos/sin scaled by
    /// `attention_factor` (resolved from `factor` / `mscale` when the config leaves it out).
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        attention_factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
    },
    /// LongRoPE (Phi-3.5): per-frequency divisors, the long set once a call's length passes
    /// `original_max_position_embeddings`; cos/sin scaled by `attention_factor`.
    Longrope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: f64,
        attention_factor: f64,
    },
    /// Per-frequency divisors read from a GGUF file's `rope_freqs.weight`.
    FreqFactors { factors: Vec<f64> },
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
    /// Scaling applied to the global layers' rope (Gemma 3) or to all layers (Llama 3, ...).
    pub rope_scaling: Option<RopeScaling>,
    /// Rotated dims per head: `head_dim`, or fewer with partial rotary (Phi-3); 0 without rotary.
    pub rotary_dim: usize,
    pub sliding_window: Option<usize>,
    /// Per layer: true where the layer attends within `sliding_window` only.
    pub layer_is_sliding: Vec<bool>,
    /// Attention scores are multiplied by `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f64,
    pub attn_logit_softcap: Option<f64>,
    pub final_logit_softcap: Option<f64>,
    pub tie_word_embeddings: bool,
    /// The MLP's activation.
    pub activation: Activation,
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

    /// A number list field (`short_factor` / `long_factor`).
    fn f64_list(&self, key: &str) -> Result<Vec<f64>> {
        let x = self.opt(key).ok_or_else(|| self.missing(key))?;
        x.as_array()
            .and_then(|a| a.iter().map(|v| v.as_f64()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| EngineError::BadField {
                file: self.file.clone(),
                field: key.into(),
                reason: format!("expected a list of numbers, got {x}"),
            })
    }
}

/// LongRoPE's default attention factor (HF): `sqrt(1 + ln(factor) / ln(original))`, 1 when the
/// context is not extended.
pub fn longrope_attention_factor(factor: f64, original: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        (1.0 + factor.ln() / original.ln()).sqrt()
    }
}

/// The scaling named by one rope parameters object (`rope_scaling`, or transformers 5's
/// `rope_parameters` / one of its per-layer-type entries). `top` is the whole config: HF takes
/// `max_position_embeddings` and Phi-3's top-level `original_max_position_embeddings` from it.
fn parse_rope_scaling(p: &HfJson, top: &HfJson, dim: usize) -> Result<Option<RopeScaling>> {
    let kind = p
        .str("rope_type")
        .or_else(|| p.str("type"))
        .unwrap_or("default");
    let max_pos = top.f64_or("max_position_embeddings", 2048.0)?;
    // HF: llama3 / yarn / longrope default their original length to max_position_embeddings;
    // a top-level `original_max_position_embeddings` (Phi-3) takes priority.
    let original = || -> Result<f64> {
        match top.opt_f64("original_max_position_embeddings")? {
            Some(o) => Ok(o),
            None => p.f64_or("original_max_position_embeddings", max_pos),
        }
    };
    let bad = |reason: String| EngineError::BadField {
        file: p.file.clone(),
        field: "rope_type".into(),
        reason,
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: p.f64("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: p.f64("factor")?,
            low_freq_factor: p.f64("low_freq_factor")?,
            high_freq_factor: p.f64("high_freq_factor")?,
            original_max_position_embeddings: original()?,
        }),
        "dynamic" => Some(RopeScaling::Dynamic {
            factor: p.f64("factor")?,
            max_position_embeddings: max_pos,
        }),
        "yarn" => {
            let original = original()?;
            let factor = match p.opt_f64("factor")? {
                Some(f) => f,
                None => max_pos / original,
            };
            let get_mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match p.opt_f64("attention_factor")? {
                Some(a) => a,
                None => match (p.opt_f64("mscale")?, p.opt_f64("mscale_all_dim")?) {
                    (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                        get_mscale(factor, m) / get_mscale(factor, ma)
                    }
                    _ => get_mscale(factor, 1.0),
                },
            };
            // HF: `beta_fast or 32`, `beta_slow or 1` (a 0 also falls back).
            let beta = |k: &str, d: f64| -> Result<f64> {
                Ok(p.opt_f64(k)?.filter(|&x| x != 0.0).unwrap_or(d))
            };
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                attention_factor,
                beta_fast: beta("beta_fast", 32.0)?,
                beta_slow: beta("beta_slow", 1.0)?,
                truncate: p.opt("truncate").and_then(|x| x.as_bool()).unwrap_or(true),
            })
        }
        "longrope" => {
            let original = original()?;
            // HF: `factor` if given, else the ratio of the context to the original length.
            let factor = match p.opt_f64("factor")? {
                Some(f) => f,
                None => max_pos / original,
            };
            let attention_factor = match p.opt_f64("attention_factor")? {
                Some(a) => a,
                None => longrope_attention_factor(factor, original),
            };
            let (short_factor, long_factor) = (p.f64_list("short_factor")?, p.f64_list("long_factor")?);
            for (name, f) in [("short_factor", &short_factor), ("long_factor", &long_factor)] {
                if f.len() != dim / 2 {
                    return Err(EngineError::BadField {
                        file: p.file.clone(),
                        field: name.into(),
                        reason: format!("{} entries; the rotary dimension {dim} needs {}", f.len(), dim / 2),
                    });
                }
            }
            Some(RopeScaling::Longrope {
                short_factor,
                long_factor,
                original_max_position_embeddings: original,
                attention_factor,
            })
        }
        other => {
            return Err(bad(format!(
                "'{other}' is not supported (supported: default, linear, dynamic, yarn, longrope, llama3)"
            )))
        }
    })
}

/// Rope settings of one layer type.
#[derive(Debug, Clone)]
pub struct RopeSpec {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
    /// Rotated dims per head (`head_dim * partial_rotary_factor`, Phi-3); the rest pass through.
    pub rotary_dim: usize,
}

impl<'a> HfJson<'a> {
    /// Rope base, scaling and rotary width for a layer type (`full_attention` /
    /// `sliding_attention`), from transformers 5's `rope_parameters` (flat or per layer type) or
    /// the older `rope_theta` / `rope_local_base_freq` / `rope_scaling` / `partial_rotary_factor`
    /// fields. Unknown rope types are errors, never ignored.
    pub fn rope(
        &self,
        layer_type: &str,
        legacy_theta_key: &str,
        default_theta: f64,
        head_dim: usize,
    ) -> Result<RopeSpec> {
        let rotary = |factor: f64| -> Result<usize> {
            if !(factor > 0.0 && factor <= 1.0) {
                return Err(EngineError::BadField {
                    file: self.file.clone(),
                    field: "partial_rotary_factor".into(),
                    reason: format!("{factor} is not in (0, 1]"),
                });
            }
            // HF: int(head_dim * partial_rotary_factor)
            Ok((head_dim as f64 * factor) as usize)
        };
        let top_factor = self.f64_or("partial_rotary_factor", 1.0)?;
        if let Some(rp) = self.opt("rope_parameters") {
            let sub_v = rp.get(layer_type).filter(|v| v.is_object()).unwrap_or(rp);
            let sub = HfJson {
                v: sub_v,
                file: format!("{}:rope_parameters", self.file),
            };
            let rotary_dim = rotary(sub.f64_or("partial_rotary_factor", top_factor)?)?;
            return Ok(RopeSpec {
                theta: sub.f64_or("rope_theta", default_theta)?,
                scaling: parse_rope_scaling(&sub, self, rotary_dim)?,
                rotary_dim,
            });
        }
        let theta = self.f64_or(legacy_theta_key, default_theta)?;
        let rotary_dim = rotary(top_factor)?;
        let scaling = match (layer_type, self.opt("rope_scaling")) {
            // Legacy Gemma 3 configs: `rope_scaling` is the global layers' only.
            ("sliding_attention", _) | (_, None) => None,
            (_, Some(rs)) => {
                let sub = HfJson {
                    v: rs,
                    file: format!("{}:rope_scaling", self.file),
                };
                parse_rope_scaling(&sub, self, rotary_dim)?
            }
        };
        Ok(RopeSpec {
            theta,
            scaling,
            rotary_dim,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Tanh approximation (HF `gelu_pytorch_tanh`, `gelu_new`, `gelu_fast`).
    GeluTanh,
    /// Exact erf GELU (HF `gelu`).
    GeluErf,
    Silu,
    Relu,
}

impl Activation {
    /// The activation a `config.json` names (`hidden_act` / `hidden_activation` /
    /// `activation_function`); unknown names are errors rather than a silent substitute.
    pub fn from_hf(name: &str, file: &str, field: &str) -> Result<Self> {
        Ok(match name {
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            other => {
                return Err(EngineError::BadField {
                    file: file.into(),
                    field: field.into(),
                    reason: format!(
                        "activation '{other}' is not supported (gelu_pytorch_tanh, gelu_new, gelu_fast, gelu, silu, relu)"
                    ),
                })
            }
        })
    }
}
