//! Small statistics used across analyses: intervals, ROC AUC, correlation.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// Wilson score interval (95 %) for `k` successes out of `n`.
pub fn wilson95(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let n = n as f64;
    let p = k as f64 / n;
    let den = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / den;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / den;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Binary ROC AUC (Mann-Whitney U, ties count one half). `None` if a class is missing.
pub fn auc_binary(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties.
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    let n_pos = positive.iter().filter(|&&p| p).count() as f64;
    let n_neg = positive.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 {
        return None;
    }
    let rank_sum: f64 = ranks
        .iter()
        .zip(positive)
        .filter(|(_, &p)| p)
        .map(|(r, _)| r)
        .sum();
    Some((rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg))
}

/// Macro one-vs-rest AUC from class probabilities `probs[i][c]`.
pub fn auc_ovr(probs: &[Vec<f64>], labels: &[usize], n_classes: usize) -> Option<f64> {
    if n_classes == 2 {
        let s: Vec<f64> = probs.iter().map(|p| p[1]).collect();
        let pos: Vec<bool> = labels.iter().map(|&l| l == 1).collect();
        return auc_binary(&s, &pos);
    }
    let aucs: Vec<f64> = (0..n_classes)
        .filter_map(|c| {
            let s: Vec<f64> = probs.iter().map(|p| p[c]).collect();
            let pos: Vec<bool> = labels.iter().map(|&l| l == c).collect();
            auc_binary(&s, &pos)
        })
        .collect();
    if aucs.is_empty() {
        None
    } else {
        Some(aucs.iter().sum::<f64>() / aucs.len() as f64)
    }
}

/// Percentile bootstrap (95 %) of a statistic over resampled indices.
pub fn bootstrap95(
    n: usize,
    reps: usize,
    seed: u64,
    stat: impl Fn(&[usize]) -> Option<f64>,
) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut vals: Vec<f64> = (0..reps)
        .filter_map(|_| {
            let idx: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
            stat(&idx)
        })
        .collect();
    if vals.len() < reps / 2 {
        return None;
    }
    vals.sort_by(f64::total_cmp);
    let q = |p: f64| vals[((vals.len() - 1) as f64 * p).round() as usize];
    Some((q(0.025), q(0.975)))
}

/// Cluster (block) bootstrap 95 %: resamples whole clusters with replacement (`cluster[i]` is
/// row i's cluster, e.g. its question) and hands `stat` the rows of the drawn clusters. Prompts of
/// one question are not independent; resampling them one by one gives intervals that are too
/// narrow.
pub fn cluster_bootstrap95(
    cluster: &[usize],
    reps: usize,
    seed: u64,
    stat: impl Fn(&[usize]) -> Option<f64>,
) -> Option<(f64, f64)> {
    let mut ids: Vec<usize> = cluster.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() < 2 {
        return None;
    }
    let mut rows: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &c) in cluster.iter().enumerate() {
        rows.entry(c).or_default().push(i);
    }
    let groups: Vec<&Vec<usize>> = rows.values().collect();
    bootstrap95(groups.len(), reps, seed, |draw| {
        let idx: Vec<usize> = draw
            .iter()
            .flat_map(|&g| groups[g].iter().copied())
            .collect();
        stat(&idx)
    })
}

/// Holm's step-down adjustment (family-wise error) of `p`, in the input order.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut out = vec![0.0; m];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        out[i] = running;
    }
    out
}

/// Benjamini-Hochberg adjustment (false discovery rate) of `p`, in the input order.
pub fn benjamini_hochberg(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut out = vec![0.0; m];
    let mut running: f64 = 1.0;
    for (rank, &i) in order.iter().enumerate().rev() {
        running = running.min(p[i] * m as f64 / (rank + 1) as f64).min(1.0);
        out[i] = running;
    }
    out
}

/// The q-quantile of `v` (linear interpolation between order statistics, numpy's default);
/// None for an empty sample.
pub fn quantile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(s[lo] + (s[hi] - s[lo]) * (pos - lo as f64))
}

/// One-sided rank p-value of `observed` against a null sample: (1 + #{null >= observed}) /
/// (1 + n), never 0 (Phipson & Smyth 2010). For a reported maximum (best row, top head), `null`
/// must hold the maxima of the null runs, not single values.
pub fn rank_p_value(observed: f64, null: &[f64]) -> f64 {
    let ge = null.iter().filter(|&&v| v >= observed).count();
    (1 + ge) as f64 / (1 + null.len()) as f64
}

/// Mean and a normal-approximation 95 % interval of the mean (1.96 standard errors).
/// The 97.5 % quantile of Student's t with `df` degrees of freedom (two-sided 95 %): tabulated
/// for df <= 30, Cornish-Fisher expansion beyond (error < 1e-4 there).
pub fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    if df == 0 {
        return f64::NAN;
    }
    if df <= 30 {
        return TABLE[df - 1];
    }
    let z: f64 = 1.959_963_985;
    let v = df as f64;
    let g1 = (z.powi(3) + z) / 4.0;
    let g2 = (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / 96.0;
    let g3 = (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z) / 384.0;
    z + g1 / v + g2 / (v * v) + g3 / (v * v * v)
}

/// Mean and its 95 % interval with Student's t (n - 1 degrees of freedom): for the few values
/// of a small sample (random head sets, pairs) the normal 1.96 would be far too narrow.
pub fn mean_ci95(xs: &[f64]) -> (f64, f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let m = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (m, m, m);
    }
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    let h = t975(xs.len() - 1) * (var / n).sqrt();
    (m, m - h, m + h)
}

pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    let ma = a.iter().sum::<f64>() / n;
    let mb = b.iter().sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma).powi(2);
        sbb += (y - mb).powi(2);
    }
    sab / (saa * sbb).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_published_value() {
        // Newcombe (1998), example: 81/263 -> (0.2553, 0.3662).
        let (lo, hi) = wilson95(81, 263);
        assert!(
            (lo - 0.2553).abs() < 5e-4 && (hi - 0.3662).abs() < 5e-4,
            "{lo} {hi}"
        );
    }

    #[test]
    fn multiple_comparison_adjustments_match_hand_computed_values() {
        // Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 with a running max.
        let p = [0.01, 0.04, 0.03, 0.005];
        let h = holm(&p);
        for (a, b) in h.iter().zip([0.03, 0.06, 0.06, 0.02]) {
            assert!((a - b).abs() < 1e-12, "holm {h:?}");
        }
        // BH: p * 4 / rank with a running min from the top: 0.02, 0.02, 0.04, 0.04.
        let q = benjamini_hochberg(&p);
        for (a, b) in q.iter().zip([0.02, 0.04, 0.04, 0.02]) {
            assert!((a - b).abs() < 1e-12, "bh {q:?}");
        }
        assert_eq!(holm(&[0.6, 0.9]), vec![1.0, 1.0]);
    }

    #[test]
    fn rank_p_value_counts_the_observed_run() {
        let null: Vec<f64> = (1..20).map(f64::from).collect();
        assert!((rank_p_value(19.5, &null) - 0.05).abs() < 1e-12);
        assert!((rank_p_value(10.0, &null) - 11.0 / 20.0).abs() < 1e-12);
        assert_eq!(rank_p_value(0.0, &[]), 1.0);
    }

    #[test]
    fn cluster_bootstrap_is_as_wide_as_the_clusters_allow() {
        // 12 clusters of 25 identical rows: the information is 12 values, not 300.
        let mut rng = StdRng::seed_from_u64(3);
        let level: Vec<f64> = (0..12).map(|_| rng.random_range(-1.0..1.0)).collect();
        let cluster: Vec<usize> = (0..300).map(|i| i / 25).collect();
        let x: Vec<f64> = cluster.iter().map(|&c| level[c]).collect();
        let mean = |idx: &[usize]| Some(idx.iter().map(|&i| x[i]).sum::<f64>() / idx.len() as f64);
        let (lo, hi) = cluster_bootstrap95(&cluster, 2000, 1, mean).unwrap();
        let (nlo, nhi) = bootstrap95(300, 2000, 1, mean).unwrap();
        let m = level.iter().sum::<f64>() / 12.0;
        let se = (level.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 12.0 / 12.0).sqrt();
        let ratio = (hi - lo) / (2.0 * 1.96 * se);
        assert!(
            (0.8..1.2).contains(&ratio),
            "cluster width / expected {ratio}"
        );
        assert!(
            (hi - lo) > 3.0 * (nhi - nlo),
            "{lo}..{hi} vs rows {nlo}..{nhi}"
        );
        assert_eq!(cluster_bootstrap95(&[0, 0, 0], 100, 1, mean), None);
    }

    #[test]
    fn auc_counts_pairs_and_ties() {
        // 2 pos, 2 neg: pos scores {0.8, 0.4}, neg {0.5, 0.4}: pairs won 1 + 0.5 + 1 + 0 = 2.5 of 4.
        let a = auc_binary(&[0.8, 0.4, 0.5, 0.4], &[true, true, false, false]).unwrap();
        assert!((a - 0.625).abs() < 1e-12, "{a}");
        assert_eq!(auc_binary(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn t_quantiles_match_tables() {
        // Published two-sided 95 % critical values.
        for (df, want) in [
            (1, 12.706),
            (2, 4.303),
            (10, 2.228),
            (30, 2.042),
            (40, 2.021),
            (60, 2.000),
            (120, 1.980),
        ] {
            assert!(
                (t975(df) - want).abs() < 1.5e-3,
                "df {df}: {} vs {want}",
                t975(df)
            );
        }
        // Three values 1, 2, 3: sd 1, half-width t(2) / sqrt(3).
        let (m, lo, hi) = mean_ci95(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((hi - m - 4.303 / 3f64.sqrt()).abs() < 1e-9, "{lo} {hi}");
    }

    #[test]
    fn pearson_matches_hand_computation() {
        // Deviations (-1, 0, 1) and (-13/6, -1/6, 7/3): r = 4.5 / sqrt(2 * 61/6) = 0.997949...
        let want = 4.5 / (2.0f64 * 61.0 / 6.0).sqrt();
        let r = pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5]);
        assert!((r - want).abs() < 1e-12, "{r} vs {want}");
        assert!((r - 0.99795).abs() < 1e-5, "{r}");
        // Exactly linear: 1 and -1.
        assert!((pearson(&[1.0, 2.0, 3.0], &[3.0, 5.0, 7.0]) - 1.0).abs() < 1e-12);
        assert!((pearson(&[1.0, 2.0, 3.0], &[7.0, 5.0, 3.0]) + 1.0).abs() < 1e-12);
    }
}
