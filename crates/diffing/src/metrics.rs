//! Model-diffing metrics over a crosscoder's decoder and over activations.
//!
//! - relative decoder norm (Δ_norm, Anthropic's and Minder et al.'s): per latent
//!   `½ · ((‖d_chat‖ − ‖d_base‖) / max(‖d_base‖, ‖d_chat‖) + 1)`: 0 = base-only, 1 = chat-only,
//!   0.5 = equal norms. Classes: chat-only ≥ 0.9, base-only ≤ 0.1, shared 0.4–0.6, else other.
//! - decoder cosine between a latent's base and chat decoder vectors (meaningful for shared ones).
//! - Latent Scaling (Minder, Dumas et al. 2025), closed form as in the authors'
//!   `compute_scalers.py` / `closed_form_scalars`: for latent j and model m,
//!   `β = ⟨d, Σ_i f_i y_i⟩ / (‖d‖² Σ_i f_i²)` (argmin_β Σ_i ‖β f_i d − y_i‖²) with `d` the
//!   latent's chat decoder vector and `y_i` one of two targets in the normalised space:
//!   ε, model m's activation minus its reconstruction without latent j's own contribution
//!   (`x_m − (x̂_m − f_j d_{m,j})`, the error with the latent added back), and r, model m's full
//!   reconstruction `x̂_m`. ν = β_base / β_chat. ν is undefined when β_chat ≤ 0 (the chat model
//!   itself does not hold the direction: the ratio says nothing); a chat-only latent is
//!   "chat-specific" when both ν are defined and |ν^ε| < 0.3 and |ν^r| < 0.3 (a strongly
//!   negative ν means the base model holds the direction, anti-aligned: not chat-specific).

use crate::crosscoder::CrossCoder;
use crate::Result;
use candle_core::{Tensor, D};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LatentClass {
    BaseOnly,
    ChatOnly,
    Shared,
    Other,
}

impl LatentClass {
    pub fn of(rel_norm_diff: f64) -> Self {
        if rel_norm_diff >= 0.9 {
            Self::ChatOnly
        } else if rel_norm_diff <= 0.1 {
            Self::BaseOnly
        } else if (0.4..=0.6).contains(&rel_norm_diff) {
            Self::Shared
        } else {
            Self::Other
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::BaseOnly => "base_only",
            Self::ChatOnly => "chat_only",
            Self::Shared => "shared",
            Self::Other => "other",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DecoderMetrics {
    pub norm_base: Vec<f64>,
    pub norm_chat: Vec<f64>,
    pub rel_norm_diff: Vec<f64>,
    pub cosine: Vec<f64>,
    pub class: Vec<LatentClass>,
}

impl DecoderMetrics {
    /// Model 0 is the base model, model 1 the chat model.
    pub fn compute(cc: &CrossCoder) -> Result<Self> {
        if cc.n_models() != 2 {
            return crate::invalid(format!(
                "relative decoder norms need a 2-model crosscoder; this one has {} models",
                cc.n_models()
            ));
        }
        let norms = cc.decoder_norms()?; // (2, F)
        let nb: Vec<f64> = to_f64(&norms.get(0)?)?;
        let nc: Vec<f64> = to_f64(&norms.get(1)?)?;
        let dot = (cc.w_dec.get(0)? * cc.w_dec.get(1)?)?.sum(D::Minus1)?;
        let dot = to_f64(&dot)?;
        let mut rel = Vec::with_capacity(nb.len());
        let mut cos = Vec::with_capacity(nb.len());
        for i in 0..nb.len() {
            let m = nb[i].max(nc[i]);
            rel.push(if m > 0.0 {
                0.5 * ((nc[i] - nb[i]) / m + 1.0)
            } else {
                0.5
            });
            let den = nb[i] * nc[i];
            cos.push(if den > 0.0 { dot[i] / den } else { 0.0 });
        }
        let class = rel.iter().map(|&r| LatentClass::of(r)).collect();
        Ok(Self {
            norm_base: nb,
            norm_chat: nc,
            rel_norm_diff: rel,
            cosine: cos,
            class,
        })
    }

    pub fn rel_norm_diff_f32(&self) -> Vec<f32> {
        self.rel_norm_diff.iter().map(|&x| x as f32).collect()
    }
    pub fn cosine_f32(&self) -> Vec<f32> {
        self.cosine.iter().map(|&x| x as f32).collect()
    }

    pub fn count(&self, c: LatentClass) -> usize {
        self.class.iter().filter(|&&k| k == c).count()
    }

    /// Latents of a class.
    pub fn of_class(&self, c: LatentClass) -> Vec<usize> {
        (0..self.class.len())
            .filter(|&i| self.class[i] == c)
            .collect()
    }
}

pub(crate) fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .to_vec1()?)
}

#[derive(Debug, Clone, Serialize)]
pub struct LatentScaling {
    pub latent: usize,
    pub beta_error_base: f64,
    pub beta_error_chat: f64,
    pub beta_recon_base: f64,
    pub beta_recon_chat: f64,
    /// ν^ε = β^ε_base / β^ε_chat; NaN (null in JSON) when β^ε_chat ≤ 0.
    pub nu_error: f64,
    /// ν^r = β^r_base / β^r_chat; NaN (null in JSON) when β^r_chat ≤ 0.
    pub nu_recon: f64,
    pub chat_specific: bool,
    /// Examples where the latent fired.
    pub n_active: usize,
}

/// |ν| below this (both targets) marks a chat-only latent chat-specific (Minder et al.'s cut).
pub const NU_CHAT_SPECIFIC: f64 = 0.3;

/// ν = β_base / β_chat, NaN unless β_chat > 0 (NaN compares false, so it never passes).
fn nu(beta_base: f64, beta_chat: f64) -> f64 {
    if beta_chat > 0.0 && beta_base.is_finite() {
        beta_base / beta_chat
    } else {
        f64::NAN
    }
}

/// Latent Scaling for `latents` over activations `x` `(N, 2, d)`.
#[allow(clippy::needless_range_loop)]
pub fn latent_scaling(
    cc: &CrossCoder,
    x: &Tensor,
    latents: &[usize],
) -> Result<Vec<LatentScaling>> {
    let xn = cc.normalize(x)?;
    let f = cc.encode(x, true)?; // (N, F)
    let (n, nm, d) = xn.dims3()?;
    let fd = cc.dict_size();
    // reconstruction in normalised space (no denormalisation)
    let w = cc.w_dec.transpose(0, 1)?.reshape((fd, nm * d))?;
    let recon = f
        .matmul(&w)?
        .reshape((n, nm, d))?
        .broadcast_add(&cc.b_dec)?;
    let err = (&xn - &recon)?;
    let mut out = Vec::new();
    for &j in latents {
        let fj = f.narrow(1, j, 1)?; // (N, 1)
        let fjv = to_f64(&fj)?;
        let ff: f64 = fjv.iter().map(|v| v * v).sum();
        let n_active = fjv.iter().filter(|&&v| v > 0.0).count();
        let dchat = cc.w_dec.get(1)?.get(j)?; // (d,)
        let dd = to_f64(&dchat.sqr()?.sum_all()?)?[0];
        let mut betas = [[0f64; 2]; 2]; // [error|recon][base|chat]
        for m in 0..nm.min(2) {
            let dm = cc.w_dec.get(m)?.get(j)?; // this model's own decoder vector for latent j
            let own = fj.matmul(&dm.unsqueeze(0)?)?; // (N, d): latent j's contribution
            let e_m = (err.narrow(1, m, 1)?.squeeze(1)? + &own)?;
            let r_m = recon.narrow(1, m, 1)?.squeeze(1)?;
            for (k, y) in [e_m, r_m].iter().enumerate() {
                let proj = to_f64(&y.matmul(&dchat.unsqueeze(1)?)?.squeeze(1)?)?;
                let num: f64 = proj.iter().zip(&fjv).map(|(p, f)| p * f).sum();
                betas[k][m] = if ff > 0.0 && dd > 0.0 {
                    num / (dd * ff)
                } else {
                    f64::NAN
                };
            }
        }
        let nu_e = nu(betas[0][0], betas[0][1]);
        let nu_r = nu(betas[1][0], betas[1][1]);
        out.push(LatentScaling {
            latent: j,
            beta_error_base: betas[0][0],
            beta_error_chat: betas[0][1],
            beta_recon_base: betas[1][0],
            beta_recon_chat: betas[1][1],
            nu_error: nu_e,
            nu_recon: nu_r,
            chat_specific: nu_e.abs() < NU_CHAT_SPECIFIC && nu_r.abs() < NU_CHAT_SPECIFIC,
            n_active,
        });
    }
    Ok(out)
}

/// Fraction of variance explained: 1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖², over all models' dims.
pub fn fve(x: &Tensor, x_hat: &Tensor) -> Result<f64> {
    let mean = x.mean_keepdim(0)?;
    let res = to_f64(&(x - x_hat)?.sqr()?.sum_all()?)?[0];
    let tot = to_f64(&x.broadcast_sub(&mean)?.sqr()?.sum_all()?)?[0];
    Ok(if tot > 0.0 { 1.0 - res / tot } else { 0.0 })
}
