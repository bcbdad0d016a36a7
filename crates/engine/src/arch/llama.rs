//! Llama family (SmolLM2, Llama 2/3, ...): RMSNorm `w * x`, rotary (rotate-half layout), SiLU
//! gated MLP, grouped-query attention, optionally tied unembedding.
//!
//! The families built on Llama's block (Qwen 2/3, Mistral, Phi-3, OLMo 2) share its loader,
//! [`decoder`], through a [`Layout`] that names what differs: q/k norms, pre- or post-norms,
//! fused projections, llama.cpp's q/k row order. Their config parsing shares [`hf_config`] and
//! [`gguf_config`].
//!
//! GGUF: for the `llama` architecture llama.cpp permutes the rows of q/k for its interleaved
//! rotary; we undo it at load time (as transformers' GGUF loader does) so that hook_q / hook_k
//! match Hugging Face's layout. Its other architectures keep HF's row order (NEOX rotary).

use crate::config::{
    longrope_attention_factor, Architecture, GgufMeta, HfJson, ModelConfig, RopeScaling,
};
use crate::decoder::{Block, Decoder};
use crate::error::{EngineError, Result};
use crate::layers::{Activation, AttnWeights, Mlp, Norm, QkNorm, Rope};
use crate::weights::Weights;
use candle_core::Tensor;

/// Where a family's q/k RMSNorms normalise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNormSpan {
    /// Each head's `d_head` (Qwen3).
    PerHead,
    /// The whole projection before the head split (OLMo 2).
    Projection,
}

/// Where a block's norms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// Before attention and before the MLP (Llama and most families).
    Pre,
    /// After attention and after the MLP, on their outputs, before the residual add (OLMo 2).
    Post,
}

/// What a Llama-style family changes in the block.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// llama.cpp stored q/k rows permuted for its interleaved rotary (GGUF `llama` files).
    pub gguf_qk_permuted: bool,
    pub qk_norm: Option<QkNormSpan>,
    pub norms: NormPlacement,
    /// Fused `qkv_proj` and `gate_up_proj` (Phi-3), split at load time.
    pub fused: bool,
}

impl Layout {
    pub const LLAMA: Layout = Layout {
        gguf_qk_permuted: true,
        qk_norm: None,
        norms: NormPlacement::Pre,
        fused: false,
    };
}

/// `mlp_bias` is not implemented: refused rather than ignored.
fn refuse_mlp_bias(j: &HfJson) -> Result<()> {
    if j.bool_or("mlp_bias", false) {
        return Err(EngineError::BadField {
            file: j.file.clone(),
            field: "mlp_bias".into(),
            reason: "true is not supported (MLP biases); only attention_bias is".into(),
        });
    }
    Ok(())
}

/// The fields every Llama-style `config.json` names the same way. Sliding-window layers are
/// read from `layer_types` where present; otherwise none slide (families that slide by default
/// set them after).
pub fn hf_config(j: &HfJson, arch: Architecture, default_theta: f64) -> Result<ModelConfig> {
    refuse_mlp_bias(j)?;
    let n_layers = j.usize("num_hidden_layers")?;
    let d_model = j.usize("hidden_size")?;
    let n_heads = j.usize("num_attention_heads")?;
    let head_dim = j.usize_or("head_dim", d_model / n_heads)?;
    let rope = j.rope("full_attention", "rope_theta", default_theta, head_dim)?;
    let sliding_window = j
        .opt("sliding_window")
        .and_then(|x| x.as_u64())
        .map(|w| w as usize);
    let layer_is_sliding = match (j.opt("layer_types"), sliding_window) {
        (Some(_), Some(_)) => super::gemma2::sliding_layers(j, n_layers, 1)?,
        _ => vec![false; n_layers],
    };
    let sliding_window = sliding_window.filter(|_| layer_is_sliding.iter().any(|&s| s));
    let mut max_position = j.usize_or("max_position_embeddings", 2048)?;
    if let Some(RopeScaling::Dynamic { factor, .. }) = &rope.scaling {
        // Dynamic NTK exists to run past the trained length: allow the context it scales to.
        max_position = (max_position as f64 * factor.max(1.0)) as usize;
    }
    Ok(ModelConfig {
        arch,
        n_layers,
        d_model,
        n_heads,
        n_kv_heads: j.usize_or("num_key_value_heads", n_heads)?,
        head_dim,
        d_mlp: j.usize("intermediate_size")?,
        vocab_size: j.usize("vocab_size")?,
        max_position,
        rms_norm_eps: j.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta: rope.theta,
        rope_local_theta: rope.theta,
        rope_scaling: rope.scaling,
        rotary_dim: rope.rotary_dim,
        sliding_window,
        layer_is_sliding,
        query_pre_attn_scalar: head_dim as f64,
        attn_logit_softcap: None,
        final_logit_softcap: None,
        tie_word_embeddings: j.bool_or("tie_word_embeddings", false),
        activation: Activation::from_hf(
            j.str("hidden_act").unwrap_or("silu"),
            &j.file,
            "hidden_act",
        )?,
    })
}

/// HF's Mistral / Phi-3 rule: one sliding-window mask for every layer whenever `sliding_window`
/// is set (no `layer_types`).
pub fn slide_every_layer_if_set(j: &HfJson, c: &mut ModelConfig) {
    if let Some(w) = j.opt("sliding_window").and_then(|x| x.as_u64()) {
        c.sliding_window = Some(w as usize);
        c.layer_is_sliding = vec![true; c.n_layers];
    }
}

/// The fields every llama.cpp architecture stores under `{a}.` the same way.
pub fn gguf_config(m: &GgufMeta, a: &str, arch: Architecture) -> Result<ModelConfig> {
    let n_layers = m.usize(&format!("{a}.block_count"))?;
    let d_model = m.usize(&format!("{a}.embedding_length"))?;
    let n_heads = m.usize(&format!("{a}.attention.head_count"))?;
    let head_dim = m.usize_or(&format!("{a}.attention.key_length"), d_model / n_heads)?;
    let rotary_dim = m.usize_or(&format!("{a}.rope.dimension_count"), head_dim)?;
    let theta = m.f64_or(&format!("{a}.rope.freq_base"), 10_000.0)?;
    let scaling_type = if m.has(&format!("{a}.rope.scaling.type")) {
        m.string(&format!("{a}.rope.scaling.type"))?
    } else {
        "linear".into()
    };
    let factor = m.f64_or(&format!("{a}.rope.scaling.factor"), 1.0)?;
    let rope_scaling = match scaling_type.as_str() {
        "none" => None,
        "linear" if factor != 1.0 => Some(RopeScaling::Linear { factor }),
        "linear" => None,
        // Phi-3.5: the factors are tensors, read at load time.
        "longrope" | "su" => None,
        other => {
            return Err(EngineError::BadField {
                file: m.file.clone(),
                field: format!("{a}.rope.scaling.type"),
                reason: format!(
                    "'{other}' is not supported in GGUF files (none, linear, longrope, and Llama 3's rope_freqs); load the Hugging Face checkpoint instead"
                ),
            })
        }
    };
    let sliding_window = if m.has(&format!("{a}.attention.sliding_window")) {
        Some(m.usize(&format!("{a}.attention.sliding_window"))?)
    } else {
        None
    };
    Ok(ModelConfig {
        arch,
        n_layers,
        d_model,
        n_heads,
        n_kv_heads: m.usize_or(&format!("{a}.attention.head_count_kv"), n_heads)?,
        head_dim,
        d_mlp: m.usize(&format!("{a}.feed_forward_length"))?,
        vocab_size: 0, // filled from the embedding
        max_position: m.usize(&format!("{a}.context_length"))?,
        rms_norm_eps: m.f64(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
        rope_theta: theta,
        rope_local_theta: theta,
        rope_scaling,
        rotary_dim,
        sliding_window,
        layer_is_sliding: vec![sliding_window.is_some(); n_layers],
        query_pre_attn_scalar: head_dim as f64,
        attn_logit_softcap: None,
        final_logit_softcap: None,
        tie_word_embeddings: true, // decided at load time: tied when output.weight is absent
        activation: Activation::Silu,
    })
}

pub fn config_from_gguf(m: &GgufMeta) -> Result<ModelConfig> {
    let mut c = gguf_config(m, "llama", Architecture::Llama)?;
    // llama.cpp's llama graph has no sliding window (Mistral files are `llama` too).
    c.sliding_window = None;
    c.layer_is_sliding = vec![false; c.n_layers];
    Ok(c)
}

pub fn config_from_hf(v: &serde_json::Value, file: &str) -> Result<ModelConfig> {
    let j = HfJson {
        v,
        file: file.into(),
    };
    hf_config(&j, Architecture::Llama, 10_000.0)
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

fn select(t: Tensor, perm: Option<&[usize]>) -> Result<Tensor> {
    Ok(match perm {
        Some(p) => t.index_select(
            &Tensor::from_vec(
                p.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                p.len(),
                t.device(),
            )?,
            0,
        )?,
        None => t,
    })
}

/// One block of a Llama-style family.
fn block(w: &Weights, cfg: &ModelConfig, layout: &Layout, i: usize) -> Result<Block> {
    let hf = |s: &str| format!("model.layers.{i}.{s}");
    let gg = |s: &str| format!("blk.{i}.{s}");
    let permuted = layout.gguf_qk_permuted && w.is_gguf();
    let q_perm = permuted.then(|| unpermute_rows(cfg.n_heads, cfg.head_dim));
    let k_perm = permuted.then(|| unpermute_rows(cfg.n_kv_heads, cfg.head_dim));
    let eps = cfg.rms_norm_eps;
    let rms = |h: &str, g: &str| -> Result<Norm> {
        Ok(Norm::Rms {
            mult: w.vector(&hf(h), &gg(g))?,
            eps,
        })
    };
    let (q_out, kv_out) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
    let (q, k, v) = if layout.fused {
        let mut parts = w
            .linear_split(
                &hf("self_attn.qkv_proj.weight"),
                &gg("attn_qkv.weight"),
                &[q_out, kv_out, kv_out],
            )?
            .into_iter();
        let mut next = || {
            parts.next().ok_or_else(|| {
                EngineError::InvalidArgument("fused qkv split returned too few parts".into())
            })
        };
        (next()?, next()?, next()?)
    } else {
        (
            w.linear(
                &hf("self_attn.q_proj.weight"),
                &gg("attn_q.weight"),
                q_perm.as_deref(),
            )?,
            w.linear(
                &hf("self_attn.k_proj.weight"),
                &gg("attn_k.weight"),
                k_perm.as_deref(),
            )?,
            w.linear(&hf("self_attn.v_proj.weight"), &gg("attn_v.weight"), None)?,
        )
    };
    // `attention_bias` checkpoints (Qwen2 always) have q/k/v biases; Llama's also an o bias.
    let qkv_bias = if w.has(&hf("self_attn.q_proj.bias"), &gg("attn_q.bias")) {
        let b = |h: &str, g: &str, perm: Option<&[usize]>| -> Result<Tensor> {
            select(w.vector(&hf(h), &gg(g))?, perm)
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
    let qk_norm = match layout.qk_norm {
        None => None,
        Some(span) => {
            let q = w.vector(&hf("self_attn.q_norm.weight"), &gg("attn_q_norm.weight"))?;
            let k = w.vector(&hf("self_attn.k_norm.weight"), &gg("attn_k_norm.weight"))?;
            Some(match span {
                QkNormSpan::PerHead => QkNorm::PerHead { q, k },
                QkNormSpan::Projection => QkNorm::Projection { q, k },
            })
        }
    };
    let mlp = if layout.fused {
        // HF Phi-3: `gate, up = gate_up_proj(x).chunk(2)`; llama.cpp keeps the fused matrix as
        // `ffn_up` with the gate half first.
        let mut parts = w
            .linear_split(
                &hf("mlp.gate_up_proj.weight"),
                &gg("ffn_up.weight"),
                &[cfg.d_mlp, cfg.d_mlp],
            )?
            .into_iter();
        let (Some(gate), Some(up)) = (parts.next(), parts.next()) else {
            return Err(EngineError::InvalidArgument(
                "fused gate_up split returned too few parts".into(),
            ));
        };
        Mlp::Gated {
            gate,
            up,
            down: w.linear(&hf("mlp.down_proj.weight"), &gg("ffn_down.weight"), None)?,
            act: cfg.activation,
        }
    } else {
        Mlp::Gated {
            gate: w.linear(&hf("mlp.gate_proj.weight"), &gg("ffn_gate.weight"), None)?,
            up: w.linear(&hf("mlp.up_proj.weight"), &gg("ffn_up.weight"), None)?,
            down: w.linear(&hf("mlp.down_proj.weight"), &gg("ffn_down.weight"), None)?,
            act: cfg.activation,
        }
    };
    let (attn_norm, mlp_norm, post_attn_norm, post_mlp_norm) = match layout.norms {
        NormPlacement::Pre => (
            Some(rms("input_layernorm.weight", "attn_norm.weight")?),
            Some(rms("post_attention_layernorm.weight", "ffn_norm.weight")?),
            None,
            None,
        ),
        NormPlacement::Post => (
            None,
            None,
            Some(rms(
                "post_attention_layernorm.weight",
                "post_attention_norm.weight",
            )?),
            Some(rms(
                "post_feedforward_layernorm.weight",
                "post_ffw_norm.weight",
            )?),
        ),
    };
    Ok(Block {
        attn_norm,
        attn: AttnWeights {
            q,
            k,
            v,
            o: w.linear(
                &hf("self_attn.o_proj.weight"),
                &gg("attn_output.weight"),
                None,
            )?,
            qk_norm,
            qkv_bias,
            o_bias,
        },
        post_attn_norm,
        mlp_norm,
        mlp,
        post_mlp_norm,
        sliding: cfg.layer_is_sliding[i],
    })
}

/// Rope scaling that llama.cpp stores as tensors: Llama 3's per-frequency divisors
/// (`rope_freqs.weight`) and Phi-3.5's LongRoPE factors (`rope_factors_short` / `_long`, with
/// `{arch}.rope.scaling.original_context_length` and `.attn_factor` in the metadata).
fn gguf_rope_factors(w: &Weights, cfg: &mut ModelConfig) -> Result<()> {
    let crate::weights::Source::Gguf { content, path, .. } = &w.source else {
        return Ok(());
    };
    let half = cfg.rotary_dim / 2;
    let factors = |name: &str| -> Result<Vec<f64>> {
        let f: Vec<f32> = w.f32("", name)?.to_vec1()?;
        if f.len() != half {
            return Err(EngineError::InvalidArgument(format!(
                "{name} has {} entries; the rotary dimension {} needs {half}",
                f.len(),
                cfg.rotary_dim
            )));
        }
        Ok(f.into_iter().map(f64::from).collect())
    };
    let a = cfg.arch.name();
    let meta = GgufMeta {
        md: &content.metadata,
        file: path.display().to_string(),
    };
    let key = format!("{a}.rope.scaling.type");
    let declared_longrope =
        meta.has(&key) && matches!(meta.string(&key)?.as_str(), "longrope" | "su");
    if declared_longrope && !w.has("", "rope_factors_long.weight") {
        return Err(EngineError::InvalidArgument(
            "GGUF file declares LongRoPE scaling but has no rope_factors_long / rope_factors_short tensors".into(),
        ));
    }
    let scaling = if w.has("", "rope_factors_long.weight") {
        let original = meta.f64(&format!("{a}.rope.scaling.original_context_length"))?;
        // HF's default when the file has none.
        let default_attn = longrope_attention_factor(cfg.max_position as f64 / original, original);
        Some(RopeScaling::Longrope {
            short_factor: factors("rope_factors_short.weight")?,
            long_factor: factors("rope_factors_long.weight")?,
            original_max_position_embeddings: original,
            attention_factor: meta
                .f64_or(&format!("{a}.rope.scaling.attn_factor"), default_attn)?,
        })
    } else if w.has("", "rope_freqs.weight") {
        Some(RopeScaling::FreqFactors {
            factors: factors("rope_freqs.weight")?,
        })
    } else {
        None
    };
    if let Some(s) = scaling {
        if cfg.rope_scaling.is_some() {
            return Err(EngineError::InvalidArgument(
                "GGUF file has both rope factor tensors and a rope scaling type".into(),
            ));
        }
        cfg.rope_scaling = Some(s);
    }
    Ok(())
}

/// Embedding, blocks, final norm and unembedding of a Llama-style family.
pub fn decoder(mut cfg: ModelConfig, w: &Weights, layout: &Layout) -> Result<Decoder> {
    let embed = w.embedding("model.embed_tokens.weight", "token_embd.weight")?;
    cfg.vocab_size = embed.vocab_size()?;
    gguf_rope_factors(w, &mut cfg)?;
    let blocks = (0..cfg.n_layers)
        .map(|i| block(w, &cfg, layout, i))
        .collect::<Result<Vec<_>>>()?;
    let final_norm = Norm::Rms {
        mult: w.vector("model.norm.weight", "output_norm.weight")?,
        eps: cfg.rms_norm_eps,
    };
    let (lm_head, tied) = w.unembedding(&embed, cfg.tie_word_embeddings)?;
    cfg.tie_word_embeddings = tied;
    Ok(Decoder {
        rope_global: Some(Rope::new(
            cfg.rope_theta,
            cfg.rotary_dim,
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
        attention_block: crate::decoder::DEFAULT_ATTENTION_BLOCK,
        mlp_chunk_rows: crate::decoder::DEFAULT_MLP_CHUNK_ROWS,
        standing: Default::default(),
    })
}

pub fn load(cfg: ModelConfig, w: &Weights) -> Result<Decoder> {
    decoder(cfg, w, &Layout::LLAMA)
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
