//! Single-model SAEs for one-model analyses: SAELens (`cfg.json` + `sae_weights.safetensors`)
//! and Gemma Scope (`params.npz` / `params.safetensors`).
//!
//! Semantics (as SAELens and the Gemma Scope tutorial define them), `x` is `(batch, d)`:
//! - `pre = (x − b_dec·[apply_b_dec_to_input]) · W_enc + b_enc`;
//! - ReLU: `f = relu(pre)`; JumpReLU: `f = relu(pre) · [pre > threshold]`;
//!   TopK: the k largest `pre` per row kept, then ReLU;
//! - `decode(f) = f · W_dec + b_dec`.
//!
//! Gemma Scope's JumpReLU SAEs do not subtract `b_dec` from the input.

use crate::{invalid, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SaeActivation {
    Relu,
    JumpRelu,
    TopK(usize),
}

#[derive(Debug, Clone)]
pub struct Sae {
    /// `(d, F)`.
    pub w_enc: Tensor,
    pub b_enc: Tensor,
    /// `(F, d)`.
    pub w_dec: Tensor,
    pub b_dec: Tensor,
    /// `(F,)`, JumpReLU only.
    pub threshold: Option<Tensor>,
    pub activation: SaeActivation,
    pub apply_b_dec_to_input: bool,
    /// The hook it was trained on, when the config says.
    pub hook_name: Option<String>,
    pub format: &'static str,
}

impl Sae {
    pub fn d(&self) -> usize {
        self.w_enc.dims()[0]
    }
    pub fn dict_size(&self) -> usize {
        self.w_enc.dims()[1]
    }

    /// From `W_enc`, `W_dec`, `b_enc`, `b_dec`, optional `threshold` and an optional SAELens
    /// config.
    pub fn from_tensors(
        sd: HashMap<String, Tensor>,
        cfg: Option<&serde_json::Value>,
        format: &'static str,
        source: &str,
    ) -> Result<Self> {
        let get = |k: &str| -> Result<Tensor> {
            match sd.get(k) {
                Some(t) => Ok(t.to_dtype(DType::F32)?),
                None => invalid(format!(
                    "{source}: missing tensor '{k}' (an SAE has W_enc, W_dec, b_enc, b_dec)"
                )),
            }
        };
        let w_enc = get("W_enc")?;
        let w_dec = get("W_dec")?;
        let (d, f) = match w_enc.dims() {
            [d, f] => (*d, *f),
            o => {
                return invalid(format!(
                "{source}: W_enc has shape {o:?}; an SAE's is (d, F) (a 3-d W_enc is a crosscoder)"
            ))
            }
        };
        if w_dec.dims() != [f, d] {
            return invalid(format!(
                "{source}: W_dec has shape {:?}, expected ({f}, {d}) from W_enc",
                w_dec.dims()
            ));
        }
        let threshold = match sd.get("threshold") {
            Some(t) => Some(t.to_dtype(DType::F32)?.reshape(f)?),
            None => None,
        };
        let s = |k: &str| cfg.and_then(|c| c.get(k)).and_then(|v| v.as_str());
        let arch = s("architecture").map(str::to_ascii_lowercase);
        let act_fn = s("activation_fn_str")
            .or(s("activation_fn"))
            .map(str::to_ascii_lowercase);
        let activation = if arch.as_deref() == Some("topk") || act_fn.as_deref() == Some("topk") {
            let k = cfg
                .and_then(|c| c.get("activation_fn_kwargs"))
                .and_then(|k| k.get("k"))
                .or_else(|| cfg.and_then(|c| c.get("k")))
                .and_then(|v| v.as_u64())
                .ok_or_else(|| {
                    crate::DiffError::Invalid(format!("{source}: a TopK SAE config needs k"))
                })?;
            SaeActivation::TopK(k as usize)
        } else if threshold.is_some() || arch.as_deref() == Some("jumprelu") {
            if threshold.is_none() {
                return invalid(format!(
                    "{source}: JumpReLU SAE without a 'threshold' tensor"
                ));
            }
            SaeActivation::JumpRelu
        } else {
            SaeActivation::Relu
        };
        if let Some(a) = arch.as_deref() {
            if !matches!(a, "standard" | "jumprelu" | "topk") {
                return invalid(format!(
                    "{source}: SAE architecture '{a}' is not supported (standard, jumprelu, topk)"
                ));
            }
        }
        Ok(Sae {
            w_enc,
            b_enc: get("b_enc")?.reshape(f)?,
            w_dec,
            b_dec: get("b_dec")?.reshape(d)?,
            threshold,
            activation,
            apply_b_dec_to_input: cfg
                .and_then(|c| c.get("apply_b_dec_to_input"))
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            hook_name: s("hook_name").or(s("hook_point")).map(String::from),
            format,
        })
    }

    fn check(&self, x: &Tensor) -> Result<Tensor> {
        let x = match x.dims() {
            [_, d] if *d == self.d() => x.clone(),
            [b, 1, d] if *d == self.d() => x.reshape((*b, *d))?,
            o => {
                return invalid(format!(
                    "input has shape {o:?} but the SAE expects (batch, {}) or (batch, 1, {})",
                    self.d(),
                    self.d()
                ))
            }
        };
        Ok(x)
    }

    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.check(x)?;
        let x = if self.apply_b_dec_to_input {
            x.broadcast_sub(&self.b_dec)?
        } else {
            x
        };
        let pre = x.matmul(&self.w_enc)?.broadcast_add(&self.b_enc)?;
        Ok(match self.activation {
            SaeActivation::Relu => pre.relu()?,
            SaeActivation::JumpRelu => {
                let th = self.threshold.as_ref().expect("checked at load");
                let mask = pre.broadcast_gt(th)?.to_dtype(DType::F32)?;
                (pre.relu()? * mask)?
            }
            SaeActivation::TopK(k) => {
                let (b, f) = pre.dims2()?;
                let vals: Vec<f32> = pre.flatten_all()?.to_vec1()?;
                let mut out = vec![0f32; vals.len()];
                let k = k.min(f);
                for r in 0..b {
                    let row = &vals[r * f..(r + 1) * f];
                    let mut idx: Vec<usize> = (0..f).collect();
                    if k > 0 && k < f {
                        idx.select_nth_unstable_by(k - 1, |&a, &c| {
                            row[c].total_cmp(&row[a]).then(a.cmp(&c))
                        });
                    }
                    for &i in &idx[..k] {
                        out[r * f + i] = row[i].max(0.0);
                    }
                }
                Tensor::from_vec(out, (b, f), pre.device())?
            }
        })
    }

    pub fn decode(&self, f: &Tensor) -> Result<Tensor> {
        Ok(f.matmul(&self.w_dec)?.broadcast_add(&self.b_dec)?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.decode(&self.encode(x)?)
    }
}
