//! Qwen3: Llama's block with per-head q/k RMSNorms (multiplier `w`, over `head_dim`, before
//! rotary), an explicit `head_dim` that need not be `hidden_size / heads`, no attention biases.
//! GGUF: `qwen3`, HF row order.

use super::llama::{self, Layout, NormPlacement, QkNormSpan};
use crate::config::{Architecture, GgufMeta, HfJson, ModelConfig};
use crate::decoder::Decoder;
use crate::error::Result;
use crate::weights::Weights;

pub const LAYOUT: Layout = Layout {
    gguf_qk_permuted: false,
    qk_norm: Some(QkNormSpan::PerHead),
    norms: NormPlacement::Pre,
    fused: false,
};

pub fn config_from_hf(v: &serde_json::Value, file: &str) -> Result<ModelConfig> {
    let j = HfJson {
        v,
        file: file.into(),
    };
    let mut c = llama::hf_config(&j, Architecture::Qwen3, 10_000.0)?;
    super::qwen2::qwen_sliding(&j, &mut c)?;
    Ok(c)
}

pub fn config_from_gguf(m: &GgufMeta) -> Result<ModelConfig> {
    llama::gguf_config(m, "qwen3", Architecture::Qwen3)
}

pub fn load(cfg: ModelConfig, w: &Weights) -> Result<Decoder> {
    llama::decoder(cfg, w, &LAYOUT)
}
