//! Claims: each interpretive sentence of the study is one of these, with the test behind it, its
//! effect, interval and p-value, adjusted across the run (Holm). A claim the test does not
//! support is reported as a negative result with the same numbers, never dropped.

use crate::stats::{cluster_bootstrap95, holm};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The family-wise error rate at which a claim counts as supported.
pub const ALPHA: f64 = 0.05;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claim {
    /// Stable id, e.g. `probe.beats_bag_of_tokens`.
    pub id: String,
    /// What would hold if the test supports it, with the numbers filled in.
    pub statement: String,
    /// The step (and file) the numbers come from.
    pub analysis: String,
    /// The test, in words (what is compared, on which split, how the p-value is made).
    pub test: String,
    /// What `effect` measures, with its unit.
    pub statistic: String,
    pub effect: f64,
    pub ci95: (f64, f64),
    pub p_value: f64,
    /// Holm-adjusted over every claim of the run.
    pub p_adjusted: f64,
    pub supported: bool,
    /// Clusters (questions) behind the test.
    pub n_clusters: usize,
    /// Further conditions the claim needs besides its test (e.g. "Δ_norm ≥ 0.9"), each with
    /// whether it held; a claim is supported only when all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A condition of a claim beyond its statistical test.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Condition {
    pub what: String,
    pub holds: bool,
}

/// A one-sided test that the mean of per-prompt differences is above 0, clustered by question.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClusteredTest {
    /// Mean difference over prompts.
    pub effect: f64,
    /// Bootstrap over clusters (questions), 95 %.
    pub ci95: (f64, f64),
    /// Sign-flip permutation of the cluster sums: (1 + #{T_null >= T}) / (1 + reps).
    pub p_value: f64,
    pub n: usize,
    pub n_clusters: usize,
}

/// Tests `mean(diff) > 0` for per-prompt differences `(cluster, diff)`: the interval by bootstrap
/// over clusters, the p-value by flipping the sign of whole clusters' sums (exchangeable under
/// the null of a symmetric, zero-mean cluster effect). None with fewer than two clusters.
pub fn clustered_test(diffs: &[(usize, f64)], reps: usize, seed: u64) -> Option<ClusteredTest> {
    let mut sums: BTreeMap<usize, f64> = BTreeMap::new();
    for &(c, d) in diffs {
        *sums.entry(c).or_default() += d;
    }
    if sums.len() < 2 {
        return None;
    }
    let n = diffs.len();
    let effect = diffs.iter().map(|d| d.1).sum::<f64>() / n as f64;
    let cluster: Vec<usize> = diffs.iter().map(|d| d.0).collect();
    let ci95 = cluster_bootstrap95(&cluster, reps, seed, |idx| {
        Some(idx.iter().map(|&i| diffs[i].1).sum::<f64>() / idx.len().max(1) as f64)
    })?;
    let s: Vec<f64> = sums.into_values().collect();
    let t: f64 = s.iter().sum();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5f1f);
    let ge = (0..reps)
        .filter(|_| {
            let null: f64 = s
                .iter()
                .map(|v| if rng.random_bool(0.5) { *v } else { -*v })
                .sum();
            null >= t - 1e-12
        })
        .count();
    Some(ClusteredTest {
        effect,
        ci95,
        p_value: (1 + ge) as f64 / (1 + reps) as f64,
        n,
        n_clusters: s.len(),
    })
}

/// Per-prompt differences `a - b` in correctness of two probes tested on the same prompts
/// (outcomes as in `probe::Metrics::outcomes`); prompts missing from either are left out.
pub fn paired_differences(
    a: &[(usize, usize, bool)],
    b: &[(usize, usize, bool)],
) -> Vec<(usize, f64)> {
    let b: BTreeMap<usize, bool> = b.iter().map(|&(i, _, ok)| (i, ok)).collect();
    a.iter()
        .filter_map(|&(i, c, ok)| b.get(&i).map(|&ok_b| (c, f64::from(ok) - f64::from(ok_b))))
        .collect()
}

/// Per-prompt differences `correct - chance`.
pub fn above_chance(a: &[(usize, usize, bool)], chance: f64) -> Vec<(usize, f64)> {
    a.iter()
        .map(|&(_, c, ok)| (c, f64::from(ok) - chance))
        .collect()
}

impl Claim {
    /// A claim from a clustered test (p_adjusted and supported are set by [`adjust`]).
    pub fn from_test(
        id: &str,
        statement: String,
        analysis: &str,
        test: &str,
        statistic: &str,
        t: &ClusteredTest,
    ) -> Claim {
        Claim {
            id: id.into(),
            statement,
            analysis: analysis.into(),
            test: test.into(),
            statistic: statistic.into(),
            effect: t.effect,
            ci95: t.ci95,
            p_value: t.p_value,
            p_adjusted: t.p_value,
            supported: false,
            n_clusters: t.n_clusters,
            conditions: vec![],
        }
    }
}

/// Holm-adjusts the p-values over all `claims` and marks a claim supported when its adjusted
/// p-value is below [`ALPHA`], its effect points the claimed way (> 0) and all its conditions
/// hold.
pub fn adjust(claims: &mut [Claim]) {
    let p: Vec<f64> = claims.iter().map(|c| c.p_value).collect();
    for (c, q) in claims.iter_mut().zip(holm(&p)) {
        c.p_adjusted = q;
        c.supported = q < ALPHA && c.effect > 0.0 && c.conditions.iter().all(|k| k.holds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n_clusters` questions of `per` prompts; each cluster's prompts share a random offset
    /// (strong within-question correlation), plus `effect`.
    fn clustered(
        n_clusters: usize,
        per: usize,
        effect: f64,
        rng: &mut StdRng,
    ) -> Vec<(usize, f64)> {
        let mut v = Vec::new();
        for c in 0..n_clusters {
            let offset: f64 = rng.random_range(-1.0..1.0);
            for _ in 0..per {
                v.push((c, offset + effect + 0.1 * rng.random_range(-1.0..1.0)));
            }
        }
        v
    }

    #[test]
    fn clustered_test_holds_its_level_under_a_clustered_null_and_finds_an_effect() {
        let mut rng = StdRng::seed_from_u64(1);
        // Null: 200 studies; a test that treated prompts as independent would reject most of
        // them (the question offsets dominate), the clustered one about 5 %.
        let rejected = (0..200)
            .filter(|&k| {
                let d = clustered(20, 12, 0.0, &mut rng);
                clustered_test(&d, 400, k).unwrap().p_value < 0.05
            })
            .count();
        assert!(
            (2..=20).contains(&rejected),
            "{rejected} of 200 null studies rejected"
        );
        let d = clustered(20, 12, 0.6, &mut rng);
        let t = clustered_test(&d, 400, 9).unwrap();
        assert!(t.p_value < 0.01 && t.ci95.0 > 0.0, "{t:?}");
        assert_eq!((t.n, t.n_clusters), (240, 20));
        assert!(clustered_test(&[(0, 1.0), (0, 2.0)], 100, 1).is_none());
    }

    #[test]
    fn paired_differences_match_prompts_and_adjust_marks_support() {
        let a = [(0, 0, true), (1, 0, true), (2, 1, false)];
        let b = [(1, 0, false), (2, 1, true), (7, 3, true)];
        assert_eq!(paired_differences(&a, &b), vec![(0, 1.0), (1, -1.0)]);
        assert_eq!(above_chance(&a[..1], 0.5), vec![(0, 0.5)]);
        let t = ClusteredTest {
            effect: 0.2,
            ci95: (0.1, 0.3),
            p_value: 0.01,
            n: 10,
            n_clusters: 5,
        };
        let mut claims = vec![
            Claim::from_test("a", "A".into(), "probe", "t", "s", &t),
            Claim::from_test(
                "b",
                "B".into(),
                "probe",
                "t",
                "s",
                &ClusteredTest { p_value: 0.03, ..t },
            ),
            Claim::from_test(
                "c",
                "C".into(),
                "probe",
                "t",
                "s",
                &ClusteredTest { effect: -0.2, ..t },
            ),
        ];
        adjust(&mut claims);
        // Holm over (0.01, 0.03, 0.01): 0.03, 0.03, 0.03; c points the wrong way.
        assert!(claims.iter().all(|c| (c.p_adjusted - 0.03).abs() < 1e-12));
        assert_eq!(
            claims.iter().map(|c| c.supported).collect::<Vec<_>>(),
            vec![true, true, false]
        );
    }
}
