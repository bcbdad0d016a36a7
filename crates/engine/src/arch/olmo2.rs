//! OLMo 2: no pre-norms; RMSNorms (`w * x`) on the attention output and on the MLP output
//! before each joins the residual stream (so `hook_attn_out` / `hook_mlp_out` / `hook_result`
//! are after them, as for Gemma's post-norms), and q/k RMSNorms over the whole projection
//! (`n_heads * head_dim`) before the head split and rotary. GGUF: `olmo2`, HF row order.

use super::llama::{self, Layout, NormPlacement, QkNormSpan};
use crate::config::{Architecture, GgufMeta, HfJson, ModelConfig};
use crate::decoder::Decoder;
use crate::error::Result;
use crate::weights::Weights;

pub const LAYOUT: Layout = Layout {
    gguf_qk_permuted: false,
    qk_norm: Some(QkNormSpan::Projection),
    norms: NormPlacement::Post,
    fused: false,
};

pub fn config_from_hf(v: &serde_json::Value, file: &str) -> Result<ModelConfig> {
    let j = HfJson {
        v,
        file: file.into(),
    };
    llama::hf_config(&j, Architecture::Olmo2, 10_000.0)
}

pub fn config_from_gguf(m: &GgufMeta) -> Result<ModelConfig> {
    llama::gguf_config(m, "olmo2", Architecture::Olmo2)
}

pub fn load(cfg: ModelConfig, w: &Weights) -> Result<Decoder> {
    llama::decoder(cfg, w, &LAYOUT)
}
