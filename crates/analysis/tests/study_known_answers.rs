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
        share_prefix: true,
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

/// Per-row state of the planted mover head: (persona sign, prompt length) of each batch row,
/// set when the embeddings of a whole prompt go by (a KV-cached step keeps its rows').
type RowState = std::sync::Arc<std::sync::Mutex<Vec<(f32, usize)>>>;

/// An exact fingerprint of a prompt from its token embeddings `[t, d]` (real positions only).
fn fingerprint(x: &[Vec<f32>]) -> u64 {
    let s: f64 = x
        .iter()
        .map(|r| r[0] as f64 + 0.5 * r[1] as f64 + 0.25 * r[2] as f64)
        .sum();
    s.to_bits()
}

/// A planted mover head: through standing hooks (`Model::add_hook`), head L20H5's output at the
/// last prompt position (and every generated one) carries +c v on novice prompts and -c v on
/// expert prompts, with v the direction in the head's z space that raises the metric most (a
/// finite-difference gradient) and c sized for a 1.5-logit shift. The prompt's persona is found
/// from its token embeddings (a fingerprint table), so every forward the analyses make on their
/// own sees the plant. The blind ranking on the selection split must put the planted head first
/// (pooled score), and zero-ablating it on the evaluation split must move the persona gap more
/// than every one of 20 random heads (rank p = 1/21 < 0.05).
#[test]
fn planted_mover_head_is_ranked_first_on_one_split_and_its_ablation_beats_random_heads() {
    use persona_lens_analysis::dataset::{GenOptions, Split};
    use persona_lens_analysis::heads::{
        dataset_pairs, metric_with, random_head_sets, rank_heads, AblationMode, AblationSetup,
        Head, ZBank,
    };
    use persona_lens_analysis::patching::Metric;
    use persona_lens_analysis::stats::rank_p_value;
    use persona_lens_engine::hooks::HookFn;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    // A private copy: standing hooks on the shared copy would reach tests running beside this one.
    let m = common::private_model("smollm2-135m-instruct");
    let (n_heads, dh) = (m.config().n_heads, m.config().head_dim);
    let planted = Head { layer: 20, head: 5 };
    let mut ds = dataset::generate(&GenOptions {
        persona_pairs: vec!["child-phd".into()],
        n_questions_per_pair: 2,
        ..Default::default()
    })
    .unwrap();
    ds.assign_splits(0);
    let spread = |v: Vec<_>, k: usize| -> Vec<_> {
        let step = (v.len() / k).max(1);
        v.into_iter().step_by(step).take(k).collect::<Vec<_>>()
    };
    let select = spread(dataset_pairs(&ds.in_split(Split::Select)), 4);
    let evaluate = spread(dataset_pairs(&ds.in_split(Split::Evaluate)), 6);
    assert_eq!((select.len(), evaluate.len()), (4, 6));
    let metric = Metric::logit_diff_words(&m, "simple", "technical").unwrap();

    // The fingerprint table: every prompt of both splits, with its persona's sign.
    let embed = HookName::global(HookPoint::Embed);
    let embeddings = |ids: &[u32]| -> Vec<Vec<f32>> {
        let b = Batch::left_padded(&[ids.to_vec()], m.pad_id(), m.device()).unwrap();
        let mut h = Hooks::new();
        h.capture(embed);
        h.stop_after_block = Some(0);
        m.forward(&b, None, &mut h, persona_lens_engine::LogitsAt::None)
            .unwrap();
        h.cache
            .get(&embed)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let mut sign: HashMap<u64, f32> = HashMap::new();
    for (n, e) in select.iter().chain(&evaluate) {
        for (it, s) in [(n, 1f32), (e, -1f32)] {
            let ids = m.encode_prompt(&it.text, true).unwrap();
            sign.insert(fingerprint(&embeddings(&ids)), s);
        }
    }

    // v: the metric's finite-difference gradient in head L20H5's z at the last position.
    let probe_ids = m.encode_prompt(&select[0].0.text, true).unwrap();
    let last = probe_ids.len() - 1;
    let z_hook = HookName::block(planted.layer, HookPoint::AttnZ);
    let base = metric_with(&m, &probe_ids, &metric, &mut Hooks::new()).unwrap();
    // One batch: row k adds the k-th unit vector.
    let batch = Batch::left_padded(&vec![probe_ids.clone(); dh], m.pad_id(), m.device()).unwrap();
    let mut h = Hooks::new();
    for k in 0..dh {
        let mut e = vec![0f32; dh];
        e[k] = 1.0;
        h.intervene(
            z_hook,
            Op::Add(Tensor::from_vec(e, dh, &Device::Cpu).unwrap()),
            Selector::all()
                .rows(vec![k])
                .positions(vec![last])
                .heads(vec![planted.head]),
        );
    }
    let logits: Vec<Vec<f32>> = m
        .forward(&batch, None, &mut h, persona_lens_engine::LogitsAt::Last)
        .unwrap()
        .unwrap()
        .to_vec2()
        .unwrap();
    let Metric::LogitDiff { a, b } = metric else {
        unreachable!()
    };
    let grad: Vec<f32> = logits
        .iter()
        .map(|l| l[a as usize] - l[b as usize] - base)
        .collect();
    let gnorm = grad.iter().map(|g| g * g).sum::<f32>().sqrt();
    let c = 1.5 / gnorm;
    let v: Vec<f32> = grad.iter().map(|g| g / gnorm * c).collect();

    let state: RowState = Arc::new(Mutex::new(vec![]));
    let st = state.clone();
    let read_rows: HookFn = Arc::new(move |x: &Tensor, ctx| {
        if ctx.start == 0 {
            let x3: Vec<Vec<Vec<f32>>> = x.to_vec3()?;
            let rows = x3
                .iter()
                .zip(&ctx.pad)
                .map(|(r, &p)| {
                    let s = sign.get(&fingerprint(&r[p..])).copied().unwrap_or(0.0);
                    (s, r.len() - p)
                })
                .collect();
            *st.lock().unwrap() = rows;
        }
        Ok(x.clone())
    });
    let st = state.clone();
    let plant: HookFn = Arc::new(move |z: &Tensor, ctx| {
        let (b, t, h, d) = z.dims4()?;
        let rows = st.lock().unwrap().clone();
        let mut add = vec![0f32; b * t * h * d];
        for r in 0..b {
            // Batched patch variants of one prompt share its state.
            let Some(&(s, len)) = rows.get(r.min(rows.len().saturating_sub(1))) else {
                continue;
            };
            for i in 0..t {
                if ctx.position(r, i).is_some_and(|p| p + 1 >= len) {
                    let o = ((r * t + i) * h + planted.head) * d;
                    for k in 0..d {
                        add[o + k] = s * v[k];
                    }
                }
            }
        }
        z + Tensor::from_vec(add, (b, t, h, d), z.device())?
    });
    m.add_hook(embed, Op::Func(read_rows), Selector::all());
    m.add_hook(z_hook, Op::Func(plant), Selector::all());

    // Blind ranking on the selection split.
    let ranking = rank_heads(
        &m,
        &select,
        true,
        Some(("simple", "technical")),
        0.25,
        &|_| {},
    )
    .unwrap();
    let top: Vec<String> = ranking.heads[..3]
        .iter()
        .map(|h| format!("{} {:.3}", h.head, h.pooled))
        .collect();
    eprintln!(
        "top heads (pooled score) on {} selection pairs: {top:?}",
        ranking.n_pairs
    );
    let chosen = ranking.heads[0].head;
    assert_eq!(chosen, planted, "ranking: {top:?}");

    // Ablation on the evaluation split against 20 random heads.
    let ids = AblationSetup::prompt_ids(&m, &evaluate, true).unwrap();
    let bank = ZBank::collect(&m, &ids, &[]).unwrap();
    let metrics = vec![metric.clone(); evaluate.len()];
    let setup = AblationSetup {
        model: &m,
        pairs: &evaluate,
        metrics: &metrics,
        chat: true,
        ids: &ids,
        bank: &bank,
        probe_rows: vec![],
        n_generate: 0,
        gen_tokens: 0,
    };
    let gap = |heads: &[Head]| setup.gap_mean(heads, AblationMode::Zero).unwrap();
    let intact = gap(&[]);
    let change = (gap(&[chosen]) - intact).abs();
    let random: Vec<f64> = random_head_sets(&m, 1, 20, 7, &[chosen])
        .iter()
        .map(|set| (gap(set) - intact).abs())
        .collect();
    let p = rank_p_value(change, &random);
    // The same gaps in one pass over the prompts, each set's forward starting at its first
    // ablated block from the clean forward's residual: equal to the whole forwards' (the
    // planted head is a standing hook, so the skipped blocks carry an intervention too).
    let mut sets: Vec<Vec<Head>> = vec![vec![], vec![chosen]];
    sets.extend(random_head_sets(&m, 2, 6, 11, &[chosen]));
    assert!(sets.iter().any(|s| s.iter().all(|h| h.layer > 0)));
    let refs: Vec<(&[Head], AblationMode)> =
        sets.iter().map(|s| (&s[..], AblationMode::Zero)).collect();
    let at_once = setup.gap_means(&refs, &|_, _| {}).unwrap();
    for (set, g) in sets.iter().zip(&at_once) {
        let whole = gap(set);
        assert!(
            (g - whole).abs() < 1e-9,
            "{set:?}: {g} from the first ablated block vs {whole} whole"
        );
    }
    m.reset_hooks();
    let max_random = random.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "persona gap {intact:.3} logits over {} evaluation pairs; |change| ablating {chosen}: {change:.3}; random heads up to {max_random:.3}; rank p {p:.4}",
        evaluate.len()
    );
    assert!(n_heads > planted.head);
    assert!(change > max_random, "{change} vs random {random:?}");
    assert!(p < 0.05, "p = {p}");
}

/// The ablation baseline's many head sets run the chat template's system turn once per set
/// (zero and mean ablations treat every row and position alike): their persona gaps agree with
/// whole forwards of every prompt within float rounding (logits of size ~20 at the engine's
/// batched-vs-single tolerance of 1e-5 relative: 2e-4 logits). Resample sets run whole rows and
/// agree too; sets that start at block 0 and later blocks are both covered.
#[test]
fn ablation_sets_sharing_the_prompt_prefix_match_whole_forwards() {
    use persona_lens_analysis::heads::{
        random_head_sets, AblationMode, AblationSetup, Head, ZBank,
    };

    let m = model("smollm2-135m-instruct");
    let (pairs, metric, ids) = ablation_pairs(&m);
    assert!(persona_lens_engine::common_prefix_len(&ids) >= 8);
    let mut sets: Vec<Vec<Head>> = vec![vec![], vec![Head { layer: 0, head: 1 }]];
    sets.extend(random_head_sets(&m, 3, 4, 5, &[]));
    let layers: Vec<usize> = sets.iter().flatten().map(|h| h.layer).collect();
    let bank = ZBank::collect(&m, &ids, &layers).unwrap();
    let metrics = vec![metric; pairs.len()];
    let setup = AblationSetup {
        model: &m,
        pairs: &pairs,
        metrics: &metrics,
        chat: true,
        ids: &ids,
        bank: &bank,
        probe_rows: vec![],
        n_generate: 0,
        gen_tokens: 0,
    };
    let mut worst = 0f64;
    for mode in [
        AblationMode::Zero,
        AblationMode::Mean,
        AblationMode::Resample,
    ] {
        let refs: Vec<(&[Head], AblationMode)> = sets.iter().map(|s| (&s[..], mode)).collect();
        let at_once = setup.gap_means(&refs, &|_, _| {}).unwrap();
        for (set, g) in sets.iter().zip(&at_once) {
            let whole = setup.gap_mean(set, mode).unwrap();
            worst = worst.max((g - whole).abs());
            assert!(
                (g - whole).abs() < 2e-4,
                "{mode:?} {set:?}: {g} sharing the prefix vs {whole} whole"
            );
        }
    }
    eprintln!("ablation gaps sharing the prefix vs whole forwards: worst {worst:.2e} logits");
}

/// The ablation report's greedy answers, every ablation's rows in one generation (each row
/// ablating its own heads its own way: zero, mean, resample from its donor), equal each
/// ablation's answers generated alone with the whole-batch ablation hooks (`ablation_hooks`),
/// token for token up to a near-tie; and each run's gap, read from the forwards that harvest its
/// probes' rows, equals the gap of its own forwards.
#[test]
fn ablation_answers_in_one_generation_match_each_ablation_alone() {
    use persona_lens_analysis::heads::{
        ablation_hooks, random_head_sets, AblationMode, AblationSetup, Head, ZBank,
    };

    let m = model("smollm2-135m-instruct");
    let (pairs, metric, ids) = ablation_pairs(&m);
    // Heads that change the answers: the last layer's, four middle layers' (whose donors
    // matter), and random ones.
    let late: Vec<Head> = (0..9).map(|head| Head { layer: 29, head }).collect();
    let middle: Vec<Head> = (12..16)
        .flat_map(|layer| (0..9).map(move |head| Head { layer, head }))
        .collect();
    let mut sets: Vec<Vec<Head>> = vec![late, middle];
    sets.extend(random_head_sets(&m, 2, 6, 11, &[]));
    let layers: Vec<usize> = sets.iter().flatten().map(|h| h.layer).collect();
    let bank = ZBank::collect(&m, &ids, &layers).unwrap();
    let metrics = vec![metric; pairs.len()];
    let (n_generate, gen_tokens) = (2, 12);
    let setup = AblationSetup {
        model: &m,
        pairs: &pairs,
        metrics: &metrics,
        chat: true,
        ids: &ids,
        bank: &bank,
        probe_rows: vec![15, 30],
        n_generate,
        gen_tokens,
    };
    let runs: Vec<(&str, &[Head], AblationMode)> = vec![
        ("none", &[], AblationMode::Zero),
        ("late zero", &sets[0], AblationMode::Zero),
        ("middle resample", &sets[1], AblationMode::Resample),
        ("random mean", &sets[2], AblationMode::Mean),
        ("random resample", &sets[3], AblationMode::Resample),
    ];
    let effects = setup.run_many(&runs).unwrap();
    assert_eq!(effects.len(), runs.len());
    // Each run's gap comes from the forwards that also harvest its probes' rows: it must equal
    // the gap of the ablation's own forwards.
    for ((label, heads, mode), e) in runs.iter().zip(&effects) {
        let alone = setup.gap_mean(heads, *mode).unwrap();
        assert!(
            (e.gap_mean - alone).abs() < 2e-4,
            "{label}: gap {} with the probes' forwards vs {alone} alone",
            e.gap_mean
        );
        assert_eq!(e.probe_accuracy.len(), 2, "{label}");
    }
    let rows = 2 * n_generate;
    let donors: Vec<usize> = (0..rows).map(|i| setup.donor(i)).collect();
    let opts = persona_lens_engine::GenerateOptions {
        max_new_tokens: gen_tokens,
        stop_tokens: m.tokenizer.eos_ids.clone(),
        ..Default::default()
    };
    let mut texts = vec![];
    for ((label, heads, mode), e) in runs.iter().zip(&effects) {
        let mut hooks = ablation_hooks(heads, *mode, Some(&bank), &donors).unwrap();
        let alone = persona_lens_engine::generate(&m, &ids[..rows], &opts, &mut hooks).unwrap();
        assert_eq!(e.samples.len(), rows, "{label}");
        for (i, (g, (_, got))) in alone.iter().zip(&e.samples).enumerate() {
            let want = m.tokenizer.decode(&g.generated_ids, true).unwrap();
            if &want != got {
                assert!(
                    g.margins.iter().any(|&x| x < 1e-3),
                    "{label} row {i}: {got:?} in one generation vs {want:?} alone, no near-tie"
                );
            }
        }
        texts.push(e.samples.iter().map(|s| s.1.clone()).collect::<Vec<_>>());
        assert!(
            e.novice_grade.is_some() || e.expert_grade.is_some(),
            "{label}"
        );
    }
    // Not vacuous: the ablations change answers, and differently from one another.
    assert_ne!(
        texts[0], texts[1],
        "zeroing the last layer's heads changed no answer"
    );
    assert_ne!(
        texts[1], texts[2],
        "zero and resample ablation gave the same answers"
    );
}

/// Five evaluation-split child-phd pairs (different questions), the simple-minus-technical
/// logit difference, and the pairs' chat prompts (novice of pair i at 2i): what the ablation
/// tests run on.
fn ablation_pairs(
    m: &persona_lens_engine::Model,
) -> (
    Vec<(dataset::PromptItem, dataset::PromptItem)>,
    persona_lens_analysis::patching::Metric,
    Vec<Vec<u32>>,
) {
    use persona_lens_analysis::dataset::{GenOptions, Split};
    use persona_lens_analysis::heads::{dataset_pairs, AblationSetup};
    let mut ds = dataset::generate(&GenOptions {
        persona_pairs: vec!["child-phd".into()],
        n_questions_per_pair: 2,
        ..Default::default()
    })
    .unwrap();
    ds.assign_splits(0);
    let pairs: Vec<_> = dataset_pairs(&ds.in_split(Split::Evaluate))
        .into_iter()
        .step_by(3)
        .take(5)
        .collect();
    let metric =
        persona_lens_analysis::patching::Metric::logit_diff_words(m, "simple", "technical")
            .unwrap();
    let ids = AblationSetup::prompt_ids(m, &pairs, true).unwrap();
    (pairs, metric, ids)
}
