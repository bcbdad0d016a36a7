//! Building blocks shared by the architecture files: RMSNorm, rotary tables, masks, the eager
//! attention with its hook points, the gated MLP, and the KV cache. Each op follows the order of
//! operations of Hugging Face's eager implementation so that f32 activations agree to float noise.

pub use crate::config::Activation;
use crate::config::RopeScaling;
use crate::error::{EngineError, Result};
use crate::hooks::{HookCtx, HookName, HookPoint, Hooks};
use crate::weights::Linear;
use candle_core::{DType, Device, Tensor, D};

/// `x * rsqrt(mean(x^2) + eps) * mult`, in f32. `mult` is `w` (Llama) or `1 + w` (Gemma).
pub fn rms_norm(x: &Tensor, mult: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    // One pass per row instead of seven tensor ops (each its own buffer); the fused op has no
    // backward, so a tensor on an autograd path (attribution) takes the composed ops.
    if x.device().is_cpu() && !x.track_op() && !mult.track_op() && mult.rank() == 1 {
        let mult = mult.to_dtype(DType::F32)?.contiguous()?;
        return Ok(x
            .contiguous()?
            .apply_op2_no_bwd(&mult, &RmsNormF32 { eps: eps as f32 })?);
    }
    rms_norm_composed(&x, mult, eps)
}

fn rms_norm_composed(x: &Tensor, mult: &Tensor, eps: f64) -> Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(mult)?)
}

/// The elements of a contiguous f32 tensor, as the fused ops below read them.
fn contiguous_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op} needs contiguous f32 tensors"),
    }
}

/// [`rms_norm`] over contiguous f32 rows in one pass, rows in parallel. The same operations in
/// the same order as the composed version: sum of squares, times `1/d`, plus eps, sqrt, recip,
/// then `x * inv * mult`.
struct RmsNormF32 {
    eps: f32,
}

impl candle_core::CustomOp2 for RmsNormF32 {
    fn name(&self) -> &'static str {
        "rms-norm-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (x, mult) = (
            contiguous_f32(s1, l1, "rms-norm-f32")?,
            contiguous_f32(s2, l2, "rms-norm-f32")?,
        );
        let d = mult.len();
        if d == 0 || l1.dims().last() != Some(&d) {
            candle_core::bail!(
                "rms-norm-f32: rows of {:?} against a multiplier of {d}",
                l1.dims()
            )
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .with_min_len(64)
            .for_each(|(o, x)| {
                let sum: f32 = x.iter().map(|v| v * v).sum();
                let inv = ((sum / d as f32) + self.eps).sqrt().recip();
                for ((o, &x), &m) in o.iter_mut().zip(x).zip(mult) {
                    *o = x * inv * m;
                }
            });
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// A normalisation layer: RMSNorm with multiplier `w` / `1 + w` (Llama, Gemma) or LayerNorm with
/// weight and bias (GPT-2). Computed in f32, in the order of HF's eager code.
#[derive(Debug, Clone)]
pub enum Norm {
    Rms { mult: Tensor, eps: f64 },
    Layer { w: Tensor, b: Tensor, eps: f64 },
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms { mult, eps } => rms_norm(x, mult, *eps),
            Norm::Layer { w, b, eps } => {
                let x = x.to_dtype(DType::F32)?;
                let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
                let inv = (xc.sqr()?.mean_keepdim(D::Minus1)? + *eps)?
                    .sqrt()?
                    .recip()?;
                Ok(xc.broadcast_mul(&inv)?.broadcast_mul(w)?.broadcast_add(b)?)
            }
        }
    }

    /// The same normalisation with the per-position scale taken from `scale_of` instead of `x`
    /// (used to split a post-norm over heads: each head's share of the normed sum).
    pub fn forward_frozen(&self, x: &Tensor, scale_of: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms { mult, eps } => {
                let inv = (scale_of.sqr()?.mean_keepdim(D::Minus1)? + *eps)?
                    .sqrt()?
                    .recip()?;
                Ok(x.broadcast_mul(&inv.unsqueeze(D::Minus2)?)?
                    .broadcast_mul(mult)?)
            }
            Norm::Layer { .. } => Err(EngineError::InvalidArgument(
                "per-head split of a LayerNorm post-norm is not defined".into(),
            )),
        }
    }
}

/// Rotary frequencies for one rope base (HF `_compute_default_rope_parameters` plus the scaling
/// of `modeling_rope_utils`), over the first `dim` dims of a head.
#[derive(Debug, Clone)]
pub struct Rope {
    base: f64,
    dim: usize,
    scaling: Option<RopeScaling>,
    /// Frequencies of calls within the original context (all calls for static scalings).
    inv_freq: Vec<f32>,
    /// LongRoPE's frequencies past the original context.
    inv_freq_long: Option<Vec<f32>>,
    /// Multiplies cos and sin (YaRN, LongRoPE).
    attention_scaling: f32,
}

/// `base^(2i / dim)` for each rotated pair, in f32 arithmetic as torch computes it.
fn pos_freqs(base: f32, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| base.powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// `1 / base^(2i / dim)`: the unscaled rotary frequencies.
fn default_inv_freq(base: f32, dim: usize) -> Vec<f32> {
    pos_freqs(base, dim).into_iter().map(|p| 1.0 / p).collect()
}

impl Rope {
    pub fn new(base: f64, dim: usize, scaling: Option<&RopeScaling>) -> Self {
        let mut inv = default_inv_freq(base as f32, dim);
        let mut inv_long = None;
        let mut attention_scaling = 1.0f32;
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
            // Depends on the call's length: see `freqs`.
            Some(RopeScaling::Dynamic { .. }) => {}
            Some(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                truncate,
            }) => {
                // HF `_compute_yarn_parameters`: correction range from the rotation counts, a
                // linear ramp over it between interpolated (/factor) and extrapolated frequencies.
                let d = dim as f64;
                let corr = |rot: f64| {
                    d * (original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(d - 1.0) as f32;
                if low == high {
                    high += 0.001;
                }
                let pos = pos_freqs(base as f32, dim);
                for (i, f) in inv.iter_mut().enumerate() {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    let interp = 1.0 / (*factor as f32 * pos[i]);
                    let extrap = 1.0 / pos[i];
                    *f = interp * (1.0 - extrapolation) + extrap * extrapolation;
                }
                attention_scaling = *attention_factor as f32;
            }
            Some(RopeScaling::Longrope {
                short_factor,
                long_factor,
                attention_factor,
                ..
            }) => {
                let shape = pos_freqs(base as f32, dim);
                let with = |ext: &[f64]| -> Vec<f32> {
                    shape
                        .iter()
                        .zip(ext)
                        .map(|(s, e)| 1.0 / (*e as f32 * s))
                        .collect()
                };
                inv = with(short_factor);
                inv_long = Some(with(long_factor));
                attention_scaling = *attention_factor as f32;
            }
            Some(RopeScaling::FreqFactors { factors }) => {
                for (f, k) in inv.iter_mut().zip(factors) {
                    *f /= *k as f32;
                }
            }
            None => {}
        }
        Rope {
            base,
            dim,
            scaling: scaling.cloned(),
            inv_freq: inv,
            inv_freq_long: inv_long,
            attention_scaling,
        }
    }

    /// Rotated dims per head.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The frequencies of a call whose longest row reaches `seq_len` positions.
    fn freqs(&self, seq_len: usize) -> std::borrow::Cow<'_, [f32]> {
        match &self.scaling {
            Some(RopeScaling::Dynamic {
                factor,
                max_position_embeddings,
            }) if seq_len as f64 > *max_position_embeddings => {
                // HF `_compute_dynamic_ntk_parameters`, in f32 as torch computes it there.
                let (f, m, d) = (
                    *factor as f32,
                    *max_position_embeddings as f32,
                    self.dim as f32,
                );
                let base =
                    self.base as f32 * ((f * seq_len as f32 / m) - (f - 1.0)).powf(d / (d - 2.0));
                default_inv_freq(base, self.dim).into()
            }
            Some(RopeScaling::Longrope {
                original_max_position_embeddings,
                ..
            }) if seq_len as f64 > *original_max_position_embeddings => self
                .inv_freq_long
                .as_deref()
                .unwrap_or(&self.inv_freq)
                .into(),
            _ => self.inv_freq.as_slice().into(),
        }
    }

    /// cos and sin, each `[b, 1, t, dim]` (frequencies repeated twice, HF layout).
    pub fn cos_sin(&self, positions: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
        let b = positions.len();
        let t = positions.first().map(|p| p.len()).unwrap_or(0);
        let seq_len = positions.iter().flatten().copied().max().unwrap_or(0) as usize + 1;
        let inv_freq = self.freqs(seq_len);
        let scale = self.attention_scaling;
        let half = inv_freq.len();
        let hd = half * 2;
        let mut cos = vec![0f32; b * t * hd];
        let mut sin = vec![0f32; b * t * hd];
        for (r, row) in positions.iter().enumerate() {
            for (i, &p) in row.iter().enumerate() {
                let base = (r * t + i) * hd;
                for (j, &f) in inv_freq.iter().enumerate() {
                    let a = (p as f32) * f;
                    let (s, c) = (a as f64).sin_cos();
                    let (s, c) = (s as f32 * scale, c as f32 * scale);
                    cos[base + j] = c;
                    cos[base + half + j] = c;
                    sin[base + j] = s;
                    sin[base + half + j] = s;
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (b, 1, t, hd), device)?,
            Tensor::from_vec(sin, (b, 1, t, hd), device)?,
        ))
    }
}

/// `x * cos + rotate_half(x) * sin` with x `[b, h, t, d]`. With partial rotary (Phi-3) the
/// tables are narrower than `d`: the first `cos.dim(-1)` dims rotate, the rest pass through.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let r = cos.dim(D::Minus1)?;
    if r < d {
        let rot = apply_rope(&x.narrow(D::Minus1, 0, r)?, cos, sin)?;
        return Ok(Tensor::cat(
            &[&rot, &x.narrow(D::Minus1, r, d - r)?],
            D::Minus1,
        )?);
    }
    // One pass instead of five tensor ops; the fused op has no backward, so a tensor on an
    // autograd path (attribution) takes the composed ops.
    if let [b, h, t, _] = *x.dims() {
        if x.device().is_cpu()
            && x.dtype() == DType::F32
            && !x.track_op()
            && d % 2 == 0
            && cos.dims() == [b, 1, t, d]
            && sin.dims() == [b, 1, t, d]
        {
            return Ok(x.contiguous()?.apply_op3_no_bwd(
                &cos.to_dtype(DType::F32)?.contiguous()?,
                &sin.to_dtype(DType::F32)?.contiguous()?,
                &RopeF32 { h },
            )?);
        }
    }
    apply_rope_composed(x, cos, sin)
}

fn apply_rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

/// [`apply_rope`] over a contiguous f32 `[b, h, t, d]` with `[b, 1, t, d]` tables, one pass:
/// `x1 cos1 - x2 sin1` and `x2 cos2 + x1 sin2` per half, the composed version's operations.
struct RopeF32 {
    h: usize,
}

impl candle_core::CustomOp3 for RopeF32 {
    fn name(&self) -> &'static str {
        "rope-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (x, cos, sin) = (
            contiguous_f32(s1, l1, "rope-f32")?,
            contiguous_f32(s2, l2, "rope-f32")?,
            contiguous_f32(s3, l3, "rope-f32")?,
        );
        let dims = l1.dims();
        let (t, d) = (dims[2], dims[3]);
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        // One chunk per (batch row, head): its table is the batch row's.
        out.par_chunks_mut(t * d)
            .zip(x.par_chunks(t * d))
            .enumerate()
            .for_each(|(bh, (o, x))| {
                let tab = (bh / self.h) * t * d;
                let (cos, sin) = (&cos[tab..tab + t * d], &sin[tab..tab + t * d]);
                for p in 0..t {
                    let r = p * d;
                    for j in 0..half {
                        let (x1, x2) = (x[r + j], x[r + half + j]);
                        o[r + j] = x1 * cos[r + j] + (-x2) * sin[r + j];
                        o[r + half + j] = x2 * cos[r + half + j] + x1 * sin[r + half + j];
                    }
                }
            });
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }
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
    build_mask_block(pad, start, 0..t, 0..start + t, window, device)
}

/// The rows `rows` (query indices of this call) and columns `keys` (absolute key indices) of
/// [`build_mask`]: `[b, 1, rows.len(), keys.len()]`.
pub fn build_mask_block(
    pad: &[usize],
    start: usize,
    rows: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let (nr, nk) = (rows.len(), keys.len());
    let b = pad.len();
    let mut m = vec![f32::NEG_INFINITY; b * nr * nk];
    for (r, &p) in pad.iter().enumerate() {
        for (ri, i) in rows.clone().enumerate() {
            let q = start + i;
            let row = &mut m[(r * nr + ri) * nk..(r * nr + ri + 1) * nk];
            let (lo, hi) = if q < p {
                (q, q + 1)
            } else {
                let lo = match window {
                    Some(w) => (q + 1).saturating_sub(w).max(p),
                    None => p,
                };
                (lo, q + 1)
            };
            for k in lo.max(keys.start)..hi.min(keys.end) {
                row[k - keys.start] = 0.0;
            }
        }
    }
    Ok(Tensor::from_vec(m, (b, 1, nr, nk), device)?)
}

/// The attention mask of one layer in one call: built whole (short calls), or built a block of
/// query rows at a time inside attention, so that long prompts need memory in proportion to the
/// block, not to the square of the prompt.
#[derive(Clone, Copy)]
pub enum MaskRef<'a> {
    Built(&'a Tensor),
    Blocks {
        pad: &'a [usize],
        start: usize,
        window: Option<usize>,
        /// Query rows per block.
        block: usize,
    },
}

/// Keys and values of one layer, `[b, n_kv_heads, cached_len, d_head]`.
///
/// Why a buffer with room: decoding appends one position per step, and concatenating the new
/// keys onto the old ones copies the whole cache every step (SmolLM2: 7.4 MB per position of
/// 160 rows; one 2000-token prompt's is 92 MB, copied again for each new token). The keys
/// live in a buffer `[b, n_kv_heads, capacity, d_head]` instead; a step writes its position into
/// the free room in place, and reads see the first `len` positions.
#[derive(Default)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    /// Positions held (the buffers' capacity may be larger).
    len: usize,
    /// Whether positions from `len` on may be written in place: only in buffers this cache
    /// allocated itself. A clone shares the buffers' storage, so it gets `false` and copies on
    /// its first append; the original writes only past the clone's `len`, which the clone never
    /// reads.
    owned: bool,
    /// Positions to allocate beyond what an append needs when a buffer is (re)allocated.
    reserve: usize,
}

impl Clone for LayerKv {
    fn clone(&self) -> Self {
        LayerKv {
            k: self.k.clone(),
            v: self.v.clone(),
            len: self.len,
            owned: false,
            reserve: self.reserve,
        }
    }
}

impl LayerKv {
    /// A layer's cache holding `k` and `v` (`[b, n_kv_heads, len, d_head]`, both or neither).
    pub fn new(k: Option<Tensor>, v: Option<Tensor>) -> Result<Self> {
        let len = match (&k, &v) {
            (Some(k), Some(v)) => {
                if k.dims() != v.dims() || k.rank() != 4 {
                    return Err(EngineError::InvalidArgument(format!(
                        "cached keys {:?} and values {:?} must both be [b, n_kv_heads, len, d_head]",
                        k.dims(),
                        v.dims()
                    )));
                }
                k.dim(2)?
            }
            (None, None) => 0,
            _ => {
                return Err(EngineError::InvalidArgument(
                    "a layer's cache needs both keys and values, or neither".into(),
                ))
            }
        };
        Ok(LayerKv {
            k,
            v,
            len,
            owned: false,
            reserve: 0,
        })
    }

    /// The cached keys, `[b, n_kv_heads, len, d_head]` (a view of the buffer).
    pub fn k(&self) -> Result<Option<Tensor>> {
        self.k
            .as_ref()
            .map(|k| Ok(k.narrow(2, 0, self.len)?))
            .transpose()
    }

    /// The cached values, `[b, n_kv_heads, len, d_head]` (a view of the buffer).
    pub fn v(&self) -> Result<Option<Tensor>> {
        self.v
            .as_ref()
            .map(|v| Ok(v.narrow(2, 0, self.len)?))
            .transpose()
    }

    pub fn is_empty(&self) -> bool {
        self.k.is_none()
    }

    /// Positions the buffers can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    /// Appends `k` and `v` (`[b, n_kv_heads, t, d_head]`, contiguous) and returns every cached
    /// position's keys and values. `in_place: false` (gradients flow) concatenates instead.
    fn append(&mut self, k: Tensor, v: Tensor, in_place: bool) -> Result<(Tensor, Tensor)> {
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let t = k.dim(2)?;
        let need = self.len + t;
        let (Some(bk), Some(bv)) = (&self.k, &self.v) else {
            if self.reserve == 0 || !in_place {
                // Nothing to grow into: keep the tensors as they are (no copy).
                self.len = t;
                self.k = Some(k.clone());
                self.v = Some(v.clone());
                self.owned = false;
                return Ok((k, v));
            }
            let (bk, bv) = (self.allocate(&k, need)?, self.allocate(&v, need)?);
            bk.slice_set(&k, 2, 0)?;
            bv.slice_set(&v, 2, 0)?;
            return self.keep(bk, bv, need);
        };
        if !in_place {
            let k = Tensor::cat(&[&bk.narrow(2, 0, self.len)?, &k], 2)?;
            let v = Tensor::cat(&[&bv.narrow(2, 0, self.len)?, &v], 2)?;
            self.k = Some(k.clone());
            self.v = Some(v.clone());
            self.len = need;
            self.owned = false;
            return Ok((k, v));
        }
        if self.owned && need <= bk.dim(2)? {
            bk.slice_set(&k, 2, self.len)?;
            bv.slice_set(&v, 2, self.len)?;
            let (bk, bv) = (bk.clone(), bv.clone());
            return self.keep(bk, bv, need);
        }
        // Full or shared: a new buffer with room, the held positions copied once.
        let (nk, nv) = (self.allocate(&k, need)?, self.allocate(&v, need)?);
        nk.slice_set(&bk.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
        nv.slice_set(&bv.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
        nk.slice_set(&k, 2, self.len)?;
        nv.slice_set(&v, 2, self.len)?;
        self.keep(nk, nv, need)
    }

    /// A zeroed buffer shaped like `like` with room for `need` positions and the reserve (or,
    /// without one, a quarter more: repeated appends then copy a logarithmic number of times).
    fn allocate(&self, like: &Tensor, need: usize) -> Result<Tensor> {
        let (b, h, _, d) = like.dims4()?;
        let room = if self.reserve > 0 {
            self.reserve
        } else {
            (need / 4).max(16)
        };
        Ok(Tensor::zeros(
            (b, h, need + room, d),
            like.dtype(),
            like.device(),
        )?)
    }

    fn keep(&mut self, bk: Tensor, bv: Tensor, len: usize) -> Result<(Tensor, Tensor)> {
        let views = (bk.narrow(2, 0, len)?, bv.narrow(2, 0, len)?);
        self.k = Some(bk);
        self.v = Some(bv);
        self.len = len;
        self.owned = true;
        Ok(views)
    }
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

    /// Room for `extra` positions beyond what the next append needs, allocated with it: a
    /// generation of `n` new tokens reserves `n` so its decode steps write in place.
    pub fn reserve(&mut self, extra: usize) {
        for l in &mut self.layers {
            l.reserve = extra;
        }
    }
}

/// RMSNorms on queries and keys before rotary, with multipliers `q` / `k` (`1 + w` for Gemma,
/// `w` otherwise).
pub enum QkNorm {
    /// Over each head's `d_head` (Gemma 3, Qwen3): multipliers of length `d_head`.
    PerHead { q: Tensor, k: Tensor },
    /// Over the whole projection before the head split (OLMo 2): multipliers of length
    /// `n_heads * d_head` and `n_kv_heads * d_head`.
    Projection { q: Tensor, k: Tensor },
}

pub struct AttnWeights {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// q/k RMSNorms (Gemma 3, Qwen3, OLMo 2).
    pub qk_norm: Option<QkNorm>,
    /// Biases of q, k, v (GPT-2; Llama checkpoints with `attention_bias`).
    pub qkv_bias: Option<[Tensor; 3]>,
    /// Bias of the output projection. TransformerLens convention: not part of any head's
    /// `hook_result`; `hook_attn_out` = sum over heads of `hook_result` + this bias.
    pub o_bias: Option<Tensor>,
}

fn add_bias(x: Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    Ok(match b {
        Some(b) => x.broadcast_add(b)?,
        None => x,
    })
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
    cos_sin: Option<&(Tensor, Tensor)>,
    mask: MaskRef,
    kv: Option<&mut LayerKv>,
    post_norm: Option<&Norm>,
    hooks: &mut Hooks,
    ctx: &mut HookCtx,
) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let (h, hkv, hd) = (p.n_heads, p.n_kv_heads, p.head_dim);
    let name = |pt| HookName::block(layer, pt);

    let bias = |i: usize| w.qkv_bias.as_ref().map(|bs| &bs[i]);
    // Each step below consumes the tensor it replaces (`then`), so a long prompt holds one
    // version of q, k and v at a time rather than every shadowed one until the function returns.
    let q = add_bias(w.q.forward(x)?, bias(0))?;
    let k = add_bias(w.k.forward(x)?, bias(1))?;
    let v = add_bias(w.v.forward(x)?, bias(2))?.reshape((b, t, hkv, hd))?;
    let (q, k) = match &w.qk_norm {
        Some(QkNorm::Projection { q: mq, k: mk }) => (
            then(q, |q| rms_norm(q, mq, p.eps))?,
            then(k, |k| rms_norm(k, mk, p.eps))?,
        ),
        _ => (q, k),
    };
    let q = q.reshape((b, t, h, hd))?;
    let k = k.reshape((b, t, hkv, hd))?;
    let (q, k) = match &w.qk_norm {
        Some(QkNorm::PerHead { q: mq, k: mk }) => (
            then(q, |q| rms_norm(q, mq, p.eps))?,
            then(k, |k| rms_norm(k, mk, p.eps))?,
        ),
        _ => (q, k),
    };
    // Hooks see [b, t, heads, d_head] (TransformerLens layout): q and k before rotary, then
    // `hook_rot_q` / `hook_rot_k` after it.
    let q = fire(hooks, name(HookPoint::AttnQ), q, ctx)?;
    let k = fire(hooks, name(HookPoint::AttnK), k, ctx)?;
    let v = fire(hooks, name(HookPoint::AttnV), v, ctx)?;
    let q = then(q, |q| Ok(q.transpose(1, 2)?.contiguous()?))?;
    let k = then(k, |k| Ok(k.transpose(1, 2)?.contiguous()?))?;
    let (q, k) = match cos_sin {
        Some((cos, sin)) => {
            let q = then(q, |q| apply_rope(q, cos, sin))?;
            let q = fire_heads(hooks, name(HookPoint::AttnRotQ), q, ctx)?;
            let k = then(k, |k| apply_rope(k, cos, sin))?;
            (q, fire_heads(hooks, name(HookPoint::AttnRotK), k, ctx)?)
        }
        None => (q, k), // learned absolute positions (GPT-2)
    };
    let v = then(v, |v| Ok(v.transpose(1, 2)?.contiguous()?))?;

    let (k, v) = match kv {
        // slice_set is not differentiable: with gradients on, the cache concatenates.
        Some(cache) => cache.append(k, v, !hooks.differentiable)?,
        None => (k, v),
    };
    let wants_pattern =
        hooks.wants(name(HookPoint::AttnScores)) || hooks.wants(name(HookPoint::AttnPattern));
    // Grouped (no repeated keys) unless a hook reads the per-head pattern or gradients flow.
    let grouped = !wants_pattern && !hooks.differentiable;
    let z = match mask {
        MaskRef::Blocks {
            pad,
            start,
            window,
            block,
        } if grouped => blocked_attention(&q, &k, &v, p, pad, start, window, block)?,
        MaskRef::Built(m) if grouped => grouped_attention(&q, &k, &v, p, m)?,
        _ => {
            let k = repeat_kv(&k, h / hkv)?;
            let v = repeat_kv(&v, h / hkv)?;
            let built;
            let mask = match mask {
                MaskRef::Built(m) => m,
                MaskRef::Blocks {
                    pad, start, window, ..
                } => {
                    // A hook wants the whole pattern: build the whole mask for this layer.
                    built = build_mask(pad, start, t, window, x.device())?;
                    &built
                }
            };
            let mut scores = (q.matmul(&k.t()?)? * p.scale)?;
            if let Some(cap) = p.softcap {
                scores = ((scores / cap)?.tanh()? * cap)?;
            }
            let scores = scores.broadcast_add(mask)?;
            let scores = fire(hooks, name(HookPoint::AttnScores), scores, ctx)?;
            // The fused softmax has no backward; attribution runs (candle autograd) use the
            // composed one.
            let pattern = if hooks.differentiable {
                candle_nn::ops::softmax(&scores, D::Minus1)?
            } else {
                candle_nn::ops::softmax_last_dim(&scores)?
            };
            let pattern = fire(hooks, name(HookPoint::AttnPattern), pattern, ctx)?;
            pattern.matmul(&v)?
        }
    };
    let z = then(z, |z| Ok(z.transpose(1, 2)?.contiguous()?))?; // [b, t, h, hd]
    let z = fire(hooks, name(HookPoint::AttnZ), z, ctx)?;

    let result_name = name(HookPoint::AttnResult);
    let project = |z: &Tensor| -> Result<Tensor> {
        let out = add_bias(w.o.forward(&z.reshape((b, t, h * hd))?)?, w.o_bias.as_ref())?;
        match post_norm {
            Some(n) => n.forward(&out),
            None => Ok(out),
        }
    };
    if !hooks.wants(result_name) {
        return project(&z);
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
    if let Some(n) = post_norm {
        // Freeze the post-norm's per-position scale at its value for the sum over heads.
        let sum = result.sum(2)?;
        result = n.forward_frozen(&result, &sum)?;
    }
    let intervened = hooks.has_intervention(result_name);
    let result = fire(hooks, result_name, result, ctx)?;
    if intervened {
        return add_bias(result.sum(2)?, w.o_bias.as_ref());
    }
    // Not edited: compute the output the exact way (one o_proj matmul), as without the hook.
    project(&z)
}

/// `f(&x)`, with `x` dropped as soon as `f` returns: the step replaces `x`.
fn then(x: Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    f(&x)
}

/// `softmax(q k^T * scale (soft-capped) + mask) v` for grouped-query attention without repeating
/// `k` and `v` per query head: the `n_rep` query heads that read one key/value head (heads
/// `g * n_rep..(g + 1) * n_rep` read head `g`, as `repeat_kv` lays them out) are stacked into one
/// matrix of `n_rep * t` rows. Each product is one larger matmul (a decode step's `1 x hd` rows
/// become `n_rep x hd`) and the keys and values are not copied `n_rep` times. `q` `[b, h, t, hd]`,
/// `k` / `v` `[b, hkv, keys, hd]` (cache included), `mask` `[b or 1, 1, t, keys]`; returns
/// `[b, h, t, hd]`.
fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &AttnParams,
    mask: &Tensor,
) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let (_, hkv, keys, _) = k.dims4()?;
    let n_rep = h / hkv;
    let q = q.reshape((b, hkv, n_rep * t, hd))?;
    // Each score-sized intermediate is dropped as soon as the next exists (a shadowed binding
    // would live to the end of the function): at most two are held at once.
    let pattern = {
        let mut scores = (q.matmul(&k.t()?)? * p.scale)?;
        if let Some(cap) = p.softcap {
            scores = ((scores / cap)?.tanh()? * cap)?;
        }
        // [b, hkv, n_rep * t, keys] is [b, h, t, keys] in memory: the mask adds as in the
        // per-head path.
        let masked = scores.reshape((b, h, t, keys))?.broadcast_add(mask)?;
        drop(scores);
        candle_nn::ops::softmax_last_dim(&masked)?
    };
    Ok(pattern
        .reshape((b, hkv, n_rep * t, keys))?
        .matmul(v)?
        .reshape((b, h, t, hd))?)
}

/// Attention a block of query rows at a time: `q` `[b, h, t, hd]`, `k` / `v` `[b, hkv, total, hd]`
/// (cache included, heads not repeated: see [`grouped_attention`]). Each block sees only the
/// keys it can attend to (from the window's start, or 0, up to its last query), with its slice
/// of the mask built on the spot, so the scores held at once are `block x keys` instead of
/// `t x total`. Returns `[b, h, t, hd]`.
/// Scores (floats) one attention block may hold: 32 MiB, as 512 rows x 4 heads x 4096 keys.
const SCORE_BUDGET: usize = 1 << 23;
/// Blocks keep at least this many query rows, so each product stays a matrix product.
const MIN_BLOCK_ROWS: usize = 32;

#[allow(clippy::too_many_arguments)]
fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &AttnParams,
    pad: &[usize],
    start: usize,
    window: Option<usize>,
    block: usize,
) -> Result<Tensor> {
    let (b, h, t, _) = q.dims4()?;
    // Fewer rows per block where the keys are many (a global layer late in a 32k-token prompt),
    // so one block's scores stay within SCORE_BUDGET floats.
    let keys_max = match window {
        Some(w) => (w + block).min(start + t),
        None => start + t,
    };
    let block = (SCORE_BUDGET / (b * h * keys_max).max(1))
        .max(MIN_BLOCK_ROWS)
        .min(block.max(1));
    let mut out = Vec::with_capacity(t.div_ceil(block));
    let mut i0 = 0;
    while i0 < t {
        let i1 = (i0 + block).min(t);
        let lo = match window {
            // Keys before the first query's window are masked for every row of the block.
            Some(w) => (start + i0 + 1).saturating_sub(w),
            None => 0,
        };
        let hi = start + i1;
        let qc = q.narrow(2, i0, i1 - i0)?;
        let kc = k.narrow(2, lo, hi - lo)?.contiguous()?;
        let vc = v.narrow(2, lo, hi - lo)?.contiguous()?;
        let mask = build_mask_block(pad, start, i0..i1, lo..hi, window, q.device())?;
        out.push(grouped_attention(&qc, &kc, &vc, p, &mask)?);
        i0 = i1;
    }
    Ok(Tensor::cat(&out, 2)?)
}

/// GELU's tanh approximation written as `x * sigmoid(2u)`, `u = sqrt(2/pi) (x + 0.044715 x^3)`:
/// the same function as `0.5 x (1 + tanh(u))` (HF `gelu_pytorch_tanh`) with one `exp` per
/// element instead of libm's `tanh` (an `expm1` and a division), which cost a tenth of a batch-16
/// forward. f32 only, in parallel over contiguous chunks.
struct GeluTanhF32;

fn gelu_tanh_f32(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    // Large negative x: exp overflows to inf and x / inf is -0, as 0.5 x (1 + tanh) rounds to.
    x / (1.0 + (-2.0 * u).exp())
}

impl candle_core::CustomOp1 for GeluTanhF32 {
    fn name(&self) -> &'static str {
        "gelu-tanh-f32"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = contiguous_f32(storage, layout, "gelu-tanh-f32")?;
        // Written in place in order (no zero-filled buffer first).
        let mut out = Vec::with_capacity(x.len());
        out.par_extend(x.par_iter().with_min_len(16384).map(|&x| gelu_tanh_f32(x)));
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// A gated MLP's `act(gate) * up` in one pass, for SiLU and GELU-tanh (the same per-element
/// operations as [`Activation::apply`] then the product: bitwise the same result) instead of two
/// passes and an intermediate the size of the MLP's hidden layer. f32 only, in parallel.
struct GatedActF32 {
    gelu_tanh: bool,
}

impl candle_core::CustomOp2 for GatedActF32 {
    fn name(&self) -> &'static str {
        "gated-act-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (g, u) = (
            contiguous_f32(s1, l1, "gated-act-f32")?,
            contiguous_f32(s2, l2, "gated-act-f32")?,
        );
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "gated-act-f32: gate {:?} against up {:?}",
                l1.dims(),
                l2.dims()
            )
        }
        let mut out = Vec::with_capacity(g.len());
        let pairs = g.par_iter().zip(u.par_iter()).with_min_len(16384);
        if self.gelu_tanh {
            out.par_extend(pairs.map(|(&g, &u)| gelu_tanh_f32(g) * u));
        } else {
            // candle's `silu`: v / (1 + exp(-v)).
            out.par_extend(pairs.map(|(&g, &u)| g / (1.0 + (-g).exp()) * u));
        }
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }
}

impl Activation {
    /// `act(gate) * up`, fused where [`GatedActF32`] covers the activation and no gradient flows.
    fn gated(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let fusable = matches!(self, Activation::Silu | Activation::GeluTanh)
            && gate.dtype() == DType::F32
            && up.dtype() == DType::F32
            && gate.device().is_cpu()
            && !gate.track_op()
            && !up.track_op()
            && gate.dims() == up.dims();
        if !fusable {
            return Ok((self.apply(gate)? * up)?);
        }
        let op = GatedActF32 {
            gelu_tanh: matches!(self, Activation::GeluTanh),
        };
        Ok(gate
            .contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &op)?)
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            // The fused op has no backward: a tensor on an autograd path (attribution) takes
            // candle's composed `gelu`, which has one.
            Activation::GeluTanh
                if x.dtype() == DType::F32 && x.device().is_cpu() && !x.track_op() =>
            {
                x.contiguous()?.apply_op1_no_bwd(&GeluTanhF32)?
            }
            // candle's `gelu` is the tanh approximation.
            Activation::GeluTanh => x.gelu()?,
            Activation::GeluErf => x.gelu_erf()?,
            Activation::Silu => candle_nn::ops::silu(x)?,
            Activation::Relu => x.relu()?,
        })
    }
}

/// The MLP of a block. Hooks: `mlp.hook_pre` (gate / fc_in output), `mlp.hook_pre_linear` (up
/// projection, gated MLPs only), `mlp.hook_post` (the input of the down projection).
pub enum Mlp {
    /// `down(act(gate(x)) * up(x))` (Llama, Gemma).
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
        act: Activation,
    },
    /// `fc_out(act(fc_in(x) + b_in)) + b_out` (GPT-2).
    Plain {
        fc_in: Linear,
        b_in: Tensor,
        fc_out: Linear,
        b_out: Tensor,
        act: Activation,
    },
}

impl Mlp {
    /// `x` `[b, t, d]`. More than `chunk_rows` rows (`b x t`) run `chunk_rows` at a time when no
    /// hook reads or edits inside the MLP (a hook sees the whole intermediate, as it would
    /// without chunks): each row's MLP is independent of the others, so only the intermediates'
    /// size changes.
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        chunk_rows: usize,
        hooks: &mut Hooks,
        ctx: &mut HookCtx,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let rows = b * t;
        let inner_hooked = [
            HookPoint::MlpPre,
            HookPoint::MlpPreLinear,
            HookPoint::MlpPost,
        ]
        .into_iter()
        .any(|pt| hooks.wants(HookName::block(layer, pt)));
        let chunk_rows = chunk_rows.max(1);
        if rows <= chunk_rows || inner_hooked {
            return self.forward_whole(layer, x, hooks, ctx);
        }
        let flat = x.reshape((rows, d))?;
        let mut out = Vec::with_capacity(rows.div_ceil(chunk_rows));
        for r0 in (0..rows).step_by(chunk_rows) {
            let n = chunk_rows.min(rows - r0);
            let part = flat.narrow(0, r0, n)?.unsqueeze(0)?;
            out.push(self.forward_whole(layer, &part, hooks, ctx)?.squeeze(0)?);
        }
        Ok(Tensor::cat(&out, 0)?.reshape((b, t, ()))?)
    }

    fn forward_whole(
        &self,
        layer: usize,
        x: &Tensor,
        hooks: &mut Hooks,
        ctx: &mut HookCtx,
    ) -> Result<Tensor> {
        let name = |pt| HookName::block(layer, pt);
        match self {
            Mlp::Gated {
                gate,
                up,
                down,
                act,
            } => {
                let g = fire(hooks, name(HookPoint::MlpPre), gate.forward(x)?, ctx)?;
                let u = fire(hooks, name(HookPoint::MlpPreLinear), up.forward(x)?, ctx)?;
                let post = fire(hooks, name(HookPoint::MlpPost), act.gated(&g, &u)?, ctx)?;
                down.forward(&post)
            }
            Mlp::Plain {
                fc_in,
                b_in,
                fc_out,
                b_out,
                act,
            } => {
                let pre = fc_in.forward(x)?.broadcast_add(b_in)?;
                let pre = fire(hooks, name(HookPoint::MlpPre), pre, ctx)?;
                let post = fire(hooks, name(HookPoint::MlpPost), act.apply(&pre)?, ctx)?;
                Ok(fc_out.forward(&post)?.broadcast_add(b_out)?)
            }
        }
    }
}

/// Which positions get logits (the unembedding is the most expensive matmul of small models).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogitsAt {
    None,
    /// The last position of every row (rows are left padded, so this is index t - 1). Where no
    /// hook reads the last block after its attention, that block's MLP runs on this position
    /// alone (the numbers are the same).
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

/// An error naming `hook` if `x` holds a NaN or an infinity. `x - x` is NaN exactly where `x`
/// is not finite, so the sum is NaN iff some entry is, without overflow from large finite values.
pub fn check_finite(x: &Tensor, hook: &str, why: impl FnOnce() -> String) -> Result<()> {
    let s = x
        .broadcast_sub(x)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    if s.is_nan() {
        return Err(EngineError::NonFinite {
            hook: hook.to_string(),
            what: "NaN or inf values".into(),
            why: why(),
        });
    }
    Ok(())
}

/// Above this magnitude a residual's square overflows f32, so the next RMSNorm / LayerNorm
/// divides by infinity and silently outputs zeros (sqrt(f32::MAX) = 1.8e19).
pub const MAX_NORMABLE: f32 = 1.8e19;

/// [`check_finite`], and also an error where `|x|` exceeds [`MAX_NORMABLE`]: a residual stream
/// the following norms can no longer scale (every later layer would read zeros).
pub fn check_normable(x: &Tensor, hook: &str, why: impl Fn() -> String) -> Result<()> {
    check_finite(x, hook, &why)?;
    let max = x
        .abs()?
        .to_dtype(DType::F32)?
        .max_all()?
        .to_scalar::<f32>()?;
    if max > MAX_NORMABLE {
        return Err(EngineError::NonFinite {
            hook: hook.to_string(),
            what: format!("|values| up to {max:.1e}, whose squares overflow f32 in the next norm"),
            why: why(),
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys `[2, 3, t, 4]` whose entries encode (row, head, position, dim), so a misplaced
    /// position shows.
    fn positions(from: usize, t: usize) -> Result<Tensor> {
        let mut xs = Vec::new();
        for r in 0..2 {
            for h in 0..3 {
                for p in from..from + t {
                    for d in 0..4 {
                        xs.push((r * 1000 + h * 100 + p) as f32 + d as f32 * 0.1);
                    }
                }
            }
        }
        Ok(Tensor::from_vec(xs, (2, 3, t, 4), &Device::Cpu)?)
    }

    fn same(a: &Tensor, b: &Tensor) -> Result<bool> {
        Ok(a.dims() == b.dims()
            && a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?)
    }

    #[test]
    fn kv_appends_in_place_equal_concatenation_and_clones_keep_their_own_positions() -> Result<()> {
        for reserve in [0, 2, 40] {
            let mut kv = LayerKv {
                reserve,
                ..LayerKv::default()
            };
            // A prompt of 5, then single decode steps; values are keys + 0.5.
            let (k, v) = kv.append(positions(0, 5)?, (positions(0, 5)? + 0.5)?, true)?;
            assert!(same(&k, &positions(0, 5)?)? && same(&v, &(positions(0, 5)? + 0.5)?)?);
            let mut snapshot = None;
            for p in 5..30 {
                let (k, v) = kv.append(positions(p, 1)?, (positions(p, 1)? + 0.5)?, true)?;
                assert!(
                    same(&k, &positions(0, p + 1)?)?,
                    "reserve {reserve}, step {p}"
                );
                assert!(same(&v, &(positions(0, p + 1)? + 0.5)?)?);
                if p == 10 {
                    snapshot = Some(kv.clone());
                }
            }
            // A clone taken at 11 positions still reads them after the original's appends,
            // and its own appends do not write into the original's positions.
            let mut clone = snapshot.unwrap();
            assert!(same(&clone.k()?.unwrap(), &positions(0, 11)?)?);
            let wrong = (positions(11, 1)? * -1.0)?;
            clone.append(wrong.clone(), wrong, true)?;
            assert!(same(&kv.k()?.unwrap(), &positions(0, 30)?)?);
            assert!(same(&kv.v()?.unwrap(), &(positions(0, 30)? + 0.5)?)?);
            if reserve == 40 {
                // Room for the whole run: the prompt's buffer, written in place ever since.
                assert_eq!(kv.capacity(), 45);
            }
            let (k, _) = kv.append(positions(30, 2)?, positions(30, 2)?, false)?;
            assert!(same(&k, &positions(0, 32)?)?);
        }
        Ok(())
    }

    fn grid() -> Result<Tensor> {
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.005).collect();
        let mut xs = xs;
        xs.extend([-1e4f32, -100.0, -30.0, 30.0, 100.0, 1e4]);
        Ok(Tensor::new(xs, &Device::Cpu)?)
    }

    /// The largest amount by which `fused` misses `composed` beyond 1e-6 abs + 1e-6 rel (<= 0:
    /// within it).
    fn beyond_tolerance(fused: &Tensor, composed: &Tensor) -> Result<f32> {
        let err = (fused - composed)?.abs()?;
        let tol = (composed.abs()? * 1e-6)?.affine(1.0, 1e-6)?;
        Ok((err - tol)?.max_all()?.to_scalar::<f32>()?)
    }

    /// The fused GELU against candle's composed tanh GELU (HF `gelu_pytorch_tanh`'s formula).
    #[test]
    fn fused_gelu_tanh_matches_the_composed_one() -> Result<()> {
        let x = grid()?;
        let worst = beyond_tolerance(&Activation::GeluTanh.apply(&x)?, &x.gelu()?)?;
        assert!(
            worst <= 0.0,
            "fused GELU exceeds 1e-6 abs + 1e-6 rel by {worst}"
        );
        Ok(())
    }

    /// The fused gated activation equals activation-then-product bitwise (SiLU: candle's
    /// `silu`; GELU-tanh: the fused GELU above), on a grid with the extremes.
    #[test]
    fn fused_gated_activation_equals_activation_then_product() -> Result<()> {
        let g = grid()?;
        // An `up` that varies independently of the gate, signs included.
        let u = (g.cos()? * 3.0)?;
        for act in [Activation::Silu, Activation::GeluTanh] {
            let want = match act {
                Activation::Silu => (g.silu()? * &u)?,
                _ => (act.apply(&g)? * &u)?,
            };
            let (got, want) = (act.gated(&g, &u)?.to_vec1::<f32>()?, want.to_vec1::<f32>()?);
            let differ: Vec<(usize, f32, f32)> = got
                .iter()
                .zip(&want)
                .enumerate()
                .filter(|(_, (a, b))| a.to_bits() != b.to_bits())
                .map(|(i, (a, b))| (i, *a, *b))
                .collect();
            assert!(
                got.len() == want.len() && differ.is_empty(),
                "gated {act:?}: {} of {} elements differ, first (index, fused, composed) {:?}",
                differ.len(),
                want.len(),
                differ.first()
            );
        }
        Ok(())
    }

    /// The fused RMSNorm against the composed ops, on rows of a block's width and of a head's.
    #[test]
    fn fused_rms_norm_matches_the_composed_one() -> Result<()> {
        let dev = Device::Cpu;
        for shape in [vec![3usize, 5, 640], vec![2, 7, 4, 64]] {
            let d = *shape.last().unwrap();
            let x = (Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)? * 30.0)?;
            let mult = Tensor::randn(1f32, 0.5, d, &dev)?;
            let fused = rms_norm(&x, &mult, 1e-6)?;
            let composed = rms_norm_composed(&x, &mult, 1e-6)?;
            assert_eq!(fused.dims(), composed.dims());
            let worst = beyond_tolerance(&fused, &composed)?;
            assert!(
                worst <= 0.0,
                "{shape:?}: fused RMSNorm off by {worst} beyond tolerance"
            );
        }
        Ok(())
    }

    /// The fused rotary against the composed ops: bitwise, since both do the same float ops
    /// in the same order (and a batch row's table applies to each of its heads).
    #[test]
    fn fused_rope_is_bitwise_the_composed_one() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, t, d) = (3usize, 4, 5, 64);
        let x = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?;
        let angle = Tensor::randn(0f32, 3.0, (b, 1, t, d), &dev)?;
        let (cos, sin) = (angle.cos()?, angle.sin()?);
        let fused = apply_rope(&x, &cos, &sin)?;
        let composed = apply_rope_composed(&x, &cos, &sin)?;
        let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "fused rotary differs by {diff}");
        Ok(())
    }

    /// RMSNorm on an autograd path keeps its gradient (the fused op has none).
    #[test]
    fn rms_norm_keeps_its_gradient_on_an_autograd_path() -> Result<()> {
        let dev = Device::Cpu;
        let v = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 64), &dev)?)?;
        let mult = Tensor::randn(1f32, 0.5, 64, &dev)?;
        let w = Tensor::randn(0f32, 1.0, (4, 64), &dev)?;
        let g = (rms_norm(v.as_tensor(), &mult, 1e-6)? * &w)?
            .sum_all()?
            .backward()?;
        let grad = g
            .get(v.as_tensor())
            .expect("no gradient reached the norm's input");
        let want = (rms_norm_composed(v.as_tensor(), &mult, 1e-6)? * &w)?
            .sum_all()?
            .backward()?;
        let diff = (grad - want.get(v.as_tensor()).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(
            diff < 1e-6,
            "gradient differs from the composed RMSNorm's by {diff}"
        );
        Ok(())
    }

    /// On an autograd path (attribution) the activation keeps its gradient: the fused op has no
    /// backward, so using it there would cut the MLP out of every attribution.
    #[test]
    fn gelu_tanh_keeps_its_gradient_on_an_autograd_path() -> Result<()> {
        let v = candle_core::Var::from_tensor(&grid()?)?;
        let y = Activation::GeluTanh.apply(v.as_tensor())?.sum_all()?;
        let g = y.backward()?;
        let grad = g
            .get(v.as_tensor())
            .expect("no gradient reached the activation's input");
        let want = v.as_tensor().gelu()?.sum_all()?.backward()?;
        let want = want.get(v.as_tensor()).unwrap();
        let diff = (grad - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            diff < 1e-6,
            "gradient differs from the composed GELU's by {diff}"
        );
        Ok(())
    }
}
