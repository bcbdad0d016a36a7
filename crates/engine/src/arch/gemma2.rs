//! Gemma 2: scaled embeddings, four RMSNorms per block (pre and post attention, pre and post
//! feed-forward), alternating sliding-window / global layers sharing one rope base, attention
//! logit soft-cap, final logit soft-cap, `query_pre_attn_scalar`, GELU-tanh gated MLP, tied
//! unembedding, `(1 + w)` norms.
//!
//! Gemma 3 is this block plus q/k norms and a second rope base: [`gemma_block`] builds both.
//!
//! GGUF: llama.cpp stores every Gemma norm weight as `w + 1`; like transformers' GGUF loader we
//! take `w = stored - 1` and multiply by `1 + w` (the f32 rounding then matches HF exactly).

use crate::config::{Architecture, GgufMeta, HfJson, ModelConfig};
use crate::decoder::{Block, Decoder};
use crate::error::{EngineError, Result};
use crate::layers::{Activation, AttnWeights, Mlp, Norm, QkNorm, Rope};
use crate::weights::Weights;
use candle_core::Tensor;

pub fn config_from_gguf(m: &GgufMeta) -> Result<ModelConfig> {
    let a = "gemma2";
    let n_layers = m.usize(&format!("{a}.block_count"))?;
    let d_model = m.usize(&format!("{a}.embedding_length"))?;
    let n_heads = m.usize(&format!("{a}.attention.head_count"))?;
    let head_dim = m.usize_or(&format!("{a}.attention.key_length"), d_model / n_heads)?;
    let theta = m.f64_or(&format!("{a}.rope.freq_base"), 10_000.0)?;
    Ok(ModelConfig {
        arch: Architecture::Gemma2,
        n_layers,
        d_model,
        n_heads,
        n_kv_heads: m.usize_or(&format!("{a}.attention.head_count_kv"), n_heads)?,
        head_dim,
        d_mlp: m.usize(&format!("{a}.feed_forward_length"))?,
        vocab_size: 0,
        max_position: m.usize(&format!("{a}.context_length"))?,
        rms_norm_eps: m.f64(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
        rope_theta: theta,
        rope_local_theta: theta,
        rope_scaling: None,
        rotary_dim: head_dim,
        sliding_window: Some(m.usize_or(&format!("{a}.attention.sliding_window"), 4096)?),
        // llama.cpp: even layers slide, odd layers are global.
        layer_is_sliding: (0..n_layers).map(|i| i % 2 == 0).collect(),
        query_pre_attn_scalar: m.f64_or(
            &format!("{a}.attention.query_pre_attn_scalar"),
            head_dim as f64,
        )?,
        attn_logit_softcap: m
            .f64_or(&format!("{a}.attn_logit_softcapping"), 50.0)
            .map(|x| (x > 0.0).then_some(x))?,
        final_logit_softcap: m
            .f64_or(&format!("{a}.final_logit_softcapping"), 30.0)
            .map(|x| (x > 0.0).then_some(x))?,
        tie_word_embeddings: true,
        activation: Activation::GeluTanh,
    })
}

/// Per-layer sliding flags from `layer_types`, else from a period (`every`-th layer global).
pub fn sliding_layers(j: &HfJson, n_layers: usize, default_period: usize) -> Result<Vec<bool>> {
    let flags: Vec<bool> = match j.opt("layer_types").and_then(|x| x.as_array()) {
        Some(types) => types
            .iter()
            .map(|t| t.as_str() == Some("sliding_attention"))
            .collect(),
        None => {
            let p = j.usize_or(
                "sliding_window_pattern",
                j.usize_or("_sliding_window_pattern", default_period)?,
            )?;
            (0..n_layers).map(|i| (i + 1) % p.max(1) != 0).collect()
        }
    };
    if flags.len() != n_layers {
        return Err(EngineError::BadField {
            file: j.file.clone(),
            field: "layer_types".into(),
            reason: format!("{} entries for {n_layers} layers", flags.len()),
        });
    }
    Ok(flags)
}

pub fn config_from_hf(v: &serde_json::Value, file: &str) -> Result<ModelConfig> {
    let j = HfJson {
        v,
        file: file.into(),
    };
    let n_layers = j.usize("num_hidden_layers")?;
    let d_model = j.usize("hidden_size")?;
    let n_heads = j.usize("num_attention_heads")?;
    let head_dim = j.usize_or("head_dim", d_model / n_heads)?;
    // HF Gemma 2: layer i slides when i is even (period 2, the odd ones are global).
    let layer_is_sliding = sliding_layers(&j, n_layers, 2)?;
    let rope = j.rope("full_attention", "rope_theta", 10_000.0, head_dim)?;
    let activation = gemma_activation(&j)?;
    Ok(ModelConfig {
        arch: Architecture::Gemma2,
        n_layers,
        d_model,
        n_heads,
        n_kv_heads: j.usize_or("num_key_value_heads", n_heads)?,
        head_dim,
        d_mlp: j.usize("intermediate_size")?,
        vocab_size: j.usize("vocab_size")?,
        max_position: j.usize_or("max_position_embeddings", 8192)?,
        rms_norm_eps: j.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta: rope.theta,
        rope_local_theta: rope.theta,
        rope_scaling: rope.scaling,
        rotary_dim: rope.rotary_dim,
        sliding_window: Some(j.usize_or("sliding_window", 4096)?),
        layer_is_sliding,
        query_pre_attn_scalar: j.f64_or("query_pre_attn_scalar", head_dim as f64)?,
        attn_logit_softcap: j.opt_f64("attn_logit_softcapping")?,
        final_logit_softcap: j.opt_f64("final_logit_softcapping")?,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", true),
        activation,
    })
}

/// Gemma's MLP activation: `hidden_activation` (HF uses it; default gelu_pytorch_tanh), else the
/// older `hidden_act`.
pub fn gemma_activation(j: &HfJson) -> Result<Activation> {
    match j.str("hidden_activation") {
        Some(a) => Activation::from_hf(a, &j.file, "hidden_activation"),
        None => match j.str("hidden_act") {
            Some(a) => Activation::from_hf(a, &j.file, "hidden_act"),
            None => Ok(Activation::GeluTanh),
        },
    }
}

/// RMSNorm with multiplier `1 + w`, with `w` taken back from llama.cpp's `w + 1` for GGUF.
pub fn gemma_norm(w: &Weights, hf: &str, gguf: &str, eps: f64) -> Result<Norm> {
    Ok(Norm::Rms {
        mult: gemma_mult(w, hf, gguf)?,
        eps,
    })
}

/// The multiplier `1 + w` of a Gemma RMSNorm (also Gemma 3's q/k norms).
fn gemma_mult(w: &Weights, hf: &str, gguf: &str) -> Result<Tensor> {
    let t = w.vector(hf, gguf)?;
    let t = if w.is_gguf() { (t - 1.0)? } else { t };
    Ok((t + 1.0)?)
}

/// One Gemma 2 / Gemma 3 block; `qk_norm` adds Gemma 3's q/k RMSNorms.
pub fn gemma_block(w: &Weights, cfg: &ModelConfig, i: usize, qk_norm: bool) -> Result<Block> {
    let hf = |s: &str| format!("model.layers.{i}.{s}");
    let gg = |s: &str| format!("blk.{i}.{s}");
    let eps = cfg.rms_norm_eps;
    let norm = |h: &str, g: &str| gemma_norm(w, &hf(h), &gg(g), eps);
    let mult = |h: &str, g: &str| gemma_mult(w, &hf(h), &gg(g));
    let qk_norm = if qk_norm {
        Some(QkNorm::PerHead {
            q: mult("self_attn.q_norm.weight", "attn_q_norm.weight")?,
            k: mult("self_attn.k_norm.weight", "attn_k_norm.weight")?,
        })
    } else {
        None
    };
    Ok(Block {
        attn_norm: Some(norm("input_layernorm.weight", "attn_norm.weight")?),
        attn: AttnWeights {
            q: w.linear(&hf("self_attn.q_proj.weight"), &gg("attn_q.weight"), None)?,
            k: w.linear(&hf("self_attn.k_proj.weight"), &gg("attn_k.weight"), None)?,
            v: w.linear(&hf("self_attn.v_proj.weight"), &gg("attn_v.weight"), None)?,
            o: w.linear(
                &hf("self_attn.o_proj.weight"),
                &gg("attn_output.weight"),
                None,
            )?,
            qk_norm,
            qkv_bias: None,
            o_bias: None,
        },
        post_attn_norm: Some(norm(
            "post_attention_layernorm.weight",
            "post_attention_norm.weight",
        )?),
        mlp_norm: Some(norm("pre_feedforward_layernorm.weight", "ffn_norm.weight")?),
        mlp: Mlp::Gated {
            gate: w.linear(&hf("mlp.gate_proj.weight"), &gg("ffn_gate.weight"), None)?,
            up: w.linear(&hf("mlp.up_proj.weight"), &gg("ffn_up.weight"), None)?,
            down: w.linear(&hf("mlp.down_proj.weight"), &gg("ffn_down.weight"), None)?,
            act: cfg.activation,
        },
        post_mlp_norm: Some(norm(
            "post_feedforward_layernorm.weight",
            "post_ffw_norm.weight",
        )?),
        sliding: cfg.layer_is_sliding[i],
    })
}

/// Embedding, blocks, final norm and (tied or not) unembedding of a Gemma 2 / Gemma 3 model.
pub fn gemma_decoder(
    mut cfg: ModelConfig,
    w: &Weights,
    qk_norm: bool,
    rope_local: Rope,
) -> Result<Decoder> {
    let embed = w.embedding("model.embed_tokens.weight", "token_embd.weight")?;
    cfg.vocab_size = embed.vocab_size()?;
    let blocks = (0..cfg.n_layers)
        .map(|i| gemma_block(w, &cfg, i, qk_norm))
        .collect::<Result<Vec<_>>>()?;
    let final_norm = gemma_norm(
        w,
        "model.norm.weight",
        "output_norm.weight",
        cfg.rms_norm_eps,
    )?;
    let lm_head = if !cfg.tie_word_embeddings && w.has("lm_head.weight", "output.weight") {
        w.linear("lm_head.weight", "output.weight", None)?
    } else {
        embed.as_linear()?
    };
    Ok(Decoder {
        rope_global: Some(Rope::new(
            cfg.rope_theta,
            cfg.rotary_dim,
            cfg.rope_scaling.as_ref(),
        )),
        rope_local: Some(rope_local),
        // HF multiplies by sqrt(d_model) cast to the hidden dtype (f32 here).
        embed_scale: Some((cfg.d_model as f64).sqrt() as f32),
        pos_embed: None,
        cfg,
        embed,
        blocks,
        final_norm,
        lm_head,
        device: w.device.clone(),
        attention_block: crate::decoder::DEFAULT_ATTENTION_BLOCK,
        mlp_chunk_rows: crate::decoder::DEFAULT_MLP_CHUNK_ROWS,
        standing: Default::default(),
    })
}

pub fn load(cfg: ModelConfig, w: &Weights) -> Result<Decoder> {
    // One rope for both layer types (HF builds a single rotary embedding for Gemma 2).
    let local = Rope::new(cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling.as_ref());
    gemma_decoder(cfg, w, false, local)
}
