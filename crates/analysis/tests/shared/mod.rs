//! Helpers shared by the analysis crate's known-answer tests.
#![allow(dead_code)]

use persona_lens_analysis::dataset::{self, GenOptions, PersonaDataset};
use persona_lens_analysis::harvest::Harvest;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Novice prompts of child-phd (`n_questions` per topic, the given paraphrases; empty = all),
/// relabelled at random into `a` / `b` (balanced, seeded): the text carries no label, so only a
/// planted feature can.
pub fn random_label_dataset(
    n_questions: usize,
    templates: Vec<usize>,
    seed: u64,
) -> PersonaDataset {
    let ds = dataset::generate(&GenOptions {
        persona_pairs: vec!["child-phd".into()],
        n_questions_per_pair: n_questions,
        templates,
        ..Default::default()
    })
    .unwrap()
    .with_classes(&["novice"]);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut items = ds.items;
    let n = items.len();
    let mut labels: Vec<bool> = (0..n).map(|i| i < n / 2).collect();
    for i in (1..n).rev() {
        labels.swap(i, rng.random_range(0..=i));
    }
    for (it, b) in items.iter_mut().zip(labels) {
        it.class = if b { "b".into() } else { "a".into() };
    }
    PersonaDataset {
        source: "planted-test".into(),
        items,
    }
}

/// A standard normal draw (Box-Muller), so the tests need no extra crate.
pub fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random_range(1e-12..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Mean L2 norm of the harvested vectors at `hook` (the scale a planted feature is sized by).
pub fn mean_norm(h: &Harvest, hook: &str) -> f32 {
    h.acts[hook]
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .sqrt()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}
