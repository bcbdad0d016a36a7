//! GPT-2: learned absolute positions, LayerNorm with bias (pre-norm), fused and biased q/k/v,
//! biased output projection, plain GELU MLP with biases, tied unembedding.
//!
//! Hugging Face stores GPT-2's projections as `Conv1D` weights `(in, out)` (`y = x W + b`); we
//! transpose them to the `(out, in)` layout every other architecture uses and split the fused
//! `c_attn` into q, k and v. llama.cpp's GGUF (`gpt2`) already holds `(out, in)`.
//!
//! Hooks follow TransformerLens's GPT-2: `hook_embed` is the token embedding alone,
//! `hook_pos_embed` the position embedding, and `blocks.0.hook_resid_pre` their sum (HF's
//! `hidden_states[0]`); `hook_attn_out` includes the output bias, `attn.hook_result` does not.

use crate::config::{Architecture, GgufMeta, HfJson, ModelConfig};
use crate::decoder::{Block, Decoder};
use crate::error::{EngineError, Result};
use crate::layers::{Activation, AttnWeights, Mlp, Norm};
use crate::weights::{Linear, Weights};
use candle_core::Tensor;

pub fn config_from_hf(v: &serde_json::Value, file: &str) -> Result<ModelConfig> {
    let j = HfJson {
        v,
        file: file.into(),
    };
    let bad = |field: &str, reason: String| EngineError::BadField {
        file: file.into(),
        field: field.into(),
        reason,
    };
    if j.bool_or("scale_attn_by_inverse_layer_idx", false) {
        return Err(bad(
            "scale_attn_by_inverse_layer_idx",
            "true is not supported (only the standard GPT-2 scaling)".into(),
        ));
    }
    if !j.bool_or("scale_attn_weights", true) {
        return Err(bad(
            "scale_attn_weights",
            "false is not supported (only the standard GPT-2 scaling)".into(),
        ));
    }
    let activation = Activation::from_hf(
        j.str("activation_function").unwrap_or("gelu_new"),
        file,
        "activation_function",
    )?;
    let n_layers = j.usize("n_layer")?;
    let d_model = j.usize("n_embd")?;
    let n_heads = j.usize("n_head")?;
    let head_dim = d_model / n_heads;
    let d_mlp = j.usize_or("n_inner", 4 * d_model)?;
    let mut c = gpt2_config(
        n_layers,
        d_model,
        n_heads,
        head_dim,
        d_mlp,
        j.usize("vocab_size")?,
        j.usize_or("n_positions", 1024)?,
        j.f64_or("layer_norm_epsilon", 1e-5)?,
        j.bool_or("tie_word_embeddings", true),
    );
    c.activation = activation;
    Ok(c)
}

pub fn config_from_gguf(m: &GgufMeta) -> Result<ModelConfig> {
    let a = "gpt2";
    let d_model = m.usize(&format!("{a}.embedding_length"))?;
    let n_heads = m.usize(&format!("{a}.attention.head_count"))?;
    Ok(gpt2_config(
        m.usize(&format!("{a}.block_count"))?,
        d_model,
        n_heads,
        d_model / n_heads,
        m.usize(&format!("{a}.feed_forward_length"))?,
        0,
        m.usize(&format!("{a}.context_length"))?,
        m.f64_or(&format!("{a}.attention.layer_norm_epsilon"), 1e-5)?,
        true,
    ))
}

#[allow(clippy::too_many_arguments)]
fn gpt2_config(
    n_layers: usize,
    d_model: usize,
    n_heads: usize,
    head_dim: usize,
    d_mlp: usize,
    vocab_size: usize,
    max_position: usize,
    eps: f64,
    tie: bool,
) -> ModelConfig {
    ModelConfig {
        arch: Architecture::Gpt2,
        n_layers,
        d_model,
        n_heads,
        n_kv_heads: n_heads,
        head_dim,
        d_mlp,
        vocab_size,
        max_position,
        rms_norm_eps: eps, // LayerNorm epsilon here
        rope_theta: 0.0,   // no rotary: learned positions
        rope_local_theta: 0.0,
        rope_scaling: None,
        rotary_dim: 0,
        sliding_window: None,
        layer_is_sliding: vec![false; n_layers],
        query_pre_attn_scalar: head_dim as f64,
        attn_logit_softcap: None,
        final_logit_softcap: None,
        tie_word_embeddings: tie,
        activation: Activation::GeluTanh,
    }
}

/// A projection matrix as `(out, in)` f32: HF Conv1D weights are transposed.
fn matrix(w: &Weights, hf: &str, gguf: &str) -> Result<Tensor> {
    let t = w.f32(hf, gguf)?;
    Ok(if w.is_gguf() { t } else { t.t()?.contiguous()? })
}

fn layer_norm(w: &Weights, hf: &str, gguf: &str, eps: f64) -> Result<Norm> {
    Ok(Norm::Layer {
        w: w.vector(&format!("{hf}.weight"), &format!("{gguf}.weight"))?,
        b: w.vector(&format!("{hf}.bias"), &format!("{gguf}.bias"))?,
        eps,
    })
}

pub fn load(mut cfg: ModelConfig, w: &Weights) -> Result<Decoder> {
    if matches!(w.precision, crate::weights::Precision::Quantized(_)) {
        return Err(EngineError::InvalidArgument(
            "GPT-2 is loaded dense only (its q/k/v are fused): load it without quantization".into(),
        ));
    }
    // HF names without the `transformer.` prefix exist too (GPT2Model checkpoints).
    let p = if w.has("transformer.wte.weight", "") {
        "transformer."
    } else {
        ""
    };
    let embed = w.embedding(&format!("{p}wte.weight"), "token_embd.weight")?;
    cfg.vocab_size = embed.vocab_size()?;
    let pos_embed = w.embedding(&format!("{p}wpe.weight"), "position_embd.weight")?;
    let eps = cfg.rms_norm_eps;
    let d = cfg.d_model;
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let hf = |s: &str| format!("{p}h.{i}.{s}");
        let gg = |s: &str| format!("blk.{i}.{s}");
        let qkv = matrix(w, &hf("attn.c_attn.weight"), &gg("attn_qkv.weight"))?; // [3d, d]
        let qkv_b = w.vector(&hf("attn.c_attn.bias"), &gg("attn_qkv.bias"))?; // [3d]
        let part = |t: &Tensor, k: usize| -> Result<Tensor> { Ok(t.narrow(0, k * d, d)?) };
        let lin = |t: Tensor| -> Result<Linear> { w.dense_linear(t) };
        blocks.push(Block {
            attn_norm: Some(layer_norm(w, &hf("ln_1"), &gg("attn_norm"), eps)?),
            attn: AttnWeights {
                q: lin(part(&qkv, 0)?.contiguous()?)?,
                k: lin(part(&qkv, 1)?.contiguous()?)?,
                v: lin(part(&qkv, 2)?.contiguous()?)?,
                o: lin(matrix(
                    w,
                    &hf("attn.c_proj.weight"),
                    &gg("attn_output.weight"),
                )?)?,
                qk_norm: None,
                qkv_bias: Some([part(&qkv_b, 0)?, part(&qkv_b, 1)?, part(&qkv_b, 2)?]),
                o_bias: Some(w.vector(&hf("attn.c_proj.bias"), &gg("attn_output.bias"))?),
            },
            post_attn_norm: None,
            mlp_norm: Some(layer_norm(w, &hf("ln_2"), &gg("ffn_norm"), eps)?),
            mlp: Mlp::Plain {
                fc_in: lin(matrix(w, &hf("mlp.c_fc.weight"), &gg("ffn_up.weight"))?)?,
                b_in: w.vector(&hf("mlp.c_fc.bias"), &gg("ffn_up.bias"))?,
                fc_out: lin(matrix(w, &hf("mlp.c_proj.weight"), &gg("ffn_down.weight"))?)?,
                b_out: w.vector(&hf("mlp.c_proj.bias"), &gg("ffn_down.bias"))?,
                act: cfg.activation,
            },
            post_mlp_norm: None,
            sliding: false,
        });
    }
    let final_norm = layer_norm(w, &format!("{p}ln_f"), "output_norm", eps)?;
    let (lm_head, tied) = w.unembedding(&embed, cfg.tie_word_embeddings)?;
    cfg.tie_word_embeddings = tied;
    Ok(Decoder {
        rope_global: None,
        rope_local: None,
        embed_scale: None,
        pos_embed: Some(pos_embed),
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
