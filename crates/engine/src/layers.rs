//! Building blocks shared by the architecture files: RMSNorm, rotary tables, masks, the eager
//! attention with its hook points, the gated MLP, and the KV cache. Each op follows the order of
//! operations of Hugging Face's eager implementation so that f32 activations agree to float noise.

use crate::config::RopeScaling;
use crate::error::{EngineError, Result};
use crate::hooks::{HookCtx, HookName, HookPoint, Hooks};
use crate::weights::Linear;
use candle_core::{DType, Device, Tensor, D};

/// `x * rsqrt(mean(x^2) + eps) * mult`, in f32. `mult` is `w` (Llama) or `1 + w` (Gemma).
pub fn rms_norm(x: &Tensor, mult: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(mult)?)
}

/// Rotary frequencies for one rope base (HF `_compute_default_rope_parameters` + scaling).
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(base: f64, head_dim: usize, scaling: Option<&RopeScaling>) -> Self {
        // f32 arithmetic as in torch: base ** (arange(0, d, 2) / d)
        let mut inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0f32 / (base as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        match scaling {
            Some(RopeScaling::Linear { factor }) => {
                for f in inv.iter_mut() {
                    *f /= *factor as f32;
                }
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let low_wl = original_max_position_embeddings / low_freq_factor;
                let high_wl = original_max_position_embeddings / high_freq_factor;
                for f in inv.iter_mut() {
                    let wl = 2.0 * std::f64::consts::PI / *f as f64;
                    let v = *f as f64;
                    let scaled = if wl > low_wl {
                        v / factor
                    } else if wl < high_wl {
                        v
                    } else {
                        let smooth = (original_max_position_embeddings / wl - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * v / factor + smooth * v
                    };
                    *f = scaled as f32;
                }
            }
            None => {}
        }
        Rope { inv_freq: inv }
    }

    /// cos and sin, each `[b, 1, t, head_dim]` (frequencies repeated twice, HF layout).
    pub fn cos_sin(&self, positions: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
        let b = positions.len();
        let t = positions.first().map(|p| p.len()).unwrap_or(0);
        let half = self.inv_freq.len();
        let hd = half * 2;
        let mut cos = vec![0f32; b * t * hd];
        let mut sin = vec![0f32; b * t * hd];
        for (r, row) in positions.iter().enumerate() {
            for (i, &p) in row.iter().enumerate() {
                let base = (r * t + i) * hd;
                for (j, &f) in self.inv_freq.iter().enumerate() {
                    let a = (p as f32) * f;
                    let (s, c) = (a as f64).sin_cos();
                    cos[base + j] = c as f32;
                    cos[base + half + j] = c as f32;
                    sin[base + j] = s as f32;
                    sin[base + half + j] = s as f32;
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (b, 1, t, hd), device)?,
            Tensor::from_vec(sin, (b, 1, t, hd), device)?,
        ))
    }
}

/// `x * cos + rotate_half(x) * sin` with x `[b, h, t, d]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

/// Additive attention mask `[b, 1, t, start + t]`: 0 where allowed, -inf elsewhere.
/// Keys before a row's left padding are masked; a padding query attends to itself only (so its
/// softmax stays finite; its output is never read).
pub fn build_mask(
    pad: &[usize],
    start: usize,
    t: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let total = start + t;
    let b = pad.len();
    let mut m = vec![f32::NEG_INFINITY; b * t * total];
    for (r, &p) in pad.iter().enumerate() {
        for i in 0..t {
            let q = start + i;
            let row = &mut m[(r * t + i) * total..(r * t + i + 1) * total];
            if q < p {
                row[q] = 0.0;
                continue;
            }
            let lo = match window {
                Some(w) => (q + 1).saturating_sub(w).max(p),
                None => p,
            };
            for v in row.iter_mut().take(q + 1).skip(lo) {
                *v = 0.0;
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, t, total), device)?)
}

/// Keys and values of one layer, `[b, n_kv_heads, cached_len, d_head]`.
#[derive(Clone, Default)]
pub struct LayerKv {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

/// KV cache for incremental decoding: per layer keys/values plus the batch's left padding.
#[derive(Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    pub pad: Vec<usize>,
    /// Number of (padded) positions already processed.
    pub len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize, pad: Vec<usize>) -> Self {
        KvCache {
            layers: vec![LayerKv::default(); n_layers],
            pad,
            len: 0,
        }
    }
}

pub struct AttnWeights {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// q/k RMSNorm multipliers over d_head (Gemma 3), `1 + w`.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

pub struct AttnParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub softcap: Option<f64>,
    pub eps: f64,
}

fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, hkv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, hkv, n_rep, t, d))?
        .reshape((b, hkv * n_rep, t, d))?)
}

/// Eager multi-head attention with hooks. `x` is the normed block input `[b, t, d]`.
/// `post_norm` (Gemma) is applied to the output; returns what is added to the residual stream.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    layer: usize,
    x: &Tensor,
    w: &AttnWeights,
    p: &AttnParams,
    cos_sin: &(Tensor, Tensor),
    mask: &Tensor,
    kv: Option<&mut LayerKv>,
    post_norm: Option<&Tensor>,
    hooks: &mut Hooks,
    ctx: &mut HookCtx,
) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (h, hkv, hd) = (p.n_heads, p.n_kv_heads, p.head_dim);
    let name = |pt| HookName::block(layer, pt);

    let q = w.q.forward(x)?.reshape((b, t, h, hd))?;
    let k = w.k.forward(x)?.reshape((b, t, hkv, hd))?;
    let v = w.v.forward(x)?.reshape((b, t, hkv, hd))?;
    let q = match &w.q_norm {
        Some(m) => rms_norm(&q, m, p.eps)?,
        None => q,
    };
    let k = match &w.k_norm {
        Some(m) => rms_norm(&k, m, p.eps)?,
        None => k,
    };
    let (cos, sin) = cos_sin;
    let q = apply_rope(&q.transpose(1, 2)?.contiguous()?, cos, sin)?;
    let k = apply_rope(&k.transpose(1, 2)?.contiguous()?, cos, sin)?;
    let v = v.transpose(1, 2)?.contiguous()?;

    // Hooks see [b, t, heads, d_head] (TransformerLens layout).
    let q = fire_heads(hooks, name(HookPoint::AttnQ), q, ctx)?;
    let k = fire_heads(hooks, name(HookPoint::AttnK), k, ctx)?;
    let v = fire_heads(hooks, name(HookPoint::AttnV), v, ctx)?;

    let (k, v) = match kv {
        Some(cache) => {
            let k = match &cache.k {
                Some(prev) => Tensor::cat(&[prev, &k], 2)?,
                None => k,
            };
            let v = match &cache.v {
                Some(prev) => Tensor::cat(&[prev, &v], 2)?,
                None => v,
            };
            cache.k = Some(k.clone());
            cache.v = Some(v.clone());
            (k, v)
        }
        None => (k, v),
    };
    let k = repeat_kv(&k, h / hkv)?;
    let v = repeat_kv(&v, h / hkv)?;

    let mut scores = (q.matmul(&k.t()?)? * p.scale)?;
    if let Some(cap) = p.softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    let scores = scores.broadcast_add(mask)?;
    let scores = fire(hooks, name(HookPoint::AttnScores), scores, ctx)?;
    // The fused softmax has no backward; attribution runs (candle autograd) use the composed one.
    let pattern = if hooks.differentiable {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let pattern = fire(hooks, name(HookPoint::AttnPattern), pattern, ctx)?;
    let z = pattern.matmul(&v)?.transpose(1, 2)?.contiguous()?; // [b, t, h, hd]
    let z = fire(hooks, name(HookPoint::AttnZ), z, ctx)?;

    let result_name = name(HookPoint::AttnResult);
    if !hooks.wants(result_name) {
        let out = w.o.forward(&z.reshape((b, t, h * hd))?)?;
        return match post_norm {
            Some(m) => rms_norm(&out, m, p.eps),
            None => Ok(out),
        };
    }
    // Per-head contributions: result[b,t,h,:] = z[b,t,h,:] @ W_O[:, h*hd..(h+1)*hd]^T.
    let wo = w.o.dense_f32()?; // [d, h*hd]
    let d = wo.dim(0)?;
    let wo_h = wo.reshape((d, h, hd))?.permute((1, 2, 0))?.contiguous()?; // [h, hd, d]
    let zh = z
        .permute((2, 0, 1, 3))?
        .reshape((h, b * t, hd))?
        .contiguous()?;
    let mut result = zh
        .matmul(&wo_h)?
        .reshape((h, b, t, d))?
        .permute((1, 2, 0, 3))?
        .contiguous()?;
    if let Some(m) = post_norm {
        // Freeze the post-norm's per-position scale at its value for the sum over heads.
        let sum = result.sum(2)?;
        let inv = (sum.sqr()?.mean_keepdim(D::Minus1)? + p.eps)?
            .sqrt()?
            .recip()?; // [b,t,1]
        result = result.broadcast_mul(&inv.unsqueeze(2)?)?.broadcast_mul(m)?;
    }
    let intervened = hooks.has_intervention(result_name);
    let result = fire(hooks, result_name, result, ctx)?;
    if intervened {
        return Ok(result.sum(2)?);
    }
    // Not edited: compute the output the exact way (one o_proj matmul), as without the hook.
    let out = w.o.forward(&z.reshape((b, t, h * hd))?)?;
    match post_norm {
        Some(m) => rms_norm(&out, m, p.eps),
        None => Ok(out),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    GeluTanh,
    Silu,
}

pub struct GatedMlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub act: Activation,
}

impl GatedMlp {
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        hooks: &mut Hooks,
        ctx: &mut HookCtx,
    ) -> Result<Tensor> {
        let name = |pt| HookName::block(layer, pt);
        let g = fire(hooks, name(HookPoint::MlpPre), self.gate.forward(x)?, ctx)?;
        let u = fire(
            hooks,
            name(HookPoint::MlpPreLinear),
            self.up.forward(x)?,
            ctx,
        )?;
        let a = match self.act {
            Activation::GeluTanh => g.gelu()?,
            Activation::Silu => candle_nn::ops::silu(&g)?,
        };
        let post = fire(hooks, name(HookPoint::MlpPost), (a * u)?, ctx)?;
        self.down.forward(&post)
    }
}

/// Which positions get logits (the unembedding is the most expensive matmul of small models).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsAt {
    None,
    /// The last position of every row (rows are left padded, so this is index t - 1).
    Last,
    All,
}

/// Fires a per-head hook on a `[b, heads, t, d_head]` tensor, presenting it as
/// `[b, t, heads, d_head]`; the transposes happen only when something wants the hook.
fn fire_heads(hooks: &mut Hooks, n: HookName, x: Tensor, ctx: &mut HookCtx) -> Result<Tensor> {
    if !hooks.wants(n) {
        return Ok(x);
    }
    let y = fire(hooks, n, x.transpose(1, 2)?.contiguous()?, ctx)?;
    Ok(y.transpose(1, 2)?.contiguous()?)
}

/// Fires a global or block hook if anything wants it.
pub fn fire(hooks: &mut Hooks, n: HookName, x: Tensor, ctx: &mut HookCtx) -> Result<Tensor> {
    if hooks.wants(n) {
        ctx.name = n;
        hooks.fire(n, x, ctx)
    } else {
        Ok(x)
    }
}

/// Common checks and per-row rope positions for a forward call of `t` new tokens.
pub fn positions(pad: &[usize], start: usize, t: usize) -> Vec<Vec<u32>> {
    pad.iter()
        .map(|&p| {
            (0..t)
                .map(|i| (start + i).saturating_sub(p) as u32)
                .collect()
        })
        .collect()
}

pub fn check_ids(
    ids: &Tensor,
    vocab: usize,
    start: usize,
    max_position: usize,
    pad: &[usize],
) -> Result<()> {
    let (b, t) = ids.dims2()?;
    if t == 0 {
        return Err(EngineError::EmptyPrompt);
    }
    if pad.len() != b {
        return Err(EngineError::InvalidArgument(format!(
            "padding given for {} rows, batch has {b}",
            pad.len()
        )));
    }
    let longest = start + t - pad.iter().copied().min().unwrap_or(0);
    if longest > max_position {
        return Err(EngineError::PromptTooLong {
            len: longest,
            max: max_position,
        });
    }
    let flat = ids.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&bad) = flat.iter().find(|&&i| i as usize >= vocab) {
        return Err(EngineError::TokenOutOfRange { id: bad, vocab });
    }
    Ok(())
}

/// Applies the final logit soft-cap where the architecture has one.
pub fn softcap(x: Tensor, cap: Option<f64>) -> Result<Tensor> {
    Ok(match cap {
        Some(c) => ((x / c)?.tanh()? * c)?,
        None => x,
    })
}
