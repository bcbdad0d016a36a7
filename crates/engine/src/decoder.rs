//! The decoder-only forward pass shared by the pre-norm RMSNorm architectures (Gemma 3, Llama).
//! Architecture files build a [`Decoder`] from their own weights and config; the forward pass is
//! written once, with every hook point at its site.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::hooks::{HookCtx, HookName, HookPoint, Hooks};
use crate::layers::{
    attention, build_mask, check_ids, fire, positions, rms_norm, softcap, AttnParams, AttnWeights,
    GatedMlp, KvCache, LogitsAt, Rope,
};
use crate::weights::{Embedding, Linear};
use candle_core::{DType, Device, Tensor};

pub struct Block {
    /// Multiplier of the pre-attention norm (`w` or `1 + w`).
    pub attn_norm: Tensor,
    pub attn: AttnWeights,
    /// Gemma's norm on the attention output before it joins the residual stream.
    pub post_attn_norm: Option<Tensor>,
    pub mlp_norm: Tensor,
    pub mlp: GatedMlp,
    pub post_mlp_norm: Option<Tensor>,
    pub sliding: bool,
}

pub struct Decoder {
    pub cfg: ModelConfig,
    pub embed: Embedding,
    /// Gemma multiplies embeddings by sqrt(d_model), held as an f32 scalar.
    pub embed_scale: Option<f32>,
    pub blocks: Vec<Block>,
    pub final_norm: Tensor,
    pub lm_head: Linear,
    pub rope_global: Rope,
    pub rope_local: Rope,
    pub device: Device,
}

impl Decoder {
    /// One forward call over `ids` `[b, t]` (left padded by `pad[r]` tokens per row). With a KV
    /// cache the call continues after the cached positions and appends to the cache.
    pub fn forward(
        &self,
        ids: &Tensor,
        pad: &[usize],
        mut kv: Option<&mut KvCache>,
        hooks: &mut Hooks,
        logits_at: LogitsAt,
    ) -> Result<Option<Tensor>> {
        let cfg = &self.cfg;
        let start = kv.as_ref().map(|c| c.len).unwrap_or(0);
        check_ids(ids, cfg.vocab_size, start, cfg.max_position, pad)?;
        let (_b, t) = ids.dims2()?;
        let mut ctx = HookCtx {
            name: HookName::global(HookPoint::Embed),
            pad: pad.to_vec(),
            start,
        };

        let mut x = self.embed.lookup(ids)?;
        if let Some(s) = self.embed_scale {
            x = x.broadcast_mul(&Tensor::new(s, &self.device)?)?;
        }
        x = fire(hooks, HookName::global(HookPoint::Embed), x, &mut ctx)?;

        let pos = positions(pad, start, t);
        let cs_global = self.rope_global.cos_sin(&pos, &self.device)?;
        let any_sliding = self.blocks.iter().any(|b| b.sliding);
        let cs_local = if any_sliding {
            Some(self.rope_local.cos_sin(&pos, &self.device)?)
        } else {
            None
        };
        let mask_global = build_mask(pad, start, t, None, &self.device)?;
        let mask_local = match cfg.sliding_window {
            Some(w) if any_sliding && w < start + t => {
                Some(build_mask(pad, start, t, Some(w), &self.device)?)
            }
            _ => None,
        };
        let params = AttnParams {
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            scale: cfg.attn_scale(),
            softcap: cfg.attn_logit_softcap,
            eps: cfg.rms_norm_eps,
        };

        for (l, blk) in self.blocks.iter().enumerate() {
            let hn = |p| HookName::block(l, p);
            x = fire(hooks, hn(HookPoint::ResidPre), x, &mut ctx)?;
            let h = rms_norm(&x, &blk.attn_norm, cfg.rms_norm_eps)?;
            let (cs, mask) = if blk.sliding {
                (
                    cs_local.as_ref().unwrap_or(&cs_global),
                    mask_local.as_ref().unwrap_or(&mask_global),
                )
            } else {
                (&cs_global, &mask_global)
            };
            let layer_kv = kv.as_deref_mut().map(|c| &mut c.layers[l]);
            let a = attention(
                l,
                &h,
                &blk.attn,
                &params,
                cs,
                mask,
                layer_kv,
                blk.post_attn_norm.as_ref(),
                hooks,
                &mut ctx,
            )?;
            let a = fire(hooks, hn(HookPoint::AttnOut), a, &mut ctx)?;
            x = (x + a)?;
            x = fire(hooks, hn(HookPoint::ResidMid), x, &mut ctx)?;
            let h = rms_norm(&x, &blk.mlp_norm, cfg.rms_norm_eps)?;
            let mut m = blk.mlp.forward(l, &h, hooks, &mut ctx)?;
            if let Some(pn) = &blk.post_mlp_norm {
                m = rms_norm(&m, pn, cfg.rms_norm_eps)?;
            }
            let m = fire(hooks, hn(HookPoint::MlpOut), m, &mut ctx)?;
            x = (x + m)?;
            x = fire(hooks, hn(HookPoint::ResidPost), x, &mut ctx)?;
        }
        if let Some(c) = kv {
            c.len += t;
        }
        let normed = rms_norm(&x, &self.final_norm, cfg.rms_norm_eps)?;
        let normed = fire(
            hooks,
            HookName::global(HookPoint::LnFinal),
            normed,
            &mut ctx,
        )?;
        let logits = match logits_at {
            LogitsAt::None => return Ok(None),
            LogitsAt::Last => self
                .lm_head
                .forward(&normed.narrow(1, t - 1, 1)?.squeeze(1)?)?,
            LogitsAt::All => self.lm_head.forward(&normed)?,
        };
        Ok(Some(softcap(
            logits.to_dtype(DType::F32)?,
            cfg.final_logit_softcap,
        )?))
    }

    /// `final_norm` then the unembedding (and soft-cap): the logit lens of a residual `[.., d]`.
    pub fn unembed_resid(&self, resid: &Tensor) -> Result<Tensor> {
        let normed = rms_norm(resid, &self.final_norm, self.cfg.rms_norm_eps)?;
        softcap(self.lm_head.forward(&normed)?, self.cfg.final_logit_softcap)
    }
}
