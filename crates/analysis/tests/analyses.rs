//! Analyses on the real models: the logit lens against the golden set, a planted feature found by
//! the probes and the persona direction, harvest storage and reuse.

#[path = "../../engine/tests/common/mod.rs"]
mod common;
mod shared;

use candle_core::{Device, Tensor};
use common::{golden_dir, model, read_json};
use persona_lens_analysis::dataset::{self, GenOptions};
use persona_lens_analysis::direction;
use persona_lens_analysis::harvest::{harvest, harvest_with, Harvest, HarvestSpec, PositionRule};
use persona_lens_analysis::lens;
use persona_lens_analysis::probe::{probe_layers, ProbeOptions};
use persona_lens_analysis::resid_rows;
use persona_lens_engine::{Batch, HookName, HookPoint, Hooks, LogitsAt, Op, Selector};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shared::{mean_norm, random_label_dataset};

fn lens_matches_golden(name: &str) {
    let m = model(name);
    let g = read_json(&golden_dir(name).join("logit_lens.json"));
    for p in g["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = p["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let text = p["text"].as_str().unwrap();
        assert_eq!(m.encode_prompt(text, false).unwrap(), ids, "{text}");
        let r = lens::logit_lens(&m, &ids, None, 5).unwrap();
        let layers = p["layers"].as_array().unwrap();
        assert_eq!(r.layers.len(), layers.len());
        for (ours, want) in r.layers.iter().zip(layers) {
            let want: Vec<(u32, f64)> = want["top5"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| (x[0].as_u64().unwrap() as u32, x[1].as_f64().unwrap()))
                .collect();
            let ids_ours: Vec<u32> = ours.top.iter().map(|t| t.0).collect();
            let ids_want: Vec<u32> = want.iter().map(|t| t.0).collect();
            assert_eq!(
                ids_ours, ids_want,
                "{name} '{text}' row {}",
                ours.resid_index
            );
            for ((_, a), (_, b)) in ours.top.iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() < 1e-3,
                    "{name} '{text}' row {}: {a} vs {b}",
                    ours.resid_index
                );
            }
        }
        // The last row is the model's own last-position logits.
        let batch = Batch::left_padded(std::slice::from_ref(&ids), m.pad_id(), m.device()).unwrap();
        let real = m
            .forward(&batch, None, &mut Hooks::new(), LogitsAt::Last)
            .unwrap()
            .unwrap()
            .get(0)
            .unwrap();
        let resid = lens::resid_at(&m, &ids, ids.len() - 1).unwrap();
        let last = lens::lens_logits(&m, &resid).unwrap().pop().unwrap();
        let real: Vec<f32> = real.to_vec1().unwrap();
        let diff = real
            .iter()
            .zip(&last)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(diff < 1e-4, "{name}: last lens row vs real logits {diff}");
    }
}

#[test]
fn gemma_logit_lens_matches_golden() {
    lens_matches_golden("gemma-3-270m");
}

#[test]
fn smollm2_logit_lens_matches_golden() {
    lens_matches_golden("smollm2-135m-instruct");
}

#[test]
fn probe_and_direction_find_a_planted_feature_from_its_layer_on() {
    let m = model("gemma-3-270m");
    let n_layers = m.config().n_layers;
    let plant_layer = 6; // added at blocks.6.hook_resid_pre = residual row 6
    let ds = random_label_dataset(6, vec![0, 1, 2], 7); // 8 topics x 6 questions x 3 templates = 144 prompts
    let is_b: Vec<bool> = ds.items.iter().map(|i| i.class == "b").collect();
    let d = m.config().d_model;
    let mut rng = StdRng::seed_from_u64(11);
    let mut u: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let un = u.iter().map(|x| x * x).sum::<f32>().sqrt();
    u.iter_mut().for_each(|x| *x /= un);
    let spec = HarvestSpec {
        hooks: resid_rows(n_layers),
        rule: PositionRule::Last,
        chat: false,
        batch_size: 16,
        share_prefix: true,
    };
    // Scale: a fraction of the typical residual norm at the planting row.
    let clean = harvest(&m, &ds, &spec, &|_| {}).unwrap();
    let c = 0.5 * mean_norm(&clean, &format!("blocks.{plant_layer}.hook_resid_pre"));
    let planted =
        Tensor::from_vec(u.iter().map(|x| x * c).collect::<Vec<_>>(), d, &Device::Cpu).unwrap();
    let setup = |rows: &[usize], _b: &Batch, hooks: &mut Hooks| {
        let sel: Vec<usize> = (0..rows.len()).filter(|&r| is_b[rows[r]]).collect();
        if !sel.is_empty() {
            hooks.intervene(
                HookName::block(plant_layer, HookPoint::ResidPre),
                Op::Add(planted.clone()),
                Selector::all().rows(sel),
            );
        }
        Ok(())
    };
    let hv = harvest_with(&m, &ds, &spec, Some(&setup), &|_| {}).unwrap();
    let names: Vec<String> = spec.hooks.iter().map(|h| h.to_string()).collect();
    let opts = ProbeOptions {
        template_holdout: false,
        control: false,
        bootstrap: 20,
        ..Default::default()
    };
    let classes = vec!["a".to_string(), "b".to_string()];
    let r = probe_layers(&hv, &names, &classes, false, &opts, &|| {}).unwrap();
    for l in &r.layers {
        let row = l.resid_index.unwrap();
        if row < plant_layer {
            assert!(
                l.cv.accuracy < 0.72,
                "row {row} (before the plant) should be near chance: {}",
                l.cv.accuracy
            );
        } else {
            assert!(
                l.cv.accuracy >= 0.95,
                "row {row} (from the plant on) should find it: {}",
                l.cv.accuracy
            );
        }
    }
    let set = direction::compute(&hv, &names, "a", "b", 1e-2).unwrap();
    let (_, dm) = set
        .at_row(plant_layer, direction::DirectionKind::DiffOfMeans)
        .unwrap();
    let cos = common::cosine(&dm, &u);
    assert!(
        cos >= 0.9,
        "diff-of-means vs planted direction: cosine {cos}"
    );
    // Expert-side sign convention: class b (the 'expert' argument) projects higher.
    let proj: f64 = dm.iter().zip(&u).map(|(a, b)| (*a * *b) as f64).sum();
    assert!(proj > 0.0);
}

#[test]
fn harvest_positions_storage_and_reuse() {
    let m = model("smollm2-135m-instruct");
    let ds = dataset::generate(&GenOptions {
        persona_pairs: vec!["child-phd".into()],
        topics: vec!["physics".into()],
        n_questions_per_pair: 2,
        templates: vec![0, 4],
        ..Default::default()
    })
    .unwrap();
    // Position rules land on the right tokens of the chat-templated prompt.
    let it = &ds.items[0];
    let enc = dataset::encode_item(&m, it, true).unwrap();
    let (ps, pe) = enc.persona_tokens.unwrap();
    let persona_text = m.tokenizer.decode(&enc.ids[ps..pe], false).unwrap();
    assert_eq!(persona_text.trim(), "I'm 5 years old", "{:?}", it.text);
    let q_tok = m
        .tokenizer
        .decode(
            &enc.ids[enc.question_last_token..=enc.question_last_token],
            false,
        )
        .unwrap();
    assert!(q_tok.ends_with('?'), "{q_tok:?}");
    assert_eq!(enc.last, enc.ids.len() - 1);
    let hooks = vec![
        HookName::block(3, HookPoint::ResidPost),
        HookName::block(2, HookPoint::AttnZ),
    ];
    let spec = HarvestSpec {
        hooks: hooks.clone(),
        rule: PositionRule::PersonaMean,
        chat: true,
        batch_size: 3,
        share_prefix: true,
    };
    let dir = std::env::temp_dir().join(format!("pl-harvest-{}", std::process::id()));
    let (h, reused) = Harvest::load_or_run(&dir, &m, &ds, &spec, &|_| {}).unwrap();
    assert!(!reused);
    assert_eq!(
        h.acts["blocks.2.attn.hook_z"].dims(),
        &[ds.items.len(), m.config().n_heads * m.config().head_dim]
    );
    // Batched harvest = one prompt alone, persona-mean computed by hand.
    let one = Batch::left_padded(std::slice::from_ref(&enc.ids), m.pad_id(), m.device()).unwrap();
    let mut hk = Hooks::new();
    hk.capture(hooks[0]);
    m.forward(&one, None, &mut hk, LogitsAt::None).unwrap();
    let want = hk
        .cache
        .get(&hooks[0])
        .unwrap()
        .get(0)
        .unwrap()
        .narrow(0, ps, pe - ps)
        .unwrap()
        .mean(0)
        .unwrap();
    let got = h.acts["blocks.3.hook_resid_post"].get(0).unwrap();
    let rel = common::rel_l2(&got.to_vec1().unwrap(), &want.to_vec1().unwrap());
    assert!(rel < 1e-5, "batched harvest vs single: {rel}");
    let (h2, reused) = Harvest::load_or_run(&dir, &m, &ds, &spec, &|_| {}).unwrap();
    assert!(
        reused,
        "same model, dataset and rule must reuse the stored activations"
    );
    assert_eq!(h2.meta.items, h.meta.items);
    assert_eq!(
        common::max_abs_diff(
            &h2.acts["blocks.3.hook_resid_post"],
            &h.acts["blocks.3.hook_resid_post"]
        ),
        0.0
    );
    let other = HarvestSpec {
        rule: PositionRule::Last,
        ..spec
    };
    let (_, reused) = Harvest::load_or_run(&dir, &m, &ds, &other, &|_| {}).unwrap();
    assert!(!reused, "a different position rule must not reuse");
    let _ = std::fs::remove_dir_all(dir);
}

/// The chat template's system turn runs once for all rows: the harvested vectors agree with
/// every row run whole, for the last token and for a span mean, at the tolerance of the
/// batched-vs-single engine test.
#[test]
fn shared_prefix_harvest_equals_whole_rows() {
    let m = model("smollm2-135m-instruct");
    let ds = dataset::generate(&GenOptions {
        persona_pairs: vec!["child-phd".into()],
        topics: vec!["physics".into(), "biology".into()],
        n_questions_per_pair: 2,
        templates: vec![0, 3, 5],
        ..Default::default()
    })
    .unwrap();
    let n = m.config().n_layers;
    for rule in [PositionRule::Last, PositionRule::PersonaMean] {
        let spec = |share_prefix| HarvestSpec {
            hooks: vec![
                HookName::block(0, HookPoint::ResidPost),
                HookName::block(n / 2, HookPoint::ResidPost),
                HookName::block(n - 1, HookPoint::ResidPost),
            ],
            rule,
            chat: true,
            batch_size: 5,
            share_prefix,
        };
        let shared = harvest(&m, &ds, &spec(true), &|_| {}).unwrap();
        let whole = harvest(&m, &ds, &spec(false), &|_| {}).unwrap();
        assert!(
            shared.meta.shared_prefix_tokens >= 8,
            "the chat template's system turn is shared: {} tokens",
            shared.meta.shared_prefix_tokens
        );
        assert_eq!(whole.meta.shared_prefix_tokens, 0);
        let mut worst = 0f64;
        for (hook, a) in &shared.acts {
            let b = &whole.acts[hook];
            for i in 0..ds.items.len() {
                let e = common::rel_l2(
                    &a.get(i).unwrap().to_vec1().unwrap(),
                    &b.get(i).unwrap().to_vec1().unwrap(),
                );
                worst = worst.max(e);
                assert!(
                    e < 1e-5,
                    "{rule:?} {hook} prompt {i}: relative error {e:.2e}"
                );
            }
        }
        eprintln!(
            "{rule:?}: {} shared tokens, worst relative error {worst:.2e}",
            shared.meta.shared_prefix_tokens
        );
    }
}

#[test]
fn lens_reads_stored_activations_like_a_forward() {
    // The study's lens reuses the probe's harvest: a superset of the lens prompts (two topics),
    // batched with left padding. Reading from it must give the forward-per-prompt result.
    let m = model("gemma-3-270m");
    let gen = |topics: &[&str]| {
        dataset::generate(&GenOptions {
            persona_pairs: vec!["child-phd".into()],
            topics: topics.iter().map(|s| s.to_string()).collect(),
            n_questions_per_pair: 2,
            templates: vec![0, 3],
            ..Default::default()
        })
        .unwrap()
    };
    let stored = harvest(
        &m,
        &gen(&["physics", "biology"]),
        &HarvestSpec {
            hooks: resid_rows(m.config().n_layers),
            rule: PositionRule::Last,
            chat: false,
            batch_size: 5,
            share_prefix: true,
        },
        &|_| {},
    )
    .unwrap();
    let ds = gen(&["physics"]);
    let words = |w: &[&str]| {
        lens::resolve_words(
            &m,
            &w.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            false,
        )
        .unwrap()
        .0
    };
    let (ex, si) = (
        words(lens::DEFAULT_EXPERT_WORDS),
        words(lens::DEFAULT_SIMPLE_WORDS),
    );
    let run = |cache| {
        lens::dataset_lens_cached(
            &m,
            &ds,
            false,
            PositionRule::Last,
            &ex,
            &si,
            vec![],
            cache,
            &|_| {},
        )
        .unwrap()
    };
    let fresh = run(None);
    let cached = run(Some(&stored));
    assert_eq!(fresh.prompts_from_cache, 0);
    assert_eq!(cached.prompts_from_cache, ds.items.len());
    let mut worst = 0f64;
    for (a, b) in fresh.personas.iter().zip(&cached.personas) {
        assert_eq!(a.persona, b.persona);
        for (x, y) in a.logit_diff_mean.iter().zip(&b.logit_diff_mean) {
            worst = worst.max((x - y).abs());
        }
    }
    println!("lens from stored activations vs forwards: max |diff| {worst:.2e} logits");
    assert!(worst < 1e-3, "{worst}");
    // Another position rule cannot be served from this harvest: every prompt runs a forward.
    let q = lens::dataset_lens_cached(
        &m,
        &ds,
        false,
        PositionRule::QuestionLastToken,
        &ex,
        &si,
        vec![],
        Some(&stored),
        &|_| {},
    )
    .unwrap();
    assert_eq!(q.prompts_from_cache, 0);
    // Each prompt's readout, computed alone (its forward, its rows through the unembedding),
    // is the one the lens reports for it: prompts share unembedding products in chunks of 16.
    let two = dataset::generate(&GenOptions {
        persona_pairs: vec!["child-phd".into()],
        topics: vec!["physics".into(), "biology".into()],
        n_questions_per_pair: 3,
        templates: vec![0, 3],
        ..Default::default()
    })
    .unwrap();
    assert!(
        two.items.len() > 16 && !two.items.len().is_multiple_of(16),
        "{} prompts: want whole chunks and a partial one",
        two.items.len()
    );
    let lensed = lens::dataset_lens_cached(
        &m,
        &two,
        false,
        PositionRule::Last,
        &ex,
        &si,
        vec![],
        None,
        &|_| {},
    )
    .unwrap();
    let mut worst = 0f64;
    for (it, (id, _, rows)) in two.items.iter().zip(&lensed.prompts) {
        assert_eq!(&it.id, id);
        let ids = m.encode_prompt(&it.text, false).unwrap();
        let alone =
            lens::lens_logits(&m, &lens::resid_at(&m, &ids, ids.len() - 1).unwrap()).unwrap();
        let mean = |ws: &[lens::TrackedWord], row: &[f32]| {
            ws.iter()
                .map(|w| row[w.token_id as usize] as f64)
                .sum::<f64>()
                / ws.len() as f64
        };
        assert_eq!(alone.len(), rows.len());
        for (row, got) in alone.iter().zip(rows) {
            worst = worst.max((mean(&ex, row) - mean(&si, row) - got).abs());
        }
    }
    println!("lens readout per prompt vs alone: max |diff| {worst:.2e} logits");
    assert!(worst < 1e-3, "{worst}");
}
