//! Known-answer tests of the study's methods on the real chat model: the answer is planted
//! through hooks, independently of the analysis under test, and each test fails when the method
//! is broken (a leaking split, an off-by-one row, a probe that reads tokens).

#[path = "../../engine/tests/common/mod.rs"]
mod common;
mod shared;

use candle_core::{Device, Tensor};
use common::model;
use persona_lens_analysis::dataset;
use persona_lens_analysis::direction;
use persona_lens_analysis::harvest::{harvest, harvest_with, HarvestSpec, PositionRule};
use persona_lens_analysis::probe::{probe_layers_with_baseline, ProbeOptions};
use persona_lens_analysis::resid_rows;
use persona_lens_engine::{Batch, HookName, HookPoint, Hooks, Op, Selector};
use rand::rngs::StdRng;
use rand::SeedableRng;
use shared::{mean_norm, normal, random_label_dataset};

/// A planted linear feature at realistic strength: class b gets +a, class a gets -a along a
/// random unit direction u at `blocks.L.hook_resid_pre`, plus per-prompt noise N(0, s) along u
/// with a / s = 1.04 (the best possible accuracy is Phi(1.04) = 0.85, not 1.0). Tested on
/// persona paraphrases the probe never saw: found from residual row L on, not before, at an
/// accuracy near the planted ceiling, by a direction within cosine 0.8 of u; the bag of tokens
/// stays at chance (the labels are not in the text).
#[test]
fn planted_feature_at_realistic_strength_is_found_on_held_out_paraphrases_from_its_row_on() {
    let m = model("smollm2-135m-instruct");
    let n_layers = m.config().n_layers;
    let d = m.config().d_model;
    let plant = 10;
    let ds = random_label_dataset(4, vec![], 3); // 8 topics x 4 questions x 12 paraphrases = 384 prompts
    let is_b: Vec<bool> = ds.items.iter().map(|i| i.class == "b").collect();
    let mut rng = StdRng::seed_from_u64(5);
    let mut u: Vec<f32> = (0..d).map(|_| normal(&mut rng)).collect();
    let un = u.iter().map(|x| x * x).sum::<f32>().sqrt();
    u.iter_mut().for_each(|x| *x /= un);
    // Rows up to two past the plant: what the test reads.
    let spec = HarvestSpec {
        hooks: resid_rows(n_layers)[..plant + 3].to_vec(),
        rule: PositionRule::Last,
        chat: true,
        batch_size: 32,
    };
    // Strength from the clean activations: a fifth of the mean residual norm at the row.
    let clean = harvest(
        &m,
        &ds,
        &HarvestSpec {
            hooks: vec![HookName::block(plant, HookPoint::ResidPre)],
            ..spec.clone()
        },
        &|_| {},
    )
    .unwrap();
    let a = 0.2 * mean_norm(&clean, &format!("blocks.{plant}.hook_resid_pre"));
    let s = a / 1.04;
    let shift: Vec<f32> = is_b
        .iter()
        .map(|&b| if b { a } else { -a } + s * normal(&mut rng))
        .collect();
    let setup = |rows: &[usize], _b: &Batch, hooks: &mut Hooks| {
        for (r, &i) in rows.iter().enumerate() {
            let v: Vec<f32> = u.iter().map(|x| x * shift[i]).collect();
            hooks.intervene(
                HookName::block(plant, HookPoint::ResidPre),
                Op::Add(Tensor::from_vec(v, d, &Device::Cpu)?),
                Selector::all().rows(vec![r]),
            );
        }
        Ok(())
    };
    let hv = harvest_with(&m, &ds, &spec, Some(&setup), &|_| {}).unwrap();
    let names: Vec<String> = spec.hooks.iter().map(|h| h.to_string()).collect();
    let token_ids: Vec<Vec<u32>> = ds
        .items
        .iter()
        .map(|it| dataset::encode_item(&m, it, true).unwrap().ids)
        .collect();
    let opts = ProbeOptions {
        control: false,
        generalization: false,
        bootstrap: 50,
        ..Default::default()
    };
    let classes = vec!["a".to_string(), "b".to_string()];
    let r = probe_layers_with_baseline(
        &hv,
        &names,
        &classes,
        false,
        &opts,
        Some(&token_ids),
        &|| {},
    )
    .unwrap();
    assert_eq!(r.n_templates, 12);
    let mut found = 0.0f64;
    for l in &r.layers {
        let row = l.resid_index.unwrap();
        let held_out = l.template_holdout.as_ref().unwrap().accuracy;
        eprintln!("row {row}: held-out-paraphrase accuracy {held_out:.3}");
        if row < plant {
            assert!(held_out < 0.6, "row {row} (before the plant): {held_out}");
        } else if row <= plant + 2 {
            // Each row of the window well above chance and below the ceiling Phi(1.04) = 0.85
            // (plus sampling slack); the best of them at the 0.75 the issue asks for.
            assert!(
                (0.65..0.92).contains(&held_out),
                "row {row} (the plant; Phi(1.04) = 0.85 is the ceiling): held-out-paraphrase accuracy {held_out}"
            );
            found = found.max(held_out);
        }
    }
    assert!(
        found >= 0.75,
        "best held-out accuracy at the plant rows: {found}"
    );
    let bag = r.bag_of_tokens.as_ref().unwrap();
    let bag_acc = bag.template_holdout.as_ref().unwrap().accuracy;
    assert!(bag_acc < 0.6, "bag of tokens on random labels: {bag_acc}");
    let set = direction::compute(&hv, &names, "a", "b", 1e-2).unwrap();
    let (_, dm) = set
        .at_row(plant, direction::DirectionKind::DiffOfMeans)
        .unwrap();
    let cos = common::cosine(&dm, &u);
    eprintln!("bag of tokens {bag_acc:.3}; cosine {cos:.3}");
    assert!(
        cos >= 0.8,
        "diff of means vs the planted direction: cosine {cos}"
    );
}
