//! Mistral: Llama's block with a sliding window on every layer when `sliding_window` is set
//! (Mistral 7B v0.1; v0.3 sets none) and an explicit `head_dim`. llama.cpp writes Mistral GGUF
//! files as `llama` (no sliding window there), so they load through [`super::llama`].

use super::llama::{self, Layout};
use crate::config::{Architecture, HfJson, ModelConfig};
use crate::decoder::Decoder;
use crate::error::Result;
use crate::weights::Weights;

pub fn config_from_hf(v: &serde_json::Value, file: &str) -> Result<ModelConfig> {
    let j = HfJson {
        v,
        file: file.into(),
    };
    let mut c = llama::hf_config(&j, Architecture::Mistral, 10_000.0)?;
    llama::slide_every_layer_if_set(&j, &mut c);
    Ok(c)
}

pub fn load(cfg: ModelConfig, w: &Weights) -> Result<Decoder> {
    llama::decoder(cfg, w, &Layout::LLAMA)
}
