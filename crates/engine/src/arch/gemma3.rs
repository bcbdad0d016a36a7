//! Gemma 3 (text): scaled embeddings, q/k RMSNorm, four norms per block, sliding-window and global
//! layers with their own rope bases, GELU-tanh gated MLP, tied unembedding, `(1 + w)` norms.
//!
//! GGUF: llama.cpp stores every Gemma norm weight as `w + 1`; like transformers' GGUF loader we
//! take `w = stored - 1` and multiply by `1 + w` (the f32 rounding then matches HF exactly).

use crate::config::{Architecture, GgufMeta, HfJson, ModelConfig};
use crate::decoder::{Block, Decoder};
use crate::error::{EngineError, Result};
use crate::layers::{Activation, AttnWeights, GatedMlp, Rope};
use crate::weights::Weights;
use candle_core::Tensor;

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
    let layer_is_sliding: Vec<bool> = match j.opt("layer_types").and_then(|x| x.as_array()) {
        Some(types) => types
            .iter()
            .map(|t| t.as_str() == Some("sliding_attention"))
            .collect(),
        None => {
            let p = j.usize_or(
                "sliding_window_pattern",
                j.usize_or("_sliding_window_pattern", GGUF_DEFAULT_SLIDING_PATTERN)?,
            )?;
            (0..n_layers).map(|i| (i + 1) % p != 0).collect()
        }
    };
    if layer_is_sliding.len() != n_layers {
        return Err(EngineError::BadField {
            file: file.into(),
            field: "layer_types".into(),
            reason: format!("{} entries for {n_layers} layers", layer_is_sliding.len()),
        });
    }
    let (rope_theta, rope_scaling) = j.rope("full_attention", "rope_theta", 1_000_000.0)?;
    let (rope_local_theta, _) = j.rope(
        "sliding_attention",
        "rope_local_base_freq",
        DEFAULT_LOCAL_ROPE_BASE,
    )?;
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
        rope_theta,
        rope_local_theta,
        rope_scaling,
        sliding_window: Some(j.usize_or("sliding_window", 4096)?),
        layer_is_sliding,
        query_pre_attn_scalar: j.f64_or("query_pre_attn_scalar", head_dim as f64)?,
        attn_logit_softcap: j.opt_f64("attn_logit_softcapping")?,
        final_logit_softcap: j.opt_f64("final_logit_softcapping")?,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", true),
    })
}

/// Norm multiplier `1 + w`, with `w` taken back from llama.cpp's `w + 1` for GGUF.
fn norm(w: &Weights, hf: &str, gguf: &str) -> Result<Tensor> {
    let t = w.vector(hf, gguf)?;
    let t = if w.is_gguf() { (t - 1.0)? } else { t };
    Ok((t + 1.0)?)
}

pub fn load(mut cfg: ModelConfig, w: &Weights) -> Result<Decoder> {
    let embed = w.embedding("model.embed_tokens.weight", "token_embd.weight")?;
    cfg.vocab_size = embed.vocab_size()?;
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let hf = |s: &str| format!("model.layers.{i}.{s}");
        let gg = |s: &str| format!("blk.{i}.{s}");
        blocks.push(Block {
            attn_norm: norm(w, &hf("input_layernorm.weight"), &gg("attn_norm.weight"))?,
            attn: AttnWeights {
                q: w.linear(&hf("self_attn.q_proj.weight"), &gg("attn_q.weight"), None)?,
                k: w.linear(&hf("self_attn.k_proj.weight"), &gg("attn_k.weight"), None)?,
                v: w.linear(&hf("self_attn.v_proj.weight"), &gg("attn_v.weight"), None)?,
                o: w.linear(
                    &hf("self_attn.o_proj.weight"),
                    &gg("attn_output.weight"),
                    None,
                )?,
                q_norm: Some(norm(
                    w,
                    &hf("self_attn.q_norm.weight"),
                    &gg("attn_q_norm.weight"),
                )?),
                k_norm: Some(norm(
                    w,
                    &hf("self_attn.k_norm.weight"),
                    &gg("attn_k_norm.weight"),
                )?),
            },
            post_attn_norm: Some(norm(
                w,
                &hf("post_attention_layernorm.weight"),
                &gg("post_attention_norm.weight"),
            )?),
            mlp_norm: norm(
                w,
                &hf("pre_feedforward_layernorm.weight"),
                &gg("ffn_norm.weight"),
            )?,
            mlp: GatedMlp {
                gate: w.linear(&hf("mlp.gate_proj.weight"), &gg("ffn_gate.weight"), None)?,
                up: w.linear(&hf("mlp.up_proj.weight"), &gg("ffn_up.weight"), None)?,
                down: w.linear(&hf("mlp.down_proj.weight"), &gg("ffn_down.weight"), None)?,
                act: Activation::GeluTanh,
            },
            post_mlp_norm: Some(norm(
                w,
                &hf("post_feedforward_layernorm.weight"),
                &gg("post_ffw_norm.weight"),
            )?),
            sliding: cfg.layer_is_sliding[i],
        });
    }
    let final_norm = norm(w, "model.norm.weight", "output_norm.weight")?;
    let lm_head = if !cfg.tie_word_embeddings && w.has("lm_head.weight", "output.weight") {
        w.linear("lm_head.weight", "output.weight", None)?
    } else {
        embed.as_linear()?
    };
    Ok(Decoder {
        rope_global: Rope::new(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling.as_ref()),
        rope_local: Rope::new(cfg.rope_local_theta, cfg.head_dim, None),
        embed_scale: Some((cfg.d_model as f64).sqrt() as f32),
        cfg,
        embed,
        blocks,
        final_norm,
        lm_head,
        device: w.device.clone(),
    })
}
