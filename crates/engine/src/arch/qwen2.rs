//! Qwen2 / Qwen2.5: Llama's block with q/k/v biases (no output bias), untied unembedding on the
//! larger sizes, optional sliding-window layers (`use_sliding_window`: layers from
//! `max_window_layers` on; off in every released checkpoint). GGUF: `qwen2`, HF row order.

use super::llama::{self, Layout, NormPlacement};
use crate::config::{Architecture, GgufMeta, HfJson, ModelConfig};
use crate::decoder::Decoder;
use crate::error::Result;
use crate::weights::Weights;

pub const LAYOUT: Layout = Layout {
    gguf_qk_permuted: false,
    qk_norm: None,
    norms: NormPlacement::Pre,
    fused: false,
};

/// Sliding layers of a Qwen config without `layer_types` (HF's `Qwen2Config` rule, shared by
/// Qwen3): with `use_sliding_window`, layers `max_window_layers..` slide.
pub fn qwen_sliding(j: &HfJson, c: &mut ModelConfig) -> Result<()> {
    if !j.bool_or("use_sliding_window", false) {
        c.sliding_window = None;
        c.layer_is_sliding = vec![false; c.n_layers];
        return Ok(());
    }
    if j.opt("layer_types").is_none() {
        if let Some(w) = j.opt("sliding_window").and_then(|x| x.as_u64()) {
            let from = j.usize_or("max_window_layers", 28)?;
            c.layer_is_sliding = (0..c.n_layers).map(|i| i >= from).collect();
            c.sliding_window = c.layer_is_sliding.contains(&true).then_some(w as usize);
        }
    }
    Ok(())
}

pub fn config_from_hf(v: &serde_json::Value, file: &str) -> Result<ModelConfig> {
    let j = HfJson {
        v,
        file: file.into(),
    };
    let mut c = llama::hf_config(&j, Architecture::Qwen2, 10_000.0)?;
    qwen_sliding(&j, &mut c)?;
    Ok(c)
}

pub fn config_from_gguf(m: &GgufMeta) -> Result<ModelConfig> {
    llama::gguf_config(m, "qwen2", Architecture::Qwen2)
}

pub fn load(cfg: ModelConfig, w: &Weights) -> Result<Decoder> {
    llama::decoder(cfg, w, &LAYOUT)
}
