//! Llama family (SmolLM2, Llama 2/3, ...): RMSNorm `w * x`, rotary (rotate-half layout), SiLU
//! gated MLP, grouped-query attention, optionally tied unembedding.
//!
//! GGUF: llama.cpp permutes the rows of q/k for its interleaved rotary; we undo it at load time
//! (as transformers' GGUF loader does) so that hook_q / hook_k match Hugging Face's layout.

use crate::config::{Architecture, GgufMeta, HfJson, ModelConfig, RopeScaling};
use crate::decoder::{Block, Decoder};
use crate::error::Result;
use crate::layers::{Activation, AttnWeights, Mlp, Norm, Rope};
use crate::weights::Weights;

pub fn config_from_gguf(m: &GgufMeta) -> Result<ModelConfig> {
    let a = "llama";
    let n_layers = m.usize(&format!("{a}.block_count"))?;
    let d_model = m.usize(&format!("{a}.embedding_length"))?;
    let n_heads = m.usize(&format!("{a}.attention.head_count"))?;
    let head_dim = m.usize_or(&format!("{a}.rope.dimension_count"), d_model / n_heads)?;
    let theta = m.f64_or(&format!("{a}.rope.freq_base"), 10_000.0)?;
    let rope_scaling = match m.f64_or(&format!("{a}.rope.scaling.factor"), 1.0)? {
        f if f != 1.0 => Some(RopeScaling::Linear { factor: f }),
        _ => None,
    };
    Ok(ModelConfig {
        arch: Architecture::Llama,
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
        rope_scaling,
        sliding_window: None,
        layer_is_sliding: vec![false; n_layers],
        query_pre_attn_scalar: head_dim as f64,
        attn_logit_softcap: None,
        final_logit_softcap: None,
        tie_word_embeddings: true, // decided at load time: tied when output.weight is absent
        activation: Activation::Silu,
    })
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
    let (theta, scaling) = j.rope("full_attention", "rope_theta", 10_000.0)?;
    if j.bool_or("mlp_bias", false) {
        return Err(crate::error::EngineError::BadField {
            file: file.into(),
            field: "mlp_bias".into(),
            reason: "true is not supported (MLP biases); only attention_bias is".into(),
        });
    }
    Ok(ModelConfig {
        arch: Architecture::Llama,
        n_layers,
        d_model,
        n_heads,
        n_kv_heads: j.usize_or("num_key_value_heads", n_heads)?,
        head_dim,
        d_mlp: j.usize("intermediate_size")?,
        vocab_size: j.usize("vocab_size")?,
        max_position: j.usize_or("max_position_embeddings", 2048)?,
        rms_norm_eps: j.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta: theta,
        rope_local_theta: theta,
        rope_scaling: scaling,
        sliding_window: None,
        layer_is_sliding: vec![false; n_layers],
        query_pre_attn_scalar: head_dim as f64,
        attn_logit_softcap: None,
        final_logit_softcap: None,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", false),
        activation: Activation::from_hf(j.str("hidden_act").unwrap_or("silu"), file, "hidden_act")?,
    })
}

/// Row order that undoes llama.cpp's q/k permutation: HF row `j` is GGUF row `perm[j]`.
/// llama.cpp: `w.reshape(n_head, 2, d/2, -1).swapaxes(1, 2)`; a head's HF row `half*d/2 + i`
/// sits at GGUF row `2*i + half`.
pub fn unpermute_rows(n_head: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut perm = Vec::with_capacity(n_head * head_dim);
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                perm.push(h * head_dim + 2 * i + s);
            }
        }
    }
    perm
}

pub fn load(mut cfg: ModelConfig, w: &Weights) -> Result<Decoder> {
    let embed = w.embedding("model.embed_tokens.weight", "token_embd.weight")?;
    cfg.vocab_size = embed.vocab_size()?;
    let gguf = w.is_gguf();
    let q_perm = gguf.then(|| unpermute_rows(cfg.n_heads, cfg.head_dim));
    let k_perm = gguf.then(|| unpermute_rows(cfg.n_kv_heads, cfg.head_dim));
    let eps = cfg.rms_norm_eps;
    let rms = |hf: &str, gg: &str| -> Result<Norm> {
        Ok(Norm::Rms {
            mult: w.vector(hf, gg)?,
            eps,
        })
    };
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let hf = |s: &str| format!("model.layers.{i}.{s}");
        let gg = |s: &str| format!("blk.{i}.{s}");
        // `attention_bias` checkpoints (and GGUF files that carry them) have q/k/v/o biases.
        let qkv_bias = if w.has(&hf("self_attn.q_proj.bias"), &gg("attn_q.bias")) {
            let b = |h: &str, g: &str, perm: Option<&[usize]>| -> Result<_> {
                let t = w.vector(&hf(h), &gg(g))?;
                Ok(match perm {
                    Some(p) => t.index_select(
                        &candle_core::Tensor::from_vec(
                            p.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                            p.len(),
                            t.device(),
                        )?,
                        0,
                    )?,
                    None => t,
                })
            };
            Some([
                b("self_attn.q_proj.bias", "attn_q.bias", q_perm.as_deref())?,
                b("self_attn.k_proj.bias", "attn_k.bias", k_perm.as_deref())?,
                b("self_attn.v_proj.bias", "attn_v.bias", None)?,
            ])
        } else {
            None
        };
        let o_bias = if w.has(&hf("self_attn.o_proj.bias"), &gg("attn_output.bias")) {
            Some(w.vector(&hf("self_attn.o_proj.bias"), &gg("attn_output.bias"))?)
        } else {
            None
        };
        blocks.push(Block {
            attn_norm: rms(&hf("input_layernorm.weight"), &gg("attn_norm.weight"))?,
            attn: AttnWeights {
                q: w.linear(
                    &hf("self_attn.q_proj.weight"),
                    &gg("attn_q.weight"),
                    q_perm.as_deref(),
                )?,
                k: w.linear(
                    &hf("self_attn.k_proj.weight"),
                    &gg("attn_k.weight"),
                    k_perm.as_deref(),
                )?,
                v: w.linear(&hf("self_attn.v_proj.weight"), &gg("attn_v.weight"), None)?,
                o: w.linear(
                    &hf("self_attn.o_proj.weight"),
                    &gg("attn_output.weight"),
                    None,
                )?,
                q_norm: None,
                k_norm: None,
                qkv_bias,
                o_bias,
            },
            post_attn_norm: None,
            mlp_norm: rms(
                &hf("post_attention_layernorm.weight"),
                &gg("ffn_norm.weight"),
            )?,
            mlp: Mlp::Gated {
                gate: w.linear(&hf("mlp.gate_proj.weight"), &gg("ffn_gate.weight"), None)?,
                up: w.linear(&hf("mlp.up_proj.weight"), &gg("ffn_up.weight"), None)?,
                down: w.linear(&hf("mlp.down_proj.weight"), &gg("ffn_down.weight"), None)?,
                act: cfg.activation,
            },
            post_mlp_norm: None,
            sliding: false,
        });
    }
    let final_norm = rms("model.norm.weight", "output_norm.weight")?;
    let (lm_head, tied) = w.unembedding(&embed, cfg.tie_word_embeddings)?;
    cfg.tie_word_embeddings = tied;
    Ok(Decoder {
        rope_global: Some(Rope::new(
            cfg.rope_theta,
            cfg.head_dim,
            cfg.rope_scaling.as_ref(),
        )),
        rope_local: None,
        embed_scale: None,
        pos_embed: None,
        cfg,
        embed,
        blocks,
        final_norm,
        lm_head,
        device: w.device.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp permute of rows for one head of dim 8: reshape(2, 4) -> swap -> (4, 2)
        let (n_head, hd) = (2, 8);
        let hf_rows: Vec<usize> = (0..n_head * hd).collect();
        let mut gguf_rows = vec![0; n_head * hd];
        for h in 0..n_head {
            for s in 0..2 {
                for i in 0..hd / 2 {
                    // HF row (h, s, i) goes to GGUF row (h, i, s)
                    gguf_rows[h * hd + i * 2 + s] = hf_rows[h * hd + s * hd / 2 + i];
                }
            }
        }
        let perm = unpermute_rows(n_head, hd);
        let back: Vec<usize> = perm.iter().map(|&g| gguf_rows[g]).collect();
        assert_eq!(back, hf_rows);
    }
}
