//! The decoder-only forward pass shared by the pre-norm RMSNorm architectures (Gemma 3, Llama).
//! Architecture files build a [`Decoder`] from their own weights and config; the forward pass is
//! written once, with every hook point at its site.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::hooks::{HookCtx, HookName, HookPoint, Hooks};
use crate::layers::{
    attention, build_mask, check_ids, fire, positions, rms_norm, softcap, AttnParams, AttnWeights,
    GatedMlp, KvCache, LayerKv, LogitsAt, Rope,
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

/// Rotary tables, masks and attention parameters of one forward call, shared by its blocks.
/// Tables are built for the rows in `pad`; a single row (`pad = [0]`) broadcasts over any batch.
pub struct CallCtx {
    pub pad: Vec<usize>,
    pub start: usize,
    pub t: usize,
    cs_global: (Tensor, Tensor),
    cs_local: Option<(Tensor, Tensor)>,
    mask_global: Tensor,
    mask_local: Option<Tensor>,
    params: AttnParams,
}

impl Decoder {
    /// The per-call tables for `t` new positions after `start` cached ones.
    pub fn call_ctx(&self, pad: &[usize], start: usize, t: usize) -> Result<CallCtx> {
        let cfg = &self.cfg;
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
        Ok(CallCtx {
            pad: pad.to_vec(),
            start,
            t,
            cs_global,
            cs_local,
            mask_global,
            mask_local,
            params: AttnParams {
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: cfg.head_dim,
                scale: cfg.attn_scale(),
                softcap: cfg.attn_logit_softcap,
                eps: cfg.rms_norm_eps,
            },
        })
    }

    /// Token embeddings (scaled for Gemma) with `hook_embed` fired.
    pub fn embed_ids(&self, ids: &Tensor, hooks: &mut Hooks, ctx: &mut HookCtx) -> Result<Tensor> {
        let mut x = self.embed.lookup(ids)?;
        if let Some(s) = self.embed_scale {
            x = x.broadcast_mul(&Tensor::new(s, &self.device)?)?;
        }
        fire(hooks, HookName::global(HookPoint::Embed), x, ctx)
    }

    /// Block `l` on the residual stream `x` `[b, t, d]` (its `hook_resid_pre` included), with
    /// the layer's KV cache if any. Patching runs call this directly to start mid-model.
    #[allow(clippy::too_many_arguments)]
    pub fn block_forward(
        &self,
        l: usize,
        x: Tensor,
        cc: &CallCtx,
        layer_kv: Option<&mut LayerKv>,
        hooks: &mut Hooks,
        ctx: &mut HookCtx,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let blk = &self.blocks[l];
        let hn = |p| HookName::block(l, p);
        let mut x = fire(hooks, hn(HookPoint::ResidPre), x, ctx)?;
        let h = rms_norm(&x, &blk.attn_norm, cfg.rms_norm_eps)?;
        let (cs, mask) = if blk.sliding {
            (
                cc.cs_local.as_ref().unwrap_or(&cc.cs_global),
                cc.mask_local.as_ref().unwrap_or(&cc.mask_global),
            )
        } else {
            (&cc.cs_global, &cc.mask_global)
        };
        let a = attention(
            l,
            &h,
            &blk.attn,
            &cc.params,
            cs,
            mask,
            layer_kv,
            blk.post_attn_norm.as_ref(),
            hooks,
            ctx,
        )?;
        let a = fire(hooks, hn(HookPoint::AttnOut), a, ctx)?;
        x = (x + a)?;
        x = fire(hooks, hn(HookPoint::ResidMid), x, ctx)?;
        let h = rms_norm(&x, &blk.mlp_norm, cfg.rms_norm_eps)?;
        let mut m = blk.mlp.forward(l, &h, hooks, ctx)?;
        if let Some(pn) = &blk.post_mlp_norm {
            m = rms_norm(&m, pn, cfg.rms_norm_eps)?;
        }
        let m = fire(hooks, hn(HookPoint::MlpOut), m, ctx)?;
        x = (x + m)?;
        fire(hooks, hn(HookPoint::ResidPost), x, ctx)
    }

    /// The final norm (with `ln_final.hook_normalized`) and logits where asked.
    pub fn head(
        &self,
        x: &Tensor,
        hooks: &mut Hooks,
        ctx: &mut HookCtx,
        logits_at: LogitsAt,
    ) -> Result<Option<Tensor>> {
        let t = x.dim(1)?;
        let normed = rms_norm(x, &self.final_norm, self.cfg.rms_norm_eps)?;
        let normed = fire(hooks, HookName::global(HookPoint::LnFinal), normed, ctx)?;
        let logits = match logits_at {
            LogitsAt::None => return Ok(None),
            LogitsAt::Last => self
                .lm_head
                .forward(&normed.narrow(1, t - 1, 1)?.squeeze(1)?)?,
            LogitsAt::All => self.lm_head.forward(&normed)?,
        };
        Ok(Some(softcap(
            logits.to_dtype(DType::F32)?,
            self.cfg.final_logit_softcap,
        )?))
    }

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
        let mut x = self.embed_ids(ids, hooks, &mut ctx)?;
        let cc = self.call_ctx(pad, start, t)?;
        for l in 0..self.blocks.len() {
            let layer_kv = kv.as_deref_mut().map(|c| &mut c.layers[l]);
            x = self.block_forward(l, x, &cc, layer_kv, hooks, &mut ctx)?;
        }
        if let Some(c) = kv {
            c.len += t;
        }
        self.head(&x, hooks, &mut ctx, logits_at)
    }

    /// `final_norm` then the unembedding (and soft-cap): the logit lens of a residual `[.., d]`.
    pub fn unembed_resid(&self, resid: &Tensor) -> Result<Tensor> {
        let normed = rms_norm(resid, &self.final_norm, self.cfg.rms_norm_eps)?;
        softcap(self.lm_head.forward(&normed)?, self.cfg.final_logit_softcap)
    }
}
