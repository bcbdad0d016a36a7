//! Phi-3 / Phi-3.5: Llama's block with fused `qkv_proj` (split into q, k, v at load time, so
//! every attention hook is the same as elsewhere) and fused `gate_up_proj` (gate half first),
//! partial rotary (`partial_rotary_factor`: the first dims of each head rotate, the rest pass
//! through), LongRoPE scaling (Phi-3.5), a sliding window on every layer when
//! `sliding_window` is set. GGUF: `phi3`, HF row order, `attn_qkv` and a fused `ffn_up`.

use super::llama::{self, Layout, NormPlacement};
use crate::config::{Architecture, GgufMeta, HfJson, ModelConfig};
use crate::decoder::Decoder;
use crate::error::Result;
use crate::weights::Weights;

pub const LAYOUT: Layout = Layout {
    gguf_qk_permuted: false,
    qk_norm: None,
    norms: NormPlacement::Pre,
    fused: true,
};

pub fn config_from_hf(v: &serde_json::Value, file: &str) -> Result<ModelConfig> {
    let j = HfJson {
        v,
        file: file.into(),
    };
    let mut c = llama::hf_config(&j, Architecture::Phi3, 10_000.0)?;
    llama::slide_every_layer_if_set(&j, &mut c);
    Ok(c)
}

pub fn config_from_gguf(m: &GgufMeta) -> Result<ModelConfig> {
    llama::gguf_config(m, "phi3", Architecture::Phi3)
}

pub fn load(cfg: ModelConfig, w: &Weights) -> Result<Decoder> {
    llama::decoder(cfg, w, &LAYOUT)
}
