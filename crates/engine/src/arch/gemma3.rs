//! Gemma 3 (text): the Gemma 2 block ([`super::gemma2::gemma_block`]) plus q/k RMSNorms, sliding
//! and global layers with their own rope bases (5 : 1), no attention soft-cap. Serves the GGUF
//! files and the HF checkpoints (`Gemma3ForCausalLM`, and `Gemma3ForConditionalGeneration` whose
//! text weights sit under `language_model.` / `model.language_model.`).

use crate::config::{Architecture, GgufMeta, HfJson, ModelConfig};
use crate::decoder::Decoder;
use crate::error::Result;
use crate::layers::Rope;
use crate::weights::Weights;

/// Default for GGUF files that do not store it (llama.cpp hard-codes it for Gemma 3).
const GGUF_DEFAULT_SLIDING_PATTERN: usize = 6;
/// Rope base of the sliding-window layers in Gemma 3 (llama.cpp hard-codes it too).
const DEFAULT_LOCAL_ROPE_BASE: f64 = 10_000.0;

pub fn config_from_gguf(m: &GgufMeta) -> Result<ModelConfig> {
    let a = "gemma3";
    let n_layers = m.usize(&format!("{a}.block_count"))?;
    let d_model = m.usize(&format!("{a}.embedding_length"))?;
    let n_heads = m.usize(&format!("{a}.attention.head_count"))?;
    let n_kv_heads = m.usize_or(&format!("{a}.attention.head_count_kv"), n_heads)?;
    let head_dim = m.usize_or(&format!("{a}.attention.key_length"), d_model / n_heads)?;
    let pattern = m.usize_or(
        &format!("{a}.attention.sliding_window_pattern"),
        GGUF_DEFAULT_SLIDING_PATTERN,
    )?;
    let sliding_window = m.usize(&format!("{a}.attention.sliding_window"))?;
    let rope_scaling = match m.f64_or(&format!("{a}.rope.scaling.factor"), 1.0)? {
        f if f != 1.0 => Some(crate::config::RopeScaling::Linear { factor: f }),
        _ => None,
    };
    // llama.cpp: the 27B model scales queries by (d_model / n_heads), every other size by head_dim.
    let default_scalar = if n_layers == 62 {
        (d_model / n_heads) as f64
    } else {
        head_dim as f64
    };
    Ok(ModelConfig {
        arch: Architecture::Gemma3,
        n_layers,
        d_model,
        n_heads,
        n_kv_heads,
        head_dim,
        d_mlp: m.usize(&format!("{a}.feed_forward_length"))?,
        vocab_size: 0, // filled from the embedding
        max_position: m.usize(&format!("{a}.context_length"))?,
        rms_norm_eps: m.f64(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
        rope_theta: m.f64(&format!("{a}.rope.freq_base"))?,
        rope_local_theta: m.f64_or(&format!("{a}.rope.freq_base_swa"), DEFAULT_LOCAL_ROPE_BASE)?,
        rope_scaling,
        rotary_dim: head_dim,
        sliding_window: Some(sliding_window),
        layer_is_sliding: (0..n_layers).map(|i| (i + 1) % pattern != 0).collect(),
        query_pre_attn_scalar: m.f64_or(
            &format!("{a}.attention.query_pre_attn_scalar"),
            default_scalar,
        )?,
        attn_logit_softcap: m
            .f64_or(&format!("{a}.attn_logit_softcapping"), 0.0)
            .map(|x| (x > 0.0).then_some(x))?,
        final_logit_softcap: m
            .f64_or(&format!("{a}.final_logit_softcapping"), 0.0)
            .map(|x| (x > 0.0).then_some(x))?,
        tie_word_embeddings: true,
        activation: crate::layers::Activation::GeluTanh,
    })
}

pub fn config_from_hf(root: &serde_json::Value, file: &str) -> Result<ModelConfig> {
    // Gemma3ForConditionalGeneration nests the text model's config.
    let v = root
        .get("text_config")
        .filter(|x| x.is_object())
        .unwrap_or(root);
    let j = HfJson {
        v,
        file: file.into(),
    };
    let n_layers = j.usize("num_hidden_layers")?;
    let d_model = j.usize("hidden_size")?;
    let n_heads = j.usize("num_attention_heads")?;
    let head_dim = j.usize_or("head_dim", d_model / n_heads)?;
    let layer_is_sliding =
        super::gemma2::sliding_layers(&j, n_layers, GGUF_DEFAULT_SLIDING_PATTERN)?;
    let global = j.rope("full_attention", "rope_theta", 1_000_000.0, head_dim)?;
    let local = j.rope(
        "sliding_attention",
        "rope_local_base_freq",
        DEFAULT_LOCAL_ROPE_BASE,
        head_dim,
    )?;
    if local.scaling.is_some() {
        return Err(crate::error::EngineError::BadField {
            file: file.into(),
            field: "rope_parameters.sliding_attention".into(),
            reason: "rope scaling on sliding-window layers is not supported".into(),
        });
    }
    Ok(ModelConfig {
        arch: Architecture::Gemma3,
        n_layers,
        d_model,
        n_heads,
        n_kv_heads: j.usize_or("num_key_value_heads", n_heads)?,
        head_dim,
        d_mlp: j.usize("intermediate_size")?,
        vocab_size: j.usize("vocab_size")?,
        max_position: j.usize_or("max_position_embeddings", 131_072)?,
        rms_norm_eps: j.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta: global.theta,
        rope_local_theta: local.theta,
        rope_scaling: global.scaling,
        rotary_dim: global.rotary_dim,
        sliding_window: Some(j.usize_or("sliding_window", 4096)?),
        layer_is_sliding,
        query_pre_attn_scalar: j.f64_or("query_pre_attn_scalar", head_dim as f64)?,
        attn_logit_softcap: j.opt_f64("attn_logit_softcapping")?,
        final_logit_softcap: j.opt_f64("final_logit_softcapping")?,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", true),
        activation: super::gemma2::gemma_activation(&j)?,
    })
}

pub fn load(cfg: ModelConfig, w: &Weights) -> Result<Decoder> {
    let local = Rope::new(cfg.rope_local_theta, cfg.rotary_dim, None);
    super::gemma2::gemma_decoder(cfg, w, true, local)
}
