//! Steering on the real models: alpha = 0 is a no-op token for token, KV-cache generation equals
//! full recomputation under steering, layers before the steered one are bit-identical, directional
//! ablation leaves no component along the direction, patching copies the source activation, and
//! bad directions fail with clear errors.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use candle_core::{Device, Tensor};
use common::model;
use persona_lens_analysis::steering::{
    add_steering, check_direction, l2, mean_resid_norm, scale_direction, NormConvention, SteerOp,
    SteerPositions,
};
use persona_lens_engine::{
    generate, Batch, GenerateOptions, HookName, HookPoint, Hooks, LogitsAt, Model,
};

const NOVICE: &str = "I am a child. Explain how rainbows form.";
const EXPERT: &str = "I am a physicist. Explain how rainbows form.";

/// A real persona direction at `hook`: expert minus novice residual at the last position.
fn pair_direction(m: &Model, hook: HookName, chat: bool) -> Vec<f32> {
    let last = |text: &str| -> Vec<f32> {
        let ids = m.encode_prompt(text, chat).unwrap();
        let b = Batch::left_padded(std::slice::from_ref(&ids), m.pad_id(), m.device()).unwrap();
        let mut h = Hooks::new();
        h.capture(hook);
        m.forward(&b, None, &mut h, LogitsAt::None).unwrap();
        let a = h.cache.get(&hook).unwrap();
        a.get(0)
            .unwrap()
            .get(ids.len() - 1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (e, n) = (last(EXPERT), last(NOVICE));
    e.iter().zip(&n).map(|(a, b)| a - b).collect()
}

fn steered(
    m: &Model,
    prompts: &[Vec<u32>],
    hook: HookName,
    op: SteerOp,
    rule: SteerPositions,
    kv: bool,
) -> Vec<Vec<u32>> {
    let mut hooks = Hooks::new();
    add_steering(
        &mut hooks,
        hook,
        op,
        rule,
        prompts.iter().map(Vec::len).collect(),
    )
    .unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 12,
        use_kv_cache: kv,
        ..Default::default()
    };
    generate(m, prompts, &opts, &mut hooks)
        .unwrap()
        .into_iter()
        .map(|g| g.generated_ids)
        .collect()
}

fn check_model(name: &str, chat: bool, layer: usize) {
    let m = model(name);
    let hook = HookName::block(layer, HookPoint::ResidPre);
    let dir = pair_direction(&m, hook, chat);
    check_direction(&dir, m.config().d_model).unwrap();
    let prompts: Vec<Vec<u32>> = [NOVICE, "I am a child. Why is the sky blue? Answer briefly."]
        .iter()
        .map(|t| m.encode_prompt(t, chat).unwrap())
        .collect();
    assert_ne!(prompts[0].len(), prompts[1].len(), "want left padding");
    let plain: Vec<Vec<u32>> = generate(
        &m,
        &prompts,
        &GenerateOptions {
            max_new_tokens: 12,
            ..Default::default()
        },
        &mut Hooks::new(),
    )
    .unwrap()
    .into_iter()
    .map(|g| g.generated_ids)
    .collect();
    let norm = mean_resid_norm(&m, &prompts, hook).unwrap();
    assert!(norm > 0.0);
    let unit = scale_direction(&dir, NormConvention::Unit, None).unwrap();
    assert!((l2(&unit) - 1.0).abs() < 1e-5);
    let scaled = scale_direction(&dir, NormConvention::MeanResid, Some(norm)).unwrap();
    assert!((l2(&scaled) - norm).abs() < 1e-3 * norm);
    let dev = Device::Cpu;
    let add = |alpha: f32| {
        let v: Vec<f32> = scaled.iter().map(|x| x * alpha).collect();
        SteerOp::Add(Tensor::new(v.as_slice(), &dev).unwrap())
    };
    // alpha = 0: token for token the unsteered output.
    assert_eq!(
        steered(&m, &prompts, hook, add(0.0), SteerPositions::All, true),
        plain
    );
    // KV cache = full recompute, for every position rule; steering changes the output.
    for rule in [
        SteerPositions::All,
        SteerPositions::Prompt,
        SteerPositions::Generated,
    ] {
        let a = steered(&m, &prompts, hook, add(0.6), rule, true);
        let b = steered(&m, &prompts, hook, add(0.6), rule, false);
        assert_eq!(a, b, "{name} {rule:?}: KV cache vs recompute");
        if rule != SteerPositions::Generated {
            assert_ne!(a, plain, "{name} {rule:?}: steering had no effect");
        }
    }
    // Layers before the steered one are bit-identical; the steered hook moved by alpha * v.
    let b = Batch::left_padded(&prompts, m.pad_id(), m.device()).unwrap();
    let watch: Vec<HookName> = (0..layer)
        .flat_map(|l| {
            [
                HookName::block(l, HookPoint::ResidPre),
                HookName::block(l, HookPoint::AttnZ),
                HookName::block(l, HookPoint::MlpOut),
            ]
        })
        .chain([hook])
        .collect();
    let run = |op: Option<SteerOp>| {
        let mut h = Hooks::new();
        if let Some(op) = op {
            add_steering(
                &mut h,
                hook,
                op,
                SteerPositions::All,
                prompts.iter().map(Vec::len).collect(),
            )
            .unwrap();
        }
        h.capture_all(&watch);
        m.forward(&b, None, &mut h, LogitsAt::None).unwrap();
        h
    };
    let base = run(None);
    let st = run(Some(add(0.6)));
    for w in &watch[..watch.len() - 1] {
        let x = base.cache.get(w).unwrap().flatten_all().unwrap();
        let y = st.cache.get(w).unwrap().flatten_all().unwrap();
        assert_eq!(
            x.to_vec1::<f32>().unwrap(),
            y.to_vec1::<f32>().unwrap(),
            "{name}: {w} changed by steering at {hook}"
        );
    }
    let last = prompts[0].len() + b.pad[0] - 1;
    let at = |h: &Hooks| -> Vec<f32> {
        h.cache
            .get(&hook)
            .unwrap()
            .get(0)
            .unwrap()
            .get(last)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let moved: Vec<f32> = at(&st).iter().zip(at(&base)).map(|(a, b)| a - b).collect();
    for (d, v) in moved.iter().zip(&scaled) {
        assert!(
            (d - 0.6 * v).abs() <= 1e-3 * (1.0 + v.abs()),
            "{d} vs {}",
            0.6 * v
        );
    }
    // Padding positions are never steered.
    if b.pad[0] > 0 {
        let p0 = |h: &Hooks| -> Vec<f32> {
            h.cache
                .get(&hook)
                .unwrap()
                .get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(p0(&st), p0(&base));
    }
    // Directional ablation: nothing left along u at the hook.
    let u = Tensor::new(unit.as_slice(), &dev).unwrap();
    let ab = run(Some(SteerOp::Ablate(u)));
    let x = at(&ab);
    let proj: f64 = x.iter().zip(&unit).map(|(a, b)| (a * b) as f64).sum();
    let before: f64 = at(&base)
        .iter()
        .zip(&unit)
        .map(|(a, b)| (a * b) as f64)
        .sum();
    assert!(
        proj.abs() < 1e-3 * before.abs().max(1.0),
        "{proj} vs {before}"
    );
    // Patching the expert prompt's activation into the novice prompt: end-aligned copy.
    let src_ids = m.encode_prompt(EXPERT, chat).unwrap();
    let sb = Batch::left_padded(std::slice::from_ref(&src_ids), m.pad_id(), m.device()).unwrap();
    let mut sh = Hooks::new();
    sh.capture(hook);
    m.forward(&sb, None, &mut sh, LogitsAt::None).unwrap();
    let src = sh.cache.get(&hook).unwrap().get(0).unwrap();
    let one = vec![prompts[0].clone()];
    let mut ph = Hooks::new();
    add_steering(
        &mut ph,
        hook,
        SteerOp::Patch(vec![src.clone()]),
        SteerPositions::Prompt,
        vec![one[0].len()],
    )
    .unwrap();
    ph.capture(hook);
    let ob = Batch::left_padded(&one, m.pad_id(), m.device()).unwrap();
    m.forward(&ob, None, &mut ph, LogitsAt::None).unwrap();
    let got = ph.cache.get(&hook).unwrap().get(0).unwrap();
    let (tn, ts) = (one[0].len(), src_ids.len());
    let k = tn.min(ts);
    assert_eq!(
        got.narrow(0, tn - k, k)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        src.narrow(0, ts - k, k)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
    let e = add_steering(
        &mut Hooks::new(),
        hook,
        SteerOp::Patch(vec![src]),
        SteerPositions::All,
        vec![tn],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("prompt positions only"), "{e}");
}

#[test]
fn steering_gemma() {
    check_model("gemma-3-270m", false, 6);
}

#[test]
fn steering_smollm2_chat() {
    check_model("smollm2-135m-instruct", true, 12);
}

#[test]
fn bad_directions() {
    let e = check_direction(&[1.0, 2.0], 640).err().unwrap().to_string();
    assert!(e.contains("width 2") && e.contains("640"), "{e}");
    let e = check_direction(&[f32::NAN, 1.0], 2)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("NaN"), "{e}");
    let e = check_direction(&[0.0, 0.0], 2).err().unwrap().to_string();
    assert!(e.contains("all zeros"), "{e}");
    assert!(NormConvention::parse("huge").is_err());
    assert!(SteerPositions::parse("middle").is_err());
}

/// Three chat prompts (two novice, one expert) and the persona direction at `hook` scaled to
/// their mean residual norm.
fn chat_prompts_and_direction(m: &Model, hook: HookName) -> (Vec<Vec<u32>>, Vec<f32>) {
    let prompts: Vec<Vec<u32>> = [NOVICE, EXPERT, "I am a child. Why is the sky blue?"]
        .iter()
        .map(|t| m.encode_prompt(t, true).unwrap())
        .collect();
    let norm = mean_resid_norm(m, &prompts, hook).unwrap();
    let dir = pair_direction(m, hook, true);
    let scaled = scale_direction(&dir, NormConvention::MeanResid, Some(norm)).unwrap();
    (prompts, scaled)
}

/// Per-row steering vectors (many directions in one batch, as the study's random-direction
/// baseline runs them) give each row the answer it gets when its direction steers alone, also
/// when a batch boundary splits the rows of one direction.
#[test]
fn per_row_vectors_equal_one_direction_at_a_time() {
    use persona_lens_analysis::steering::steered_generate;
    let m = model("smollm2-135m-instruct");
    let hook = HookName::block(12, HookPoint::ResidPost);
    let (prompts, scaled) = chat_prompts_and_direction(&m, hook);
    let dirs: Vec<Vec<f32>> = [0.8f32, -0.8, 0.0]
        .iter()
        .map(|a| scaled.iter().map(|x| x * a).collect())
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: 10,
        ..Default::default()
    };
    let one_at_a_time: Vec<persona_lens_engine::Generation> = dirs
        .iter()
        .flat_map(|v| {
            let op = SteerOp::Add(Tensor::new(v.as_slice(), m.device()).unwrap());
            steered_generate(
                &m,
                &prompts,
                Some((hook, &op, SteerPositions::All)),
                &opts,
                8,
                &|_| {},
            )
            .unwrap()
        })
        .collect();
    let rows: Vec<Vec<u32>> = dirs.iter().flat_map(|_| prompts.clone()).collect();
    let flat: Vec<f32> = dirs
        .iter()
        .flat_map(|v| prompts.iter().flat_map(move |_| v.clone()))
        .collect();
    let per_row =
        SteerOp::AddPerRow(Tensor::from_vec(flat, (rows.len(), scaled.len()), m.device()).unwrap());
    // Batches of 4 rows: the second direction's rows fall in two batches.
    let batched = steered_generate(
        &m,
        &rows,
        Some((hook, &per_row, SteerPositions::All)),
        &opts,
        4,
        &|_| {},
    )
    .unwrap();
    assert_ne!(
        one_at_a_time[0].generated_ids, one_at_a_time[3].generated_ids,
        "the two directions should steer the first prompt differently"
    );
    for (r, (a, b)) in one_at_a_time.iter().zip(&batched).enumerate() {
        // Equal token for token up to a near-tie (batch composition may move logits by ~1e-6).
        let same = a
            .generated_ids
            .iter()
            .zip(&b.generated_ids)
            .take_while(|(x, y)| x == y)
            .count();
        if same < a.generated_ids.len().min(b.generated_ids.len()) {
            assert!(
                a.margins[same] < 1e-3,
                "row {r}: token {same} differs ({:?} vs {:?}) with top-2 margin {}",
                a.generated_ids,
                b.generated_ids,
                a.margins[same]
            );
        } else {
            assert_eq!(a.generated_ids, b.generated_ids, "row {r}");
        }
    }
    let e = add_steering(
        &mut Hooks::new(),
        hook,
        SteerOp::AddPerRow(
            Tensor::zeros((2, scaled.len()), candle_core::DType::F32, m.device()).unwrap(),
        ),
        SteerPositions::All,
        vec![3, 4, 5],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("one [d] vector per prompt") && !e.contains('\n'),
        "{e}"
    );
    // Too few vectors for the prompts: the same one-line error from a batched generation.
    let short = SteerOp::AddPerRow(
        Tensor::zeros((2, scaled.len()), candle_core::DType::F32, m.device()).unwrap(),
    );
    let e = steered_generate(
        &m,
        &prompts,
        Some((hook, &short, SteerPositions::All)),
        &opts,
        8,
        &|_| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("one [d] vector per prompt") && !e.contains('\n'),
        "{e}"
    );
}

/// Steered generation runs the chat template's shared prefix once per distinct edit
/// (`steered_generate` → `generate_after_prefix`) and gives the whole rows' answers: no edit, one
/// vector for every row (on all positions, and on generated positions only), and per-row
/// vectors (three directions over nine rows: one prefix row each). The reference runs every
/// prompt whole through the engine's `generate` with the same hooks.
#[test]
fn steered_generation_sharing_the_chat_prefix_matches_whole_rows() {
    use persona_lens_analysis::steering::steered_generate;
    let m = model("smollm2-135m-instruct");
    let hook = HookName::block(10, HookPoint::ResidPost);
    let (prompts, scaled) = chat_prompts_and_direction(&m, hook);
    assert!(
        persona_lens_engine::common_prefix_len(&prompts) >= persona_lens_engine::MIN_SHARED_PREFIX,
        "the chat prompts must share their template's prefix"
    );
    let times = |a: f32| -> Vec<f32> { scaled.iter().map(|x| x * a).collect() };
    let rows: Vec<Vec<u32>> = (0..3).flat_map(|_| prompts.clone()).collect();
    let per_row: Vec<f32> = [1.0f32, -1.0, 0.5]
        .iter()
        .flat_map(|&a| std::iter::repeat_n(times(a), prompts.len()).flatten())
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        ..Default::default()
    };
    let add = SteerOp::Add(Tensor::new(times(1.0).as_slice(), m.device()).unwrap());
    let cases: Vec<(&str, Option<(SteerOp, SteerPositions)>)> = vec![
        ("unsteered", None),
        (
            "one vector, all positions",
            Some((add.clone(), SteerPositions::All)),
        ),
        (
            "one vector, generated positions",
            Some((add, SteerPositions::Generated)),
        ),
        (
            "per-row vectors",
            Some((
                SteerOp::AddPerRow(
                    Tensor::from_vec(per_row, (rows.len(), scaled.len()), m.device()).unwrap(),
                ),
                SteerPositions::All,
            )),
        ),
    ];
    let mut worst = 0f32;
    for (what, op) in &cases {
        let shared = steered_generate(
            &m,
            &rows,
            op.as_ref().map(|(o, r)| (hook, o, *r)),
            &opts,
            rows.len(),
            &|_| {},
        )
        .unwrap();
        let mut hooks = Hooks::new();
        if let Some((o, r)) = op {
            add_steering(
                &mut hooks,
                hook,
                o.clone(),
                *r,
                rows.iter().map(Vec::len).collect(),
            )
            .unwrap();
        }
        let whole = generate(&m, &rows, &opts, &mut hooks).unwrap();
        if *what == "per-row vectors" {
            // Directions +1 and -1 on the same prompt: the groups' prefixes must differ.
            assert_ne!(
                whole[0].generated_ids, whole[3].generated_ids,
                "opposite directions should steer the first prompt differently"
            );
        }
        for (r, (a, b)) in whole.iter().zip(&shared).enumerate() {
            assert_eq!(
                a.generated_ids, b.generated_ids,
                "{what}, row {r}: the shared prefix changed the answer"
            );
            for (x, y) in a.margins.iter().zip(&b.margins) {
                worst = worst.max((x - y).abs());
                // The near-tie margin of the test above: logits agree far closer than that.
                assert!(
                    (x - y).abs() < 1e-3,
                    "{what}, row {r}: top-2 margins {x} vs {y}"
                );
            }
        }
    }
    eprintln!("shared-prefix steered generation: worst top-2 margin difference {worst:.2e}");
}

/// Directional ablation against random directions, as the study runs it (every prompt intact
/// once, then the ablations from the hook's block only, several directions per forward, the chat
/// template's prefix once per direction), equals one whole forward per direction and prompt set
/// (`readout_with`, the plain path): the same per-prompt gap reductions and random means. Two
/// hooks (a block's input and a block's output) and groups that split the directions.
#[test]
fn grouped_directional_ablation_matches_whole_forwards() {
    use persona_lens_analysis::steering::{
        ablation_against_random_grouped, random_directions, readout_with,
    };
    let m = model("smollm2-135m-instruct");
    let encode = |ts: &[&str]| -> Vec<Vec<u32>> {
        ts.iter()
            .map(|t| m.encode_prompt(t, true).unwrap())
            .collect()
    };
    let expert = encode(&[EXPERT, "I have a PhD in physics. Why is the sky blue?"]);
    let novice = encode(&[NOVICE, "I'm 5. Why is the sky blue?", "I am a child."]);
    let word = |w: &str| m.tokenizer.encode(w, false).unwrap()[0];
    let (ew, sw) = (
        vec![word(" quantum"), word(" wavelength")],
        vec![word(" fun"), word(" pretty")],
    );
    for (hook, seed) in [
        (HookName::block(12, HookPoint::ResidPre), 7u64),
        (HookName::block(9, HookPoint::ResidPost), 8),
    ] {
        let dir = pair_direction(&m, hook, true);
        let n_random = 3;
        // Five prompts, at most ten rows per forward: two directions per forward, two groups.
        let got = ablation_against_random_grouped(
            &m,
            (&expert, &novice),
            hook,
            &dir,
            n_random,
            seed,
            (&ew, &sw),
            10,
        )
        .unwrap();
        let readout = |ps: &[Vec<u32>], u: Option<&[f32]>| {
            let op = u.map(|u| SteerOp::Ablate(Tensor::new(u, m.device()).unwrap()));
            readout_with(&m, ps, op.as_ref().map(|o| (hook, o)), &ew, &sw).unwrap()
        };
        let (e0, n0) = (readout(&expert, None), readout(&novice, None));
        let reductions = |u: &[f32]| -> Vec<f64> {
            let (e1, n1) = (readout(&expert, Some(u)), readout(&novice, Some(u)));
            let e = e0.iter().zip(&e1).map(|(a, b)| a - b);
            e.chain(n1.iter().zip(&n0).map(|(a, b)| a - b)).collect()
        };
        let unit = scale_direction(&dir, NormConvention::Unit, None).unwrap();
        let want = reductions(&unit);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let want_random: Vec<f64> = random_directions(dir.len(), n_random, 1.0, seed)
            .iter()
            .map(|u| mean(&reductions(u)))
            .collect();
        let worst = got
            .reductions
            .iter()
            .zip(&want)
            .chain(got.random_means.iter().zip(&want_random))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f64, f64::max);
        eprintln!("{hook}: worst difference {worst:.2e} logits; reductions {want:?}, random means {want_random:?}");
        assert_eq!(got.reductions.len(), 5);
        assert_eq!(got.random_means.len(), n_random);
        assert!(
            worst < 2e-4,
            "{hook}: grouped ablation off by {worst} logits"
        );
        let gap = mean(&e0) - mean(&n0);
        assert!(
            (got.gap_intact - gap).abs() < 2e-4,
            "{} vs {gap}",
            got.gap_intact
        );
        // Not vacuous: the persona direction's ablation moves the readouts, and differently
        // from every random direction's.
        assert!(want.iter().any(|r| r.abs() > 0.05), "{want:?}");
        assert!(want_random.iter().all(|r| (r - mean(&want)).abs() > 1e-3));
    }
}

/// `reference` (a generation alone) and `got` (the same prompt and vector in a batched run) are
/// the same answer, or part ways only at a near-tie of the reference (batch composition may move
/// logits by ~1e-6).
fn same_answer(what: &str, reference: &persona_lens_engine::Generation, m: &Model, got: &str) {
    let want = m.tokenizer.decode(&reference.generated_ids, true).unwrap();
    if want != got {
        assert!(
            reference.margins.iter().any(|&x| x < 1e-3),
            "{what}: {got:?} batched vs {want:?} alone, with no near-tie (margins {:?})",
            reference.margins
        );
    }
}

/// The study's batched steering gives each answer the generation it gets alone: a grid layer's
/// alphas decode together (`run_grid`), and `steer_against_random` decodes its unsteered,
/// steered and random-direction rows together. Reference: one `steered_generate` per vector
/// (no edit for the unsteered answers), batches of two prompts.
#[test]
fn batched_grid_and_random_baseline_match_one_generation_per_vector() {
    use persona_lens_analysis::steering::{
        random_directions, run_grid, steer_against_random, steered_generate, LoadedDirection,
        SteerGrid, SteerMode, SteerPrompt,
    };
    let m = model("smollm2-135m-instruct");
    let hook = HookName::block(12, HookPoint::ResidPost);
    let (ids, scaled) = chat_prompts_and_direction(&m, hook);
    let opts = GenerateOptions {
        max_new_tokens: 10,
        ..Default::default()
    };
    let alone = |op: Option<SteerOp>| {
        steered_generate(
            &m,
            &ids,
            op.as_ref().map(|o| (hook, o, SteerPositions::All)),
            &opts,
            2,
            &|_| {},
        )
        .unwrap()
    };
    let add = |v: &[f32]| Some(SteerOp::Add(Tensor::new(v, m.device()).unwrap()));
    // The grid: three alphas at one layer, records alpha by alpha, prompt by prompt.
    let texts = [NOVICE, EXPERT, "I am a child. Why is the sky blue?"];
    let prompts: Vec<SteerPrompt> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| SteerPrompt {
            id: format!("p{i}"),
            persona: "novice".into(),
            topic: "physics".into(),
            text: t.to_string(),
            paired_text: None,
        })
        .collect();
    let alphas = [0.0, 0.6, -0.9];
    let grid = SteerGrid {
        directions: vec![(
            12,
            LoadedDirection {
                hook,
                row: 13,
                vector: pair_direction(&m, hook, true),
                source: "test".into(),
            },
        )],
        alphas: alphas.to_vec(),
        mode: SteerMode::Add,
        norm: NormConvention::MeanResid,
        positions: SteerPositions::All,
        gen: &opts,
        batch_size: 2,
        seed: 0,
    };
    let records = run_grid(&m, &prompts, true, &grid, &|_| {}).unwrap();
    assert_eq!(records.len(), alphas.len() * ids.len());
    let mut per_alpha = vec![];
    for (a, &alpha) in alphas.iter().enumerate() {
        let v: Vec<f32> = scaled.iter().map(|x| (*x as f64 * alpha) as f32).collect();
        let reference = alone(add(&v));
        for (p, g) in reference.iter().enumerate() {
            let r = &records[a * ids.len() + p];
            assert_eq!(
                (r.alpha, r.prompt_id.as_str()),
                (alpha, prompts[p].id.as_str())
            );
            same_answer(&format!("grid alpha {alpha} prompt {p}"), g, &m, &r.text);
        }
        per_alpha.push(reference);
    }
    assert_ne!(
        per_alpha[1][0].generated_ids, per_alpha[2][0].generated_ids,
        "the two alphas should steer the first prompt differently"
    );
    // The random-direction baseline: unsteered, steered and two random directions in one run.
    let v: Vec<f32> = scaled.iter().map(|x| x * 0.8).collect();
    let got = steer_against_random(
        &m,
        &ids,
        hook,
        &v,
        SteerPositions::All,
        2,
        3,
        &opts,
        2,
        &|_| {},
    )
    .unwrap();
    let grade = persona_lens_rate::readability::complexity_grade;
    for (p, g) in alone(None).iter().enumerate() {
        same_answer(
            &format!("unsteered prompt {p}"),
            g,
            &m,
            &got.unsteered[p].text,
        );
        assert!(got.unsteered[p].perplexity.is_some());
    }
    for (p, g) in alone(add(&v)).iter().enumerate() {
        same_answer(&format!("steered prompt {p}"), g, &m, &got.steered[p].text);
    }
    assert_ne!(got.unsteered[0].text, got.steered[0].text);
    let norm = l2(&v);
    let dirs = random_directions(v.len(), 2, norm, 3);
    assert_eq!(got.random_grades.len(), 2);
    for (j, dir) in dirs.iter().enumerate() {
        for (p, g) in alone(add(dir)).iter().enumerate() {
            let text = m.tokenizer.decode(&g.generated_ids, true).unwrap();
            if g.margins.iter().all(|&x| x >= 1e-3) {
                assert_eq!(
                    got.random_grades[j][p],
                    grade(&text),
                    "direction {j} prompt {p}"
                );
            }
        }
    }
}
