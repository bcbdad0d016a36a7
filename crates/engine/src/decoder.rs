//! The decoder-only forward pass shared by every architecture (Gemma 2 / 3, Llama, GPT-2, Qwen 2 / 3,
//! Mistral, Phi-3, OLMo 2).
//! Architecture files build a [`Decoder`] from their own weights and config (norm kind, biases,
//! rotary or learned positions, soft-caps, pre- or post-norms, q/k norms); the forward pass is written once, with
//! every hook point at its site.
//!
//! Hook sites, relative to norms and soft-caps:
//! - `hook_embed`: token embeddings, after Gemma's `sqrt(d_model)` scale; `hook_pos_embed`
//!   (GPT-2 only): the learned position embeddings added to them.
//! - `hook_resid_pre` / `hook_resid_mid` / `hook_resid_post`: the un-normed residual stream.
//! - `attn.hook_q/k` after q/k norms, before rotary; `attn.hook_rot_q/k` after rotary;
//!   `attn.hook_attn_scores` after the scale, the attention soft-cap (Gemma 2) and the mask;
//!   `attn.hook_pattern` after softmax.
//! - `attn.hook_result` and `hook_attn_out` after Gemma's post-attention norm (`hook_result` splits
//!   it over heads with the norm's scale frozen); the output bias (GPT-2) is in `hook_attn_out` only.
//! - `hook_mlp_out` after Gemma's post-feed-forward norm.
//! - `ln_final.hook_normalized`: after the final norm, before the unembedding and the final
//!   logit soft-cap (Gemma 2).

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::hooks::{HookCtx, HookName, HookPoint, Hooks, StandingHooks};
use crate::layers::{
    attention, build_mask, check_finite, check_ids, check_normable, fire, positions, softcap,
    AttnParams, AttnWeights, KvCache, LayerKv, LogitsAt, MaskRef, Mlp, Norm, Rope,
};
use crate::weights::{Embedding, Linear};
use candle_core::{DType, Device, Tensor};

pub struct Block {
    /// The pre-attention norm; None where the block normalises only after (OLMo 2).
    pub attn_norm: Option<Norm>,
    pub attn: AttnWeights,
    /// Gemma's norm on the attention output before it joins the residual stream.
    pub post_attn_norm: Option<Norm>,
    /// The pre-MLP norm; None for OLMo 2.
    pub mlp_norm: Option<Norm>,
    pub mlp: Mlp,
    pub post_mlp_norm: Option<Norm>,
    pub sliding: bool,
}

pub struct Decoder {
    pub cfg: ModelConfig,
    pub embed: Embedding,
    /// Gemma multiplies embeddings by sqrt(d_model), held as an f32 scalar.
    pub embed_scale: Option<f32>,
    /// Learned absolute position embeddings (GPT-2); models with rotary have none.
    pub pos_embed: Option<Embedding>,
    pub blocks: Vec<Block>,
    pub final_norm: Norm,
    pub lm_head: Linear,
    /// Rotary tables of global and sliding layers; None where positions are learned.
    pub rope_global: Option<Rope>,
    pub rope_local: Option<Rope>,
    pub device: Device,
    /// Calls longer than this many positions compute attention this many query rows at a time
    /// (memory linear in the prompt instead of quadratic); the numbers are the same.
    pub attention_block: usize,
    /// The MLP runs this many rows (batch x positions) at a time where more come and no hook
    /// reads inside it, so a long prompt holds its `rows x d_mlp` intermediates a chunk at a
    /// time; the numbers are the same (each row's MLP is independent of the others).
    pub mlp_chunk_rows: usize,
    /// Interventions on every forward until removed ([`crate::Model::add_hook`]).
    pub standing: StandingHooks,
}

/// Rotary tables, masks and attention parameters of one forward call, shared by its blocks.
/// Tables are built for the rows in `pad`; a single row (`pad = [0]`) broadcasts over any batch.
pub struct CallCtx {
    pub pad: Vec<usize>,
    pub start: usize,
    pub t: usize,
    cs_global: Option<(Tensor, Tensor)>,
    cs_local: Option<(Tensor, Tensor)>,
    /// Whole masks, for calls of at most `attention_block` positions; longer calls build them a
    /// block of query rows at a time inside attention.
    mask_global: Option<Tensor>,
    mask_local: Option<Tensor>,
    block: usize,
    params: AttnParams,
    /// Only the last position's logits are wanted ([`LogitsAt::Last`], set by
    /// [`Decoder::forward`]): the last block then runs its MLP on the last position alone when
    /// no hook reads that block after attention (see [`tail_hooked`]).
    last_position_only: bool,
}

/// Whether a hook reads block `l` after its attention (`hook_resid_mid` and every point after
/// it) or reads `ln_final`: where none does and only the last logits are wanted, the last block
/// keeps the last position after its attention (whose keys and values still cover every
/// position) and runs the rest on it alone.
fn tail_hooked(hooks: &Hooks, l: usize) -> bool {
    HookPoint::BLOCK
        .iter()
        .skip_while(|&&p| p != HookPoint::ResidMid)
        .any(|&p| hooks.wants(HookName::block(l, p)))
        || hooks.wants(HookName::global(HookPoint::LnFinal))
}

/// Query rows per attention block for long calls (see [`Decoder::attention_block`]).
pub const DEFAULT_ATTENTION_BLOCK: usize = 512;

/// Rows per MLP chunk for long calls (see [`Decoder::mlp_chunk_rows`]): a gated MLP's four
/// `rows x d_mlp` intermediates are 16 MiB each for gemma-3-270m, instead of 256 MiB each on a
/// 32k-token prompt; and at 16 MiB, glibc's malloc reuses freed buffers rather than mapping
/// fresh (page-faulting) memory for each.
pub const DEFAULT_MLP_CHUNK_ROWS: usize = 2048;

impl Decoder {
    /// The per-call tables for `t` new positions after `start` cached ones.
    pub fn call_ctx(&self, pad: &[usize], start: usize, t: usize) -> Result<CallCtx> {
        let cfg = &self.cfg;
        let pos = positions(pad, start, t);
        let cs_global = match &self.rope_global {
            Some(r) => Some(r.cos_sin(&pos, &self.device)?),
            None => None,
        };
        let any_sliding = self.blocks.iter().any(|b| b.sliding);
        let cs_local = match &self.rope_local {
            Some(r) if any_sliding => Some(r.cos_sin(&pos, &self.device)?),
            _ => None,
        };
        let block = self.attention_block.max(1);
        let whole = t <= block;
        let mask_global = match whole {
            true => Some(build_mask(pad, start, t, None, &self.device)?),
            false => None,
        };
        let mask_local = match cfg.sliding_window {
            Some(w) if whole && any_sliding && w < start + t => {
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
            block,
            last_position_only: false,
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

    /// Token embeddings (scaled for Gemma) with `hook_embed` fired, plus learned position
    /// embeddings (GPT-2, `hook_pos_embed`) at each row's positions (counted from its first real
    /// token, as HF does from the attention mask): the input of block 0.
    pub fn embed_ids(&self, ids: &Tensor, hooks: &mut Hooks, ctx: &mut HookCtx) -> Result<Tensor> {
        self.standing
            .around(hooks, |hooks| self.embed_ids_inner(ids, hooks, ctx))
    }

    fn embed_ids_inner(
        &self,
        ids: &Tensor,
        hooks: &mut Hooks,
        ctx: &mut HookCtx,
    ) -> Result<Tensor> {
        let mut x = self.embed.lookup(ids)?;
        if let Some(s) = self.embed_scale {
            x = x.broadcast_mul(&Tensor::new(s, &self.device)?)?;
        }
        let x = fire(hooks, HookName::global(HookPoint::Embed), x, ctx)?;
        let Some(pe) = &self.pos_embed else {
            return Ok(x);
        };
        let t = ids.dim(1)?;
        let pos = positions(&ctx.pad, ctx.start, t);
        let pos = Tensor::new(pos, &self.device)?;
        let p = fire(
            hooks,
            HookName::global(HookPoint::PosEmbed),
            pe.lookup(&pos)?,
            ctx,
        )?;
        Ok((x + p)?)
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
        self.standing.around(hooks, |hooks| {
            self.block_forward_inner(l, x, cc, layer_kv, hooks, ctx)
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward_inner(
        &self,
        l: usize,
        x: Tensor,
        cc: &CallCtx,
        layer_kv: Option<&mut LayerKv>,
        hooks: &mut Hooks,
        ctx: &mut HookCtx,
    ) -> Result<Tensor> {
        let blk = &self.blocks[l];
        let hn = |p| HookName::block(l, p);
        let mut x = fire(hooks, hn(HookPoint::ResidPre), x, ctx)?;
        // The normed input lives only as long as attention reads it.
        let h = pre_norm(blk.attn_norm.as_ref(), &x)?;
        let cs = if blk.sliding {
            cc.cs_local.as_ref().or(cc.cs_global.as_ref())
        } else {
            cc.cs_global.as_ref()
        };
        let window = self.cfg.sliding_window.filter(|_| blk.sliding);
        let mask = match (&cc.mask_global, &cc.mask_local) {
            (Some(_), Some(local)) if blk.sliding => MaskRef::Built(local),
            (Some(global), _) => MaskRef::Built(global),
            (None, _) => MaskRef::Blocks {
                pad: &cc.pad,
                start: cc.start,
                window,
                block: cc.block,
            },
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
        drop(h);
        let a = fire(hooks, hn(HookPoint::AttnOut), a, ctx)?;
        x = (x + a)?;
        // The last block's MLP is most of its work; its other positions would feed nothing.
        let t = x.dim(1)?;
        if cc.last_position_only && l + 1 == self.blocks.len() && t > 1 && !tail_hooked(hooks, l) {
            x = x.narrow(1, t - 1, 1)?;
        }
        x = fire(hooks, hn(HookPoint::ResidMid), x, ctx)?;
        let h = pre_norm(blk.mlp_norm.as_ref(), &x)?;
        let mut m = blk.mlp.forward(l, &h, self.mlp_chunk_rows, hooks, ctx)?;
        drop(h);
        if let Some(pn) = &blk.post_mlp_norm {
            m = pn.forward(&m)?;
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
        self.standing
            .around(hooks, |hooks| self.head_inner(x, hooks, ctx, logits_at))
    }

    fn head_inner(
        &self,
        x: &Tensor,
        hooks: &mut Hooks,
        ctx: &mut HookCtx,
        logits_at: LogitsAt,
    ) -> Result<Option<Tensor>> {
        let t = x.dim(1)?;
        let normed = self.final_norm.forward(x)?;
        let normed = fire(hooks, HookName::global(HookPoint::LnFinal), normed, ctx)?;
        let logits = match logits_at {
            LogitsAt::None => return Ok(None),
            LogitsAt::Last => self
                .lm_head
                .forward(&normed.narrow(1, t - 1, 1)?.squeeze(1)?)?,
            LogitsAt::All => self.lm_head.forward(&normed)?,
        };
        let logits = softcap(logits.to_dtype(DType::F32)?, self.cfg.final_logit_softcap)?;
        check_finite(&logits, "logits", || {
            "check the weights, the dtype and any interventions".into()
        })?;
        Ok(Some(logits))
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
        let (b, t) = ids.dims2()?;
        let mut ctx = HookCtx {
            name: HookName::global(HookPoint::Embed),
            pad: pad.to_vec(),
            start,
        };
        let n_run = match hooks.stop_after_block {
            Some(l) if l + 1 < self.blocks.len() => {
                if !matches!(logits_at, LogitsAt::None) {
                    return Err(EngineError::InvalidArgument(format!(
                        "stop_after_block {l} leaves no logits; use it only for captures"
                    )));
                }
                l + 1
            }
            _ => self.blocks.len(),
        };
        let (first, mut x) = match hooks.start_at_block.take() {
            Some((l, resid)) => {
                if l >= n_run {
                    return Err(EngineError::InvalidArgument(format!(
                        "start_at_block {l} needs a forward that runs block {l} (the model has {} blocks, this call runs {n_run})",
                        self.blocks.len()
                    )));
                }
                let want = [b, t, cfg.d_model];
                if resid.dims() != want {
                    return Err(EngineError::InvalidArgument(format!(
                        "start_at_block {l} got a residual of shape {:?}, but this batch needs {want:?} (blocks.{l}.hook_resid_pre of the same ids)",
                        resid.dims()
                    )));
                }
                (l, resid)
            }
            None => (0, self.embed_ids(ids, hooks, &mut ctx)?),
        };
        if let Some(c) = kv.as_ref() {
            // A cache filled by a call that stopped early holds only the blocks it ran, and one
            // filled by a call that started late has no keys before its start.
            if c.layers.len() < n_run {
                return Err(EngineError::InvalidArgument(format!(
                    "the KV cache holds {} blocks but this call runs {n_run}; it was filled by a call that stopped early",
                    c.layers.len()
                )));
            }
            if let Some(l) = (first..n_run).find(|&l| start > 0 && c.layers[l].is_empty()) {
                return Err(EngineError::InvalidArgument(format!(
                    "the KV cache has no keys for block {l}: the call that filled it started after that block; start this call at block {l} or later"
                )));
            }
        }
        let mut cc = self.call_ctx(pad, start, t)?;
        cc.last_position_only = matches!(logits_at, LogitsAt::Last);
        for l in first..n_run {
            let layer_kv = kv.as_deref_mut().map(|c| &mut c.layers[l]);
            x = self.block_forward(l, x, &cc, layer_kv, hooks, &mut ctx)?;
            if hooks.intervenes() {
                // Name the first block whose output an edit pushed out of range.
                check_normable(
                    &x,
                    &HookName::block(l, HookPoint::ResidPost).to_string(),
                    || {
                        format!(
                            "after the interventions at {}; lower their strength",
                            hooks.intervened_hooks()
                        )
                    },
                )?;
            }
        }
        if n_run < self.blocks.len() {
            if let Some(c) = kv {
                // Keys and values exist for the blocks run only: a later call may not run more.
                c.layers.truncate(n_run);
                c.len += t;
            }
            return Ok(None);
        }
        if let Some(c) = kv {
            c.len += t;
        }
        self.head(&x, hooks, &mut ctx, logits_at)
    }

    /// `final_norm` then the unembedding (and soft-cap): the logit lens of a residual `[.., d]`.
    pub fn unembed_resid(&self, resid: &Tensor) -> Result<Tensor> {
        let normed = self.final_norm.forward(resid)?;
        softcap(self.lm_head.forward(&normed)?, self.cfg.final_logit_softcap)
    }
}

/// A block's pre-norm, or its input unchanged where the architecture has none.
fn pre_norm(norm: Option<&Norm>, x: &Tensor) -> Result<Tensor> {
    match norm {
        Some(n) => n.forward(x),
        None => Ok(x.clone()),
    }
}
