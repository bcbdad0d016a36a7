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
use persona_lens_analysis::stats::{quantile, rank_p_value};
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

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VerificationRow {
    pub expected: String,
    pub prompt: String,
    pub activation: f64,
    /// None for NEUTRAL prompts (no expectation).
    pub pass: Option<bool>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Verification {
    pub feature_idx: usize,
    pub rows: Vec<VerificationRow>,
    /// ACTIVATE and SILENT prompts that passed, of `checked`.
    pub passed: usize,
    pub checked: usize,
    pub n_activate: usize,
    pub activate_passed: usize,
    pub n_silent: usize,
    pub silent_passed: usize,
    pub n_neutral: usize,
    /// The bar: the 95th percentile (linear interpolation) of the latent's activation on the
    /// NEUTRAL prompts; None without NEUTRAL prompts (then nothing verifies).
    pub threshold: Option<f64>,
    /// mean(ACTIVATE) − mean(SILENT), in the latent's units.
    pub statistic: f64,
    /// One-sided permutation p of `statistic` over the ACTIVATE/SILENT labels:
    /// (1 + #{T_perm >= T}) / (1 + permutations).
    pub p_value: f64,
    pub permutations: usize,
    /// Median ACTIVATE activation above the bar, median SILENT at or below it, and p < 0.05.
    /// (Medians, not every prompt: SILENT prompts a latent ignores are distributed like NEUTRAL
    /// ones, so about one in twenty of them exceeds NEUTRAL's 95th percentile by chance.)
    pub verified: bool,
    pub rule: String,
}

/// Permutations behind a verification p-value.
pub const VERIFY_PERMUTATIONS: usize = 2000;

/// Verifies one latent on labelled prompts (`(expected, prompt)`, expected ACTIVATE, SILENT or
/// NEUTRAL). The bar comes from the NEUTRAL prompts (what the latent does on a plain question),
/// not from the latent's own scale: ACTIVATE passes above the 95th percentile of NEUTRAL, SILENT
/// passes at or below it. The p-value permutes the ACTIVATE/SILENT labels (seeded), so a latent
/// that fires the same on novice and expert cues cannot verify however large it is.
pub fn verify(
    feature_idx: usize,
    prompts: &[(String, String)],
    activations: &[f64],
    seed: u64,
) -> Verification {
    use rand::{seq::SliceRandom, SeedableRng};
    let of = |kind: &str| -> Vec<f64> {
        prompts
            .iter()
            .zip(activations)
            .filter(|((e, _), _)| e == kind)
            .map(|(_, &a)| a)
            .collect()
    };
    let (act, sil, neu) = (of("ACTIVATE"), of("SILENT"), of("NEUTRAL"));
    let bar = quantile(&neu, 0.95);
    let rows: Vec<VerificationRow> = prompts
        .iter()
        .zip(activations)
        .map(|((e, p), &a)| VerificationRow {
            expected: e.clone(),
            prompt: p.clone(),
            activation: a,
            pass: match (e.as_str(), bar) {
                ("ACTIVATE", Some(b)) => Some(a > b),
                ("SILENT", Some(b)) => Some(a <= b),
                ("ACTIVATE" | "SILENT", None) => Some(false),
                _ => None,
            },
        })
        .collect();
    let count = |kind: &str| {
        rows.iter()
            .filter(|r| r.expected == kind && r.pass == Some(true))
            .count()
    };
    let (activate_passed, silent_passed) = (count("ACTIVATE"), count("SILENT"));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let statistic = mean(&act) - mean(&sil);
    let mut pooled: Vec<f64> = act.iter().chain(&sil).copied().collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ feature_idx as u64);
    let null: Vec<f64> = (0..VERIFY_PERMUTATIONS)
        .map(|_| {
            pooled.shuffle(&mut rng);
            let (a, s) = pooled.split_at(act.len());
            mean(a) - mean(s)
        })
        .collect();
    // the tolerance counts the permutations that only reorder a sum as ties
    let p_value = rank_p_value(statistic - 1e-12, &null);
    let verified = match (bar, quantile(&act, 0.5), quantile(&sil, 0.5)) {
        (Some(b), Some(ma), Some(ms)) => ma > b && ms <= b && p_value < 0.05,
        _ => false,
    };
    Verification {
        feature_idx,
        passed: activate_passed + silent_passed,
        checked: act.len() + sil.len(),
        n_activate: act.len(),
        activate_passed,
        n_silent: sil.len(),
        silent_passed,
        n_neutral: neu.len(),
        rows,
        threshold: bar,
        statistic,
        p_value,
        permutations: VERIFY_PERMUTATIONS,
        verified,
        rule: format!(
            "bar = 95th percentile of the activation on {} NEUTRAL prompts; ACTIVATE passes above it, SILENT at or below it; verified when the median ACTIVATE activation is above the bar, the median SILENT one at or below it, and the permutation p of mean(ACTIVATE) − mean(SILENT) over {VERIFY_PERMUTATIONS} label shuffles is below 0.05",
            neu.len()
        ),
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

/// The selection effect of taking the best of many features: the null distribution of the
/// maximum over features of the mean `a − b`, by flipping the sign of whole clusters' (questions')
/// differences (exchangeable under the null of no persona effect in any feature).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MaxNull {
    /// The observed maximum over features of the mean difference.
    pub observed: f64,
    pub feature_idx: usize,
    /// 95th percentile of the null maximum.
    pub null_q95: f64,
    /// (1 + #{null max >= observed}) / (1 + reps).
    pub p_value: f64,
    pub reps: usize,
    pub n_features: usize,
    pub n_clusters: usize,
}

/// [`MaxNull`] for pair differences `diffs` whose clusters are `cluster[i]`; None without
/// pairs.
pub fn max_mean_null(
    diffs: &[PairDiff],
    cluster: &[usize],
    reps: usize,
    seed: u64,
) -> Option<MaxNull> {
    use rand::{Rng, SeedableRng};
    let n = diffs.len();
    let f = diffs.first()?.diff.len();
    let mut ids: Vec<usize> = cluster.to_vec();
    ids.sort();
    ids.dedup();
    let mut sums = vec![vec![0f64; f]; ids.len()];
    for (d, c) in diffs.iter().zip(cluster) {
        let k = ids.binary_search(c).ok()?;
        for (s, v) in sums[k].iter_mut().zip(&d.diff) {
            *s += v;
        }
    }
    let max_mean = |signs: &[f64]| -> (f64, usize) {
        let mut best = (f64::NEG_INFINITY, 0);
        for j in 0..f {
            let m = sums.iter().zip(signs).map(|(s, g)| g * s[j]).sum::<f64>() / n as f64;
            if m > best.0 {
                best = (m, j);
            }
        }
        best
    };
    let (observed, feature_idx) = max_mean(&vec![1.0; ids.len()]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6d61_786e);
    let null: Vec<f64> = (0..reps)
        .map(|_| {
            let signs: Vec<f64> = (0..ids.len())
                .map(|_| if rng.random_bool(0.5) { 1.0 } else { -1.0 })
                .collect();
            max_mean(&signs).0
        })
        .collect();
    Some(MaxNull {
        observed,
        feature_idx,
        // No draws, no null distribution: no test.
        null_q95: quantile(&null, 0.95)?,
        p_value: rank_p_value(observed - 1e-12, &null),
        reps,
        n_features: f,
        n_clusters: ids.len(),
    })
}

#[cfg(test)]
mod verification_tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn prompts(n_act: usize, n_sil: usize, n_neu: usize) -> Vec<(String, String)> {
        let mut v = vec![];
        for (kind, n) in [("ACTIVATE", n_act), ("SILENT", n_sil), ("NEUTRAL", n_neu)] {
            for i in 0..n {
                v.push((kind.to_string(), format!("{kind} {i}")));
            }
        }
        v
    }

    #[test]
    fn verification_passes_a_selective_latent_and_fails_unselective_ones() {
        let p = prompts(8, 7, 12);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut noise = |s: f64| rng.random_range(0.0..s);
        // selective: ACTIVATE ~ 5, SILENT and NEUTRAL ~ 0-1
        let acts: Vec<f64> = p
            .iter()
            .map(|(e, _)| {
                if e == "ACTIVATE" {
                    5.0 + noise(1.0)
                } else {
                    noise(1.0)
                }
            })
            .collect();
        let v = verify(0, &p, &acts, 0);
        assert!(v.verified, "{v:?}");
        assert!(v.p_value < 0.01 && v.activate_passed == 8, "{v:?}");
        // SILENT is distributed like NEUTRAL: some exceed its 95th percentile by chance
        assert!(v.silent_passed >= 3, "{v:?}");
        assert_eq!((v.n_neutral, v.checked), (12, 15));
        // fires on everything, however strongly: ACTIVATE is not above NEUTRAL's bar
        let acts: Vec<f64> = p.iter().map(|_| 50.0 + noise(1.0)).collect();
        let v = verify(1, &p, &acts, 0);
        assert!(!v.verified && v.p_value > 0.05, "{v:?}");
        // the old rule's pass (ACTIVATE > 0, SILENT below 10 % of ACTIVATE's max) is not enough:
        // NEUTRAL questions fire as much as ACTIVATE ones
        let acts: Vec<f64> = p
            .iter()
            .map(|(e, _)| if e == "SILENT" { 0.0 } else { 5.0 + noise(1.0) })
            .collect();
        let v = verify(2, &p, &acts, 0);
        assert!(!v.verified && v.activate_passed < 4, "{v:?}");
        // perfectly separated but only 3 vs 3 prompts: the smallest possible permutation p is
        // 1/20, so it cannot verify
        let p3 = prompts(3, 3, 4);
        let v = verify(
            4,
            &p3,
            &[1.03, 1.02, 1.01, 0.99, 0.98, 0.97, 1.0, 1.0, 1.0, 1.0],
            0,
        );
        assert!(v.activate_passed == 3 && v.silent_passed == 3, "{v:?}");
        assert!(v.p_value >= 0.04 && !v.verified, "{v:?}");
        // no NEUTRAL prompts: no bar, nothing verifies
        let p2 = prompts(3, 3, 0);
        let v = verify(3, &p2, &[5.0, 5.0, 5.0, 0.0, 0.0, 0.0], 0);
        assert!(v.threshold.is_none() && !v.verified);
    }

    #[test]
    fn the_max_over_features_null_separates_a_planted_feature_from_noise() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let make = |rng: &mut rand::rngs::StdRng, effect: f64| -> (Vec<PairDiff>, Vec<usize>) {
            let (mut d, mut q) = (vec![], vec![]);
            for c in 0..10 {
                for k in 0..3 {
                    let mut diff: Vec<f64> =
                        (0..200).map(|_| rng.random_range(-1.0..1.0)).collect();
                    diff[17] += effect;
                    d.push(PairDiff {
                        pair: format!("{c}/{k}"),
                        diff,
                    });
                    q.push(c);
                }
            }
            (d, q)
        };
        let (d, q) = make(&mut rng, 1.0);
        let n = max_mean_null(&d, &q, 500, 1).unwrap();
        assert_eq!(n.feature_idx, 17);
        assert!(n.p_value < 0.01 && n.observed > n.null_q95, "{n:?}");
        // pure noise: the best of 200 features is what chance gives
        let rejected = (0..40)
            .filter(|&s| {
                let (d, q) = make(&mut rng, 0.0);
                max_mean_null(&d, &q, 200, s).unwrap().p_value < 0.05
            })
            .count();
        assert!(rejected <= 8, "{rejected} of 40 null runs rejected");
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.95), Some(4.8));
    }
}
