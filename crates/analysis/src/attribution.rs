//! Attribution patching (Nanda 2023; Syed et al. 2023): the first-order estimate of every patch
//! at once, `(source - base) . d metric / d activation`, from one forward and one backward pass
//! of the base run through candle's autograd. Gradients are read at each hook by adding a zero
//! `Var` there (the activation's value is unchanged and the graph is not cut).

use crate::patching::{Direction, Metric, Patcher, SweepKind};
use crate::stats::pearson;
use crate::{AnalysisError, Result};
use candle_core::{Tensor, Var, D};
use persona_lens_engine::hooks::HookFn;
use persona_lens_engine::{Batch, HookCtx, HookName, Hooks, LogitsAt, Op, Selector};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// Attribution estimates for one sweep kind, in the layout of [`SweepKind::shape`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttrSweep {
    pub kind: SweepKind,
    pub direction: Direction,
    pub shape: Vec<usize>,
    pub axes: Vec<String>,
    /// Estimated change of the metric, `(source - base) . grad`.
    pub delta: Vec<f32>,
}

/// Agreement of attribution estimates with real patching effects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Agreement {
    pub pearson_r: f64,
    /// |top-k by |attribution| ∩ top-k by |real effect|| / k.
    pub top_k_overlap: f64,
    pub k: usize,
    /// Entries compared (entries where both are exactly 0, i.e. no-op patches, are included).
    pub n: usize,
}

pub fn agreement(estimated: &[f32], real: &[f32], k: usize) -> Agreement {
    let a: Vec<f64> = estimated.iter().map(|&x| x as f64).collect();
    let b: Vec<f64> = real.iter().map(|&x| x as f64).collect();
    let k = k.min(a.len()).max(1);
    let top = |v: &[f64]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[j].abs().total_cmp(&v[i].abs()));
        idx.truncate(k);
        idx
    };
    let (ta, tb) = (top(&a), top(&b));
    let inter = ta.iter().filter(|i| tb.contains(i)).count();
    Agreement {
        pearson_r: pearson(&a, &b),
        top_k_overlap: inter as f64 / k as f64,
        k,
        n: a.len(),
    }
}

fn metric_tensor(p: &Patcher, logits: &Tensor) -> Result<Tensor> {
    // logits: [1, vocab]
    let lsm = |x: &Tensor| -> Result<Tensor> {
        let m = x.max_keepdim(D::Minus1)?.detach();
        let s = x.broadcast_sub(&m)?;
        let lse = s.exp()?.sum_keepdim(D::Minus1)?.log()?;
        Ok(s.broadcast_sub(&lse)?)
    };
    Ok(match &p.metric {
        Metric::LogitDiff { a, b } => {
            (logits.narrow(1, *a as usize, 1)? - logits.narrow(1, *b as usize, 1)?)?.sum_all()?
        }
        Metric::LogProb { token } => lsm(logits)?.narrow(1, *token as usize, 1)?.sum_all()?,
        Metric::KlFromClean => {
            let cl = lsm(&p.clean.logits_last.unsqueeze(0)?)?.detach();
            let pc = cl.exp()?;
            pc.mul(&cl.broadcast_sub(&lsm(logits)?)?)?.sum_all()?
        }
    })
}

/// Attribution estimates for `kinds` in direction `dir`: one forward + one backward.
pub fn attribute(p: &Patcher, kinds: &[SweepKind], dir: Direction) -> Result<Vec<AttrSweep>> {
    let model = p.model;
    let cfg = model.config();
    let (base_ids, base_cache) = match dir {
        Direction::Denoise => (&p.pair.corrupted_ids, &p.corrupted),
        Direction::Noise => (&p.pair.clean_ids, &p.clean),
    };
    let seq = base_ids.len();
    let mut points: Vec<_> = kinds.iter().map(|k| k.point()).collect();
    points.sort_by_key(|p| *p as u32);
    points.dedup();
    // One zero Var per (layer, point), added at the hook.
    let mut vars: HashMap<HookName, Var> = HashMap::new();
    let mut hooks = Hooks::new();
    hooks.differentiable = true;
    for l in 0..cfg.n_layers {
        for &pt in &points {
            let h = HookName::block(l, pt);
            let shape = base_cache.hooks.cache.get(&h)?.shape().clone();
            let v = Var::zeros(shape, candle_core::DType::F32, model.device())?;
            let t = v.as_tensor().clone();
            let f: HookFn = Arc::new(move |x: &Tensor, _: &HookCtx| x.broadcast_add(&t));
            hooks.intervene(h, Op::Func(f), Selector::all());
            vars.insert(h, v);
        }
    }
    let batch = Batch::left_padded(&[base_ids.to_vec()], model.pad_id(), model.device())?;
    let logits = model
        .forward(&batch, None, &mut hooks, LogitsAt::Last)?
        .ok_or_else(|| AnalysisError::Invalid("no logits".into()))?;
    let m = metric_tensor(p, &logits)?;
    let grads = m.backward()?;
    let mut out = Vec::new();
    for &kind in kinds {
        let mut delta = Vec::new();
        for l in 0..cfg.n_layers {
            let h = HookName::block(l, kind.point());
            let g = grads
                .get(vars[&h].as_tensor())
                .cloned()
                .unwrap_or(vars[&h].as_tensor().zeros_like()?);
            let diff = (p.source_activation(dir, &h)? - base_cache.hooks.cache.get(&h)?)?;
            let prod = (g * diff)?.get(0)?; // drop batch
            match kind {
                SweepKind::ResidPre
                | SweepKind::ResidMid
                | SweepKind::AttnOut
                | SweepKind::MlpOut => {
                    // [S, d] -> [S]
                    delta.extend(prod.sum(1)?.to_vec1::<f32>()?);
                }
                SweepKind::ZLast | SweepKind::ZAll | SweepKind::ZByPos => {
                    let per = prod.sum(2)?; // [S, H]
                    match kind {
                        SweepKind::ZLast => delta.extend(per.get(seq - 1)?.to_vec1::<f32>()?),
                        SweepKind::ZAll => delta.extend(per.sum(0)?.to_vec1::<f32>()?),
                        _ => delta.extend(per.t()?.flatten_all()?.to_vec1::<f32>()?),
                    }
                }
                SweepKind::Pattern => {
                    // [H, S, S] -> [H]
                    delta.extend(prod.sum(2)?.sum(1)?.to_vec1::<f32>()?);
                }
            }
        }
        out.push(AttrSweep {
            kind,
            direction: dir,
            shape: kind.shape(cfg.n_layers, cfg.n_heads, seq),
            axes: kind.axes().into_iter().map(String::from).collect(),
            delta,
        });
    }
    Ok(out)
}
