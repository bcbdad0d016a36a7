//! Cheap diffing baselines beside the crosscoder, as the model-diffing literature uses them
//! (Minder et al.; Lindsey et al.): per-token KL divergence between the two models' next-token
//! distributions on the same ids, and PCA of the activation differences (chat − base) on the
//! persona prompts. Each comes with its top examples, so a crosscoder latent can be compared
//! with what a simpler method already shows. Both need the two models to read the same token
//! ids (a base/chat pair of one model); a different-family pair gets neither.

use crate::harvest::{CorpusItem, PairSetup};
use crate::{invalid, Result};
use candle_core::{DType, Tensor, D};
use persona_lens_engine::{Batch, Hooks, LogitsAt, Model};
use serde::Serialize;
use std::collections::BTreeMap;

/// One position's divergence: the models' distributions over the token after `context`.
#[derive(Debug, Clone, Serialize)]
pub struct KlToken {
    pub sample: String,
    pub class: String,
    /// Index of the position in the sample's ids (the distribution is over the next token).
    pub position: usize,
    /// The last few tokens up to and including `position`, decoded.
    pub context: String,
    pub kl_nats: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct KlBaseline {
    /// KL(chat ‖ base) of the next-token distributions, in nats, at every position after the
    /// first (the BOS position is left out, as in the paired harvest).
    pub statistic: String,
    pub n_samples: usize,
    pub n_tokens: usize,
    pub mean_kl_nats: f64,
    /// Mean over each class's positions (e.g. novice vs expert prompts).
    pub mean_kl_by_class: BTreeMap<String, f64>,
    /// The largest divergences over all positions, largest first.
    pub top: Vec<KlToken>,
}

/// Largest float count of one logits chunk (b × t × vocab); bounds memory for large vocabularies.
const MAX_LOGITS: usize = 1 << 25;

/// `log_softmax` over the last dimension.
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Per-token KL(chat ‖ base) on `items`, both models reading the chat model's (index 1) ids
/// (its chat template when `chat_template`). `setup` places interventions as in the paired
/// harvest (known-answer tests plant a feature through it).
pub fn per_token_kl(
    models: [&Model; 2],
    items: &[CorpusItem],
    chat_template: bool,
    setup: [Option<PairSetup>; 2],
    batch_size: usize,
    top_n: usize,
) -> Result<KlBaseline> {
    let vocab = [models[0].config().vocab_size, models[1].config().vocab_size];
    if vocab[0] != vocab[1] {
        return invalid(format!(
            "per-token KL needs one vocabulary, but {} and {} have {} and {} tokens",
            models[0].info.name, models[1].info.name, vocab[0], vocab[1]
        ));
    }
    if items.is_empty() {
        return invalid("per-token KL needs at least one prompt");
    }
    let ids: Vec<Vec<u32>> = items
        .iter()
        .map(|c| models[1].encode_prompt(&c.text, chat_template))
        .collect::<std::result::Result<_, _>>()?;
    let t_max = ids.iter().map(|s| s.len()).max().unwrap_or(1);
    let bs = batch_size
        .min(MAX_LOGITS / (t_max * vocab[0]).max(1))
        .max(1);
    let tok = &models[1].tokenizer;
    let mut all: Vec<KlToken> = vec![];
    for (ci, chunk) in ids.chunks(bs).enumerate() {
        let mut logp = vec![];
        let mut pads = vec![];
        for m in 0..2 {
            let batch = Batch::left_padded(chunk, models[m].pad_id(), models[m].device())?;
            let mut hooks = Hooks::new();
            if let Some(f) = setup[m] {
                f(chunk, &batch, &mut hooks)?;
            }
            let logits = models[m]
                .forward(&batch, None, &mut hooks, LogitsAt::All)?
                .expect("logits at every position");
            logp.push(log_softmax(&logits.to_dtype(DType::F32)?)?);
            pads = batch.pad.clone();
        }
        // KL(chat ‖ base) = Σ p_chat (log p_chat − log p_base), per (row, position)
        let kl: Vec<Vec<f32>> = (logp[1].exp()? * (&logp[1] - &logp[0])?)?
            .sum(D::Minus1)?
            .to_vec2()?;
        for (r, s) in chunk.iter().enumerate() {
            let item = &items[ci * bs + r];
            for i in 1..s.len() {
                let from = i.saturating_sub(5);
                all.push(KlToken {
                    sample: item.id.clone(),
                    class: item.source.clone(),
                    position: i,
                    context: tok.decode(&s[from..=i], false)?,
                    kl_nats: kl[r][pads[r] + i] as f64,
                });
            }
        }
    }
    let n_tokens = all.len();
    let mean = |v: &[&KlToken]| v.iter().map(|k| k.kl_nats).sum::<f64>() / v.len().max(1) as f64;
    let mut by_class: BTreeMap<String, Vec<&KlToken>> = BTreeMap::new();
    for k in &all {
        by_class.entry(k.class.clone()).or_default().push(k);
    }
    let mean_kl_by_class = by_class.iter().map(|(c, v)| (c.clone(), mean(v))).collect();
    let mean_kl_nats = mean(&all.iter().collect::<Vec<_>>());
    all.sort_by(|a, b| b.kl_nats.total_cmp(&a.kl_nats));
    all.truncate(top_n);
    Ok(KlBaseline {
        statistic: "KL(chat ‖ base) of the next-token distributions, nats".into(),
        n_samples: items.len(),
        n_tokens,
        mean_kl_nats,
        mean_kl_by_class,
        top: all,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct PcaExample {
    pub sample: String,
    pub class: String,
    pub text: String,
    pub projection: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PcaComponent {
    pub index: usize,
    /// Share of the total variance of the differences.
    pub explained_variance_ratio: f64,
    /// Mean projection per class; the sign is chosen so that `classes.0` projects at least as
    /// high as `classes.1`.
    pub mean_projection_by_class: BTreeMap<String, f64>,
    pub top_positive: Vec<PcaExample>,
    pub top_negative: Vec<PcaExample>,
    /// The unit direction in the models' residual space (chat − base).
    #[serde(skip)]
    pub direction: Vec<f32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PcaBaseline {
    pub statistic: String,
    pub n_rows: usize,
    /// Total variance of the differences (sum over dimensions), residual units squared; 0 when
    /// the models agree everywhere (then there are no components).
    pub total_variance: f64,
    pub components: Vec<PcaComponent>,
}

/// PCA of `chat − base` over paired rows `x` `(N, 2, d)` (the models' first `width` dimensions;
/// both must have that width). `labels[i]` = (sample id, class, text) of row i; `classes`
/// orients each component (the first class projects higher).
pub fn pca_of_differences(
    x: &Tensor,
    width: usize,
    labels: &[(String, String, String)],
    classes: (&str, &str),
    n_components: usize,
    top_n: usize,
) -> Result<PcaBaseline> {
    let n = x.dim(0)?;
    if n != labels.len() {
        return invalid(format!("{n} rows but {} labels", labels.len()));
    }
    if n < 2 {
        return invalid("PCA of differences needs at least 2 rows");
    }
    let diff = (x.narrow(1, 1, 1)? - x.narrow(1, 0, 1)?)?
        .squeeze(1)?
        .narrow(1, 0, width)?
        .to_dtype(DType::F64)?;
    let centred = diff.broadcast_sub(&diff.mean_keepdim(0)?)?;
    // the Gram matrix (N × N) is smaller than the covariance when N < d; its eigenvectors u
    // give the components X^T u / √λ and the projections √λ · u
    let gram: Vec<Vec<f64>> = centred.matmul(&centred.t()?)?.to_vec2()?;
    let trace: f64 = (0..n).map(|i| gram[i][i]).sum();
    let mut components = vec![];
    let mut k = gram;
    for index in 0..n_components.min(n - 1) {
        if trace <= 0.0 {
            break;
        }
        let (lambda, u) = top_eigen(&k);
        if lambda <= 1e-12 * trace {
            break;
        }
        let mut proj: Vec<f64> = u.iter().map(|v| v * lambda.sqrt()).collect();
        let class_mean = |proj: &[f64], c: &str| {
            let v: Vec<f64> = (0..n)
                .filter(|&i| labels[i].1 == c)
                .map(|i| proj[i])
                .collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let sign = match (class_mean(&proj, classes.0), class_mean(&proj, classes.1)) {
            (Some(a), Some(b)) if a < b => -1.0,
            _ => 1.0,
        };
        proj.iter_mut().for_each(|p| *p *= sign);
        let ut = Tensor::from_vec(
            u.iter()
                .map(|v| v * sign / lambda.sqrt())
                .collect::<Vec<f64>>(),
            (1, n),
            x.device(),
        )?;
        let direction: Vec<f32> = ut
            .matmul(&centred)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let mut mean_projection_by_class = BTreeMap::new();
        for (_, c, _) in labels {
            if !mean_projection_by_class.contains_key(c) {
                if let Some(m) = class_mean(&proj, c) {
                    mean_projection_by_class.insert(c.clone(), m);
                }
            }
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| proj[b].total_cmp(&proj[a]));
        let example = |i: usize| PcaExample {
            sample: labels[i].0.clone(),
            class: labels[i].1.clone(),
            text: labels[i].2.chars().take(120).collect(),
            projection: proj[i],
        };
        components.push(PcaComponent {
            index,
            explained_variance_ratio: lambda / trace,
            mean_projection_by_class,
            top_positive: order.iter().take(top_n).map(|&i| example(i)).collect(),
            top_negative: order
                .iter()
                .rev()
                .take(top_n)
                .map(|&i| example(i))
                .collect(),
            direction,
        });
        // deflate
        for (i, row) in k.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v -= lambda * u[i] * u[j];
            }
        }
    }
    Ok(PcaBaseline {
        statistic: "PCA of chat − base activations at the hook, last prompt token".into(),
        n_rows: n,
        total_variance: trace / (n - 1) as f64,
        components,
    })
}

/// Largest eigenvalue and its unit eigenvector of a symmetric positive semi-definite matrix, by
/// power iteration from a fixed start (deterministic).
fn top_eigen(k: &[Vec<f64>]) -> (f64, Vec<f64>) {
    let n = k.len();
    let mut u: Vec<f64> = (0..n).map(|i| 1.0 + (i as f64 * 0.618).fract()).collect();
    let mut lambda = 0.0;
    for _ in 0..1000 {
        let mut w: Vec<f64> = k
            .iter()
            .map(|row| row.iter().zip(&u).map(|(a, b)| a * b).sum())
            .collect();
        let norm = w.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm == 0.0 {
            return (0.0, u);
        }
        w.iter_mut().for_each(|v| *v /= norm);
        let delta: f64 = w.iter().zip(&u).map(|(a, b)| (a - b).abs()).sum();
        u = w;
        let converged = (norm - lambda).abs() <= 1e-12 * norm && delta < 1e-10;
        lambda = norm;
        if converged {
            break;
        }
    }
    (lambda, u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Rows whose difference is `a_i · e_0 + b_i · e_1` with var(a) ≫ var(b): PC1 is e_0 with
    /// the planted variance share, PC2 is e_1.
    #[test]
    fn pca_recovers_planted_axes_and_variance_shares() {
        let (n, d) = (40, 6);
        let mut data = vec![0f32; n * 2 * d];
        let mut labels = vec![];
        let (mut va, mut vb) = (vec![], vec![]);
        for i in 0..n {
            // uncorrelated, zero-mean: a alternates ±3, b goes +1, +1, −1, −1
            let a: f32 = if i % 2 == 0 { 3.0 } else { -3.0 };
            let b: f32 = if i % 4 < 2 { 1.0 } else { -1.0 };
            va.push(a as f64);
            vb.push(b as f64);
            // base row: anything; chat row = base + difference
            for j in 0..d {
                let base = (i * d + j) as f32 * 0.01;
                data[(i * 2) * d + j] = base;
                data[(i * 2 + 1) * d + j] = base
                    + if j == 0 {
                        a
                    } else if j == 1 {
                        b
                    } else {
                        0.0
                    };
            }
            let class = if i % 2 == 0 { "novice" } else { "expert" };
            labels.push((format!("s{i}"), class.to_string(), format!("text {i}")));
        }
        let x = Tensor::from_vec(data, (n, 2, d), &Device::Cpu).unwrap();
        let p = pca_of_differences(&x, d, &labels, ("novice", "expert"), 3, 3).unwrap();
        let var = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64
        };
        let share = var(&va) / (var(&va) + var(&vb));
        assert!((share - 0.9).abs() < 1e-12);
        assert_eq!(p.components.len(), 2, "rank 2: two components");
        let c0 = &p.components[0];
        assert!((c0.explained_variance_ratio - share).abs() < 1e-6, "{c0:?}");
        assert!(c0.direction[0] > 0.999, "{:?}", c0.direction);
        assert!(p.components[1].direction[1].abs() > 0.999);
        assert!(c0.mean_projection_by_class["novice"] > c0.mean_projection_by_class["expert"]);
        assert!(c0.top_positive.iter().all(|e| e.class == "novice"));
        assert!((p.total_variance - var(&va) - var(&vb)).abs() < 1e-4);
    }

    #[test]
    fn identical_models_have_no_components() {
        let x = Tensor::ones((5, 2, 3), DType::F32, &Device::Cpu).unwrap();
        let labels: Vec<_> = (0..5)
            .map(|i| (i.to_string(), "a".into(), String::new()))
            .collect();
        let p = pca_of_differences(&x, 3, &labels, ("a", "b"), 3, 2).unwrap();
        assert!(p.components.is_empty());
        assert_eq!(p.total_variance, 0.0);
    }
}
