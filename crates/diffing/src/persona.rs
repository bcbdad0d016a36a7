//! The crosscoder notebook's analyses, over latent activations of paired prompts:
//! novice-vs-expert latent differences per prompt pair and their consistency across pairs,
//! verification prompts, sycophancy triggers, max-activating examples, and the notebook's
//! fallback "direct activation comparison" when no crosscoder is given.
//!
//! Latent activations are `get_activations` (encode × code normalisation), so latents with
//! different decoder norms are comparable; units are "scaled latent activation".

use crate::crosscoder::CrossCoder;
use crate::metrics::to_f64;
use crate::paired::PairedStore;
use crate::Result;
use candle_core::Tensor;
use serde::Serialize;
use std::collections::BTreeMap;

/// One prompt's latent activations (or, for the fallback, activation dimensions).
#[derive(Debug, Clone)]
pub struct PromptCodes {
    pub id: String,
    pub class: String,
    pub values: Vec<f64>,
}

/// The key two prompts of one pair share: the id without its final `/class` part.
pub fn pair_key(id: &str) -> String {
    match id.rsplit_once('/') {
        Some((k, _)) => k.to_string(),
        None => id.to_string(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PairDiff {
    pub pair: String,
    /// `a − b` per feature (novice − expert, or biased − neutral).
    pub diff: Vec<f64>,
}

/// Pairs `a_class` with `b_class` prompts by [`pair_key`] and returns `a − b` per pair.
pub fn pair_differences(codes: &[PromptCodes], a_class: &str, b_class: &str) -> Vec<PairDiff> {
    let mut a: BTreeMap<String, &PromptCodes> = BTreeMap::new();
    let mut b: BTreeMap<String, &PromptCodes> = BTreeMap::new();
    for c in codes {
        if c.class == a_class {
            a.insert(pair_key(&c.id), c);
        } else if c.class == b_class {
            b.insert(pair_key(&c.id), c);
        }
    }
    a.iter()
        .filter_map(|(k, pa)| {
            b.get(k).map(|pb| PairDiff {
                pair: k.clone(),
                diff: pa
                    .values
                    .iter()
                    .zip(&pb.values)
                    .map(|(x, y)| x - y)
                    .collect(),
            })
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub feature_idx: usize,
    /// Mean of `a − b` over all pairs.
    pub mean_score: f64,
    pub std_score: f64,
    /// Pairs analysed.
    pub n_pairs: usize,
    /// Pairs whose top-k (by `a − b`) contains this feature: the notebook's count.
    pub n_pairs_top_k: usize,
    /// Fraction of pairs with `a − b > 0`.
    pub frac_positive: f64,
    /// mean / (sd / sqrt(n)).
    pub t: f64,
}

/// Consistency across pairs, ranked by mean score (largest first). The notebook kept only the
/// top-10 per pair and averaged those; we keep that count (`n_pairs_top_k`) but average over
/// every pair, so a feature's score is not inflated by the pairs where it happened to rank.
pub fn consistency(diffs: &[PairDiff], top_k: usize) -> Vec<Candidate> {
    let n = diffs.len();
    let f = diffs.first().map(|d| d.diff.len()).unwrap_or(0);
    let mut top_counts = vec![0usize; f];
    for d in diffs {
        let mut idx: Vec<usize> = (0..f).collect();
        idx.sort_by(|&a, &b| d.diff[b].total_cmp(&d.diff[a]));
        for &i in idx.iter().take(top_k) {
            if d.diff[i] > 0.0 {
                top_counts[i] += 1;
            }
        }
    }
    let mut out: Vec<Candidate> = (0..f)
        .map(|j| {
            let v: Vec<f64> = diffs.iter().map(|d| d.diff[j]).collect();
            let mean = v.iter().sum::<f64>() / n.max(1) as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n.max(2) - 1) as f64;
            let sd = var.sqrt();
            Candidate {
                feature_idx: j,
                mean_score: mean,
                std_score: sd,
                n_pairs: n,
                n_pairs_top_k: top_counts[j],
                frac_positive: v.iter().filter(|&&x| x > 0.0).count() as f64 / n.max(1) as f64,
                t: if sd > 0.0 {
                    mean / (sd / (n as f64).sqrt())
                } else if mean != 0.0 {
                    f64::INFINITY.copysign(mean)
                } else {
                    0.0
                },
            }
        })
        .collect();
    out.sort_by(|a, b| b.mean_score.total_cmp(&a.mean_score));
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct VerificationRow {
    pub expected: String,
    pub prompt: String,
    pub activation: f64,
    /// None for NEUTRAL prompts (no expectation).
    pub pass: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub feature_idx: usize,
    pub rows: Vec<VerificationRow>,
    pub passed: usize,
    pub checked: usize,
    /// The SILENT bar: 10 % of the largest ACTIVATE activation.
    pub silent_threshold: f64,
    pub rule: String,
}

/// Pass/fail per prompt: ACTIVATE passes when the feature is active (> 0); SILENT passes when it
/// stays below 10 % of the largest ACTIVATE activation (the notebook used an absolute 0.1, which
/// depends on the feature's scale).
pub fn verify(
    feature_idx: usize,
    prompts: &[(String, String)],
    activations: &[f64],
) -> Verification {
    let max_act = prompts
        .iter()
        .zip(activations)
        .filter(|((e, _), _)| e == "ACTIVATE")
        .map(|(_, &a)| a)
        .fold(0.0, f64::max);
    let bar = 0.1 * max_act;
    let rows: Vec<VerificationRow> = prompts
        .iter()
        .zip(activations)
        .map(|((e, p), &a)| VerificationRow {
            expected: e.clone(),
            prompt: p.clone(),
            activation: a,
            pass: match e.as_str() {
                "ACTIVATE" => Some(a > 0.0),
                "SILENT" => Some(a <= bar),
                _ => None,
            },
        })
        .collect();
    let checked = rows.iter().filter(|r| r.pass.is_some()).count();
    let passed = rows.iter().filter(|r| r.pass == Some(true)).count();
    Verification {
        feature_idx,
        rows,
        passed,
        checked,
        silent_threshold: bar,
        rule: "ACTIVATE passes if activation > 0; SILENT passes if activation <= 0.1 x the largest ACTIVATE activation; NEUTRAL is reported only".into(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Example {
    pub activation: f64,
    pub sample_id: String,
    pub source: String,
    /// The row's token (per-token stores) or the sample's last token.
    pub token: String,
    /// The sample text up to and including the token, trimmed to the last 160 characters.
    pub context: String,
}

/// Top `n` rows of `store` for each latent in `latents` (scaled activations), streaming shards.
pub fn max_activating(
    cc: &CrossCoder,
    store: &PairedStore,
    latents: &[usize],
    n: usize,
) -> Result<BTreeMap<usize, Vec<Example>>> {
    let mut best: BTreeMap<usize, Vec<(f64, usize)>> =
        latents.iter().map(|&j| (j, vec![])).collect();
    let mut base = 0usize;
    for i in 0..store.meta.shards.len() {
        let x = store.shard(i)?;
        let rows = x.dim(0)?;
        for start in (0..rows).step_by(4096) {
            let len = 4096.min(rows - start);
            let a = cc.get_activations(&x.narrow(0, start, len)?, true)?;
            for &j in latents {
                let v = to_f64(&a.narrow(1, j, 1)?)?;
                let e = best.get_mut(&j).expect("latent listed");
                for (r, &val) in v.iter().enumerate() {
                    if val > 0.0 {
                        e.push((val, base + start + r));
                    }
                }
                e.sort_by(|p, q| q.0.total_cmp(&p.0));
                e.truncate(n);
            }
        }
        base += rows;
    }
    let mut out = BTreeMap::new();
    for (j, rows) in best {
        let ex = rows
            .into_iter()
            .map(|(val, row)| {
                let s = store
                    .meta
                    .samples
                    .iter()
                    .find(|s| row >= s.first_row && row < s.first_row + s.n_rows);
                match s {
                    Some(s) => {
                        let k = row - s.first_row;
                        let upto: String =
                            s.tokens[..=k.min(s.tokens.len().saturating_sub(1))].concat();
                        let upto = if store.meta.alignment == crate::paired::Alignment::Last {
                            s.text.clone()
                        } else {
                            upto.replace(['▁', 'Ġ'], " ").replace('Ċ', "\n")
                        };
                        let tail: String = {
                            let c: Vec<char> = upto.chars().collect();
                            c[c.len().saturating_sub(160)..].iter().collect()
                        };
                        Example {
                            activation: val,
                            sample_id: s.id.clone(),
                            source: s.source.clone(),
                            token: s.tokens.get(k).cloned().unwrap_or_default(),
                            context: tail,
                        }
                    }
                    None => Example {
                        activation: val,
                        sample_id: format!("row {row}"),
                        source: String::new(),
                        token: String::new(),
                        context: String::new(),
                    },
                }
            })
            .collect();
        out.insert(j, ex);
    }
    Ok(out)
}

/// One `(N, width)` matrix's rows as per-prompt codes, row i = `ids[i]`.
fn rows_to_codes(m: &Tensor, ids: &[(String, String)]) -> Result<Vec<PromptCodes>> {
    let w = m.dim(1)?;
    let v = to_f64(m)?;
    Ok(ids
        .iter()
        .enumerate()
        .map(|(i, (id, class))| PromptCodes {
            id: id.clone(),
            class: class.clone(),
            values: v[i * w..(i + 1) * w].to_vec(),
        })
        .collect())
}

/// Rows of `x` `(N, 2, d)` to per-prompt latent codes (scaled activations).
pub fn codes_for(
    cc: &CrossCoder,
    x: &Tensor,
    ids: &[(String, String)],
) -> Result<Vec<PromptCodes>> {
    rows_to_codes(&cc.get_activations(x, true)?, ids)
}

/// The notebook's fallback without a crosscoder: the chat model's (index 1) raw activation
/// dimensions as "features" (only its real width).
pub fn direct_codes(
    x: &Tensor,
    chat_dim: usize,
    ids: &[(String, String)],
) -> Result<Vec<PromptCodes>> {
    let chat = x.narrow(1, 1, 1)?.squeeze(1)?.narrow(1, 0, chat_dim)?;
    rows_to_codes(&chat, ids)
}
