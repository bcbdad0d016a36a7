//! Known answers for the probe's template hold-out and control paths, on a synthetic harvest
//! whose features are planted here (no model): 8 phrasing templates x 24 prompts, two balanced
//! classes per template, 16 dims of unit Gaussian noise, and per hook:
//! - `genuine`: dim 0 carries the class (+-0.85): any split should reach about Phi(0.85) = 0.80;
//! - `template_specific`: template t writes the class on its own dim t + 1 only (+-0.85 * sqrt(8),
//!   since a probe over the 8 template dims adds the noise of all 8: the same ~0.80 under random
//!   folds), so a probe that never saw template t cannot read it: held-out templates are at chance;
//! - `noise`: no signal.
//!
//! The control (labels shuffled) must stay at chance on every hook. Bounds come from the plant:
//! with n = 192 a chance-level accuracy has sd ~0.036, so 0.62 is over 3 sd above 0.5.

mod shared;

use candle_core::{Device, Tensor};
use persona_lens_analysis::harvest::{Harvest, HarvestMeta, HarvestedItem, PositionRule};
use persona_lens_analysis::probe::{probe_layers, ProbeOptions};
use rand::{rngs::StdRng, SeedableRng};
use shared::normal;
use std::collections::BTreeMap;

const TEMPLATES: usize = 8;
const PER_TEMPLATE: usize = 24;
const D: usize = 16;
const SIGNAL: f32 = 0.85;
/// The template-specific plant: SIGNAL * sqrt(TEMPLATES), for the same accuracy as `genuine`.
const TEMPLATE_SIGNAL: f32 = SIGNAL * 2.828_427;

fn synthetic() -> Harvest {
    let mut rng = StdRng::seed_from_u64(11);
    let n = TEMPLATES * PER_TEMPLATE;
    let mut items = Vec::with_capacity(n);
    let mut acts: BTreeMap<&str, Vec<f32>> = BTreeMap::new();
    for t in 0..TEMPLATES {
        for i in 0..PER_TEMPLATE {
            let novice = i % 2 == 0;
            let sign = if novice { 1.0 } else { -1.0 };
            items.push(HarvestedItem {
                id: format!("t{t}-{i}"),
                class: if novice { "novice" } else { "expert" }.into(),
                persona: if novice { "child" } else { "phd" }.into(),
                topic: "physics".into(),
                template_id: format!("T{t}"),
                pair_id: "child-phd".into(),
                lexical_control: false,
                split: None,
                question_id: format!("q{}", i / 2),
                n_tokens: 10,
                positions: (9, 10),
            });
            for (hook, plant) in [
                ("genuine", Some((0, SIGNAL))),
                ("template_specific", Some((t + 1, TEMPLATE_SIGNAL))),
                ("noise", None),
            ] {
                let mut x: Vec<f32> = (0..D).map(|_| normal(&mut rng)).collect();
                if let Some((k, s)) = plant {
                    x[k] += sign * s;
                }
                acts.entry(hook).or_default().extend(x);
            }
        }
    }
    let hooks: Vec<String> = acts.keys().map(|k| k.to_string()).collect();
    Harvest {
        meta: HarvestMeta {
            model: "synthetic".into(),
            model_path: String::new(),
            dataset_source: "planted".into(),
            dataset_hash: String::new(),
            position_rule: PositionRule::Last,
            chat: false,
            hooks: hooks.clone(),
            d: hooks.iter().map(|h| (h.clone(), D)).collect(),
            items,
            tool: "test".into(),
            shared_prefix_tokens: 0,
        },
        acts: acts
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Tensor::from_vec(v, (n, D), &Device::Cpu).unwrap(),
                )
            })
            .collect(),
    }
}

#[test]
fn template_holdout_and_control_recover_the_planted_answers() {
    let h = synthetic();
    let classes = vec!["novice".to_string(), "expert".to_string()];
    let hooks: Vec<String> = vec!["genuine".into(), "template_specific".into(), "noise".into()];
    let opts = ProbeOptions {
        template_holdout: true,
        control: true,
        ..Default::default()
    };
    let r = probe_layers(&h, &hooks, &classes, false, &opts, &|| {}).unwrap();
    assert_eq!(r.n_templates, TEMPLATES);
    let get = |name: &str| r.layers.iter().find(|l| l.hook == name).unwrap();
    for l in &r.layers {
        let ho = l.template_holdout.as_ref().unwrap().accuracy;
        let ctrl = l.control.as_ref().unwrap().accuracy;
        println!(
            "{}: cv {:.3} held-out templates {ho:.3} control {ctrl:.3}",
            l.hook, l.cv.accuracy
        );
        assert!(ctrl < 0.62, "{}: control (shuffled labels) {ctrl}", l.hook);
    }
    let g = get("genuine");
    let ho = g.template_holdout.as_ref().unwrap().accuracy;
    assert!(
        (0.7..0.9).contains(&g.cv.accuracy),
        "genuine cv {}",
        g.cv.accuracy
    );
    assert!((0.7..0.9).contains(&ho), "genuine held-out {ho}");
    assert!(g.selectivity.unwrap() > 0.1);
    let t = get("template_specific");
    let ho = t.template_holdout.as_ref().unwrap().accuracy;
    assert!(
        (0.7..0.9).contains(&t.cv.accuracy),
        "template-specific cv {}",
        t.cv.accuracy
    );
    assert!(
        ho < 0.62,
        "template-specific feature must not transfer to unseen templates: {ho}"
    );
    let n = get("noise");
    assert!(n.cv.accuracy < 0.62 && n.template_holdout.as_ref().unwrap().accuracy < 0.62);
}

/// Each hold-out split leaves out exactly one template, and its train side is every other one.
#[test]
fn group_splits_leave_one_template_out() {
    let groups: Vec<String> = ["b", "a", "b", "c", "a"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let splits = persona_lens_analysis::probe::group_splits(&groups);
    assert_eq!(
        splits,
        vec![
            (vec![0, 2, 3], vec![1, 4]),
            (vec![1, 3, 4], vec![0, 2]),
            (vec![0, 1, 2, 4], vec![3]),
        ]
    );
}

/// The bag-of-tokens baseline on planted token lists: when one token names the class (as "5
/// years old" / "PhD" do in fixed persona strings) it is perfect on every split; when the
/// tokens carry no class information it is at chance.
#[test]
fn bag_of_tokens_baseline_reads_lexical_labels_only() {
    use persona_lens_analysis::probe::probe_layers_with_baseline;
    let h = synthetic();
    let classes = vec!["novice".to_string(), "expert".to_string()];
    let opts = ProbeOptions {
        template_holdout: true,
        control: false,
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(5);
    let filler = |rng: &mut StdRng| -> Vec<u32> {
        (0..6)
            .map(|_| (normal(rng).abs() * 20.0) as u32 + 100)
            .collect()
    };
    // Lexical: token 7 for novices, 8 for experts, plus random filler.
    let lexical: Vec<Vec<u32>> = h
        .meta
        .items
        .iter()
        .map(|it| {
            let mut v = filler(&mut rng);
            v.push(if it.class == "novice" { 7 } else { 8 });
            v
        })
        .collect();
    let r = probe_layers_with_baseline(
        &h,
        &["noise".to_string()],
        &classes,
        false,
        &opts,
        Some(&lexical),
        &|| {},
    )
    .unwrap();
    let b = r.bag_of_tokens.unwrap();
    println!(
        "lexical: cv {:.3} held-out {:.3}",
        b.cv.accuracy,
        b.template_holdout.as_ref().unwrap().accuracy
    );
    assert!(b.cv.accuracy > 0.97 && b.template_holdout.unwrap().accuracy > 0.97);
    // Uninformative: filler only.
    let blind: Vec<Vec<u32>> = h.meta.items.iter().map(|_| filler(&mut rng)).collect();
    let r = probe_layers_with_baseline(
        &h,
        &["noise".to_string()],
        &classes,
        false,
        &opts,
        Some(&blind),
        &|| {},
    )
    .unwrap();
    let b = r.bag_of_tokens.unwrap();
    println!(
        "blind: cv {:.3} held-out {:.3}",
        b.cv.accuracy,
        b.template_holdout.as_ref().unwrap().accuracy
    );
    assert!(b.cv.accuracy < 0.62 && b.template_holdout.unwrap().accuracy < 0.62);
    // Mismatched lengths are refused.
    assert!(probe_layers_with_baseline(
        &h,
        &["noise".into()],
        &classes,
        false,
        &opts,
        Some(&blind[1..]),
        &|| {}
    )
    .is_err());
}
