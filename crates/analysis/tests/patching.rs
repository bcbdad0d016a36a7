//! Activation patching against the golden HF sweeps (both real models), the batched/incremental
//! sweep against the one-by-one reference, and bad inputs.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use common::{golden_dir, model, read_json};
use persona_lens_analysis::patching::{Direction, Metric, PatchPair, Patcher, SweepKind, Variant};
use persona_lens_engine::HookPoint;

fn golden_patcher(
    name: &str,
) -> (
    std::sync::Arc<persona_lens_engine::Model>,
    serde_json::Value,
) {
    let m = model(name);
    let g = read_json(&golden_dir(name).join("patching.json"));
    (m, g)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn max_abs(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
}

fn flat(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
        .collect()
}

fn golden_sweeps(name: &str) {
    let (m, g) = golden_patcher(name);
    let pair = PatchPair::new(
        &m,
        g["clean_text"].as_str().unwrap(),
        g["corrupted_text"].as_str().unwrap(),
        false,
    )
    .unwrap();
    assert_eq!(pair.clean_ids, ids(&g["clean_ids"]));
    assert_eq!(pair.corrupted_ids, ids(&g["corrupted_ids"]));
    assert_eq!(
        pair.differing_positions,
        vec![g["differing_position"].as_u64().unwrap() as usize]
    );
    let metric = Metric::logit_diff_words(
        &m,
        g["answer_token_a"]["text"].as_str().unwrap(),
        g["answer_token_b"]["text"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(
        metric,
        Metric::LogitDiff {
            a: g["answer_token_a"]["id"].as_u64().unwrap() as u32,
            b: g["answer_token_b"]["id"].as_u64().unwrap() as u32
        }
    );
    let p = Patcher::new(&m, pair, metric).unwrap();
    let clean = g["clean_logit_diff"].as_f64().unwrap();
    let corrupted = g["corrupted_logit_diff"].as_f64().unwrap();
    assert!(
        (p.clean_metric as f64 - clean).abs() < 1e-3,
        "{} vs {clean}",
        p.clean_metric
    );
    assert!((p.corrupted_metric as f64 - corrupted).abs() < 1e-3);

    let resid = p
        .run_sweep(SweepKind::ResidPre, Direction::Denoise, None)
        .unwrap();
    let want = flat(&g["resid_pre_patch"]["values"]);
    assert_eq!(resid.values.len(), want.len());
    let err = max_abs(&resid.values, &want);
    assert!(err < 1e-3, "{name}: resid_pre sweep max |err| {err}");
    // Sanity rows: block 0 at the differing position = clean, elsewhere = corrupted. The sweep
    // skips bitwise no-op patches (it fills in the base metric), so those rows are run here for
    // real, one forward each with the replacement hook in place: a patch that took the source
    // from the wrong position, or a replacement that disturbed the forward, would move them.
    let seq = p.pair.len();
    let d = p.pair.differing_positions[0];
    assert!((resid.values[d] - p.clean_metric).abs() < 1e-4);
    let layer0: Vec<_> = SweepKind::ResidPre
        .variants(m.config().n_layers, m.config().n_heads, seq)
        .into_iter()
        .filter(|v| v.layer == 0)
        .collect();
    assert_eq!(layer0.len(), seq);
    let run = p.sweep_one_by_one(&layer0, Direction::Denoise).unwrap();
    for (i, v) in run.iter().enumerate() {
        let want = if i == d {
            p.clean_metric
        } else {
            p.corrupted_metric
        };
        assert!(
            (v - want).abs() < 1e-4,
            "{name}: layer-0 patch at position {i}: {v} vs {want}"
        );
        assert!(
            (v - resid.values[i]).abs() < 1e-4,
            "{name}: sweep row {i} vs a real run"
        );
    }

    let heads = p
        .run_sweep(SweepKind::ZLast, Direction::Denoise, None)
        .unwrap();
    let want = flat(&g["head_out_patch_last_pos"]["values"]);
    let err = max_abs(&heads.values, &want);
    assert!(err < 1e-3, "{name}: z_last sweep max |err| {err}");

    // Batched = one-by-one, on both sweeps and a sample of the other kinds, both directions.
    // The one-by-one reference costs a forward per variant, so it runs on three layers (first,
    // middle, last: every position or head there) rather than the whole grid; the batched sweep
    // still runs over the whole grid, so batch packing and the incremental cache are exercised.
    let cfg = m.config();
    let checked_layers = [0, cfg.n_layers / 2, cfg.n_layers - 1];
    for kind in [SweepKind::ResidPre, SweepKind::ZLast] {
        let all = kind.variants(cfg.n_layers, cfg.n_heads, seq);
        let full = p.sweep(&all, Direction::Denoise, None).unwrap();
        let (vs, fast): (Vec<Variant>, Vec<f32>) = all
            .into_iter()
            .zip(full)
            .filter(|(v, _)| checked_layers.contains(&v.layer))
            .unzip();
        assert_eq!(
            vs.len(),
            3 * if kind == SweepKind::ResidPre {
                seq
            } else {
                cfg.n_heads
            }
        );
        let slow = p.sweep_one_by_one(&vs, Direction::Denoise).unwrap();
        let err = fast
            .iter()
            .zip(&slow)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            err < 1e-5 * (1.0 + p.clean_metric.abs()),
            "{name} {kind:?}: batched vs one-by-one {err}"
        );
    }
    let mixed: Vec<Variant> = [
        (HookPoint::ResidMid, 3, vec![d], None),
        (HookPoint::AttnOut, 5, vec![seq - 1], None),
        (HookPoint::MlpOut, 1, vec![d + 1], None),
        (HookPoint::AttnZ, 2, (0..seq).collect(), Some(vec![1])),
        (HookPoint::AttnPattern, 4, (0..seq).collect(), Some(vec![0])),
        (HookPoint::AttnV, 0, vec![d], Some(vec![0])),
        (HookPoint::MlpPost, 6, vec![d, seq - 1], None),
    ]
    .into_iter()
    .map(|(point, layer, positions, heads)| Variant {
        layer,
        point,
        positions,
        heads,
    })
    .collect();
    for dir in [Direction::Denoise, Direction::Noise] {
        let fast = p.sweep(&mixed, dir, None).unwrap();
        let slow = p.sweep_one_by_one(&mixed, dir).unwrap();
        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
            assert!(
                (a - b).abs() < 1e-5 * (1.0 + b.abs()),
                "{name} {dir:?} {:?}: {a} vs {b}",
                mixed[i]
            );
        }
        // Patching everything at layer 0 resid_pre, every position, gives the source run.
        let all = Variant {
            layer: 0,
            point: HookPoint::ResidPre,
            positions: (0..seq).collect(),
            heads: None,
        };
        let v = p.sweep(&[all], dir, None).unwrap()[0];
        let src = match dir {
            Direction::Denoise => p.clean_metric,
            Direction::Noise => p.corrupted_metric,
        };
        assert!((v - src).abs() < 1e-4, "{dir:?}: {v} vs {src}");
    }
}

#[test]
fn golden_patching_gemma() {
    golden_sweeps("gemma-3-270m");
}

#[test]
fn golden_patching_smollm2() {
    golden_sweeps("smollm2-135m-instruct");
}

#[test]
fn bad_patching_inputs() {
    let m = model("gemma-3-270m");
    let e = PatchPair::new(
        &m,
        "I am a child. Explain gravity.",
        "I am a theoretical physicist. Explain gravity.",
        false,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("different token lengths"), "{e}");
    let e = Metric::logit_diff_words(&m, "simple", "antidisestablishmentarianism")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a single token"), "{e}");
    let pair = PatchPair::new(
        &m,
        "I am a child. Explain gravity.",
        "I am a physicist. Explain gravity.",
        false,
    )
    .unwrap();
    let metric = Metric::logit_diff_words(&m, "simple", "physics").unwrap();
    let p = Patcher::new(&m, pair, metric).unwrap();
    let bad = Variant {
        layer: 0,
        point: HookPoint::AttnZ,
        positions: vec![1],
        heads: Some(vec![99]),
    };
    let e = p
        .sweep(&[bad], Direction::Denoise, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("head 99 out of range"), "{e}");
    let bad = Variant {
        layer: 99,
        point: HookPoint::ResidPre,
        positions: vec![1],
        heads: None,
    };
    let e = p
        .sweep(&[bad], Direction::Denoise, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("layer 99 out of range"), "{e}");
}

#[test]
fn attribution_agrees_with_patching() {
    use persona_lens_analysis::attribution::{agreement, attribute};
    let (m, g) = golden_patcher("smollm2-135m-instruct");
    let pair = PatchPair::new(
        &m,
        g["clean_text"].as_str().unwrap(),
        g["corrupted_text"].as_str().unwrap(),
        false,
    )
    .unwrap();
    let metric = Metric::logit_diff_words(&m, " simple", " physics").unwrap();
    let p = Patcher::new(&m, pair, metric).unwrap();
    let est = attribute(
        &p,
        &[SweepKind::ResidPre, SweepKind::ZLast],
        Direction::Denoise,
    )
    .unwrap();
    let base = p.corrupted_metric;
    let mut rs = Vec::new();
    for e in &est {
        let real = p.run_sweep(e.kind, Direction::Denoise, None).unwrap();
        let d: Vec<f32> = real.values.iter().map(|v| v - base).collect();
        let ag = agreement(&e.delta, &d, 10);
        eprintln!(
            "{:?}: r = {:.3}, top-10 overlap {:.2}",
            e.kind, ag.pearson_r, ag.top_k_overlap
        );
        rs.push(ag.pearson_r);
    }
    // Measured: resid_pre r = 0.921, z_last r = 0.999 (SmolLM2, golden pair).
    assert!(rs[0] > 0.85, "resid_pre r {}", rs[0]);
    assert!(rs[1] > 0.98, "z_last r {}", rs[1]);
}

#[test]
fn heads_rank_and_ablate() {
    use persona_lens_analysis::dataset::{self, GenOptions};
    use persona_lens_analysis::heads::{
        ablation_hooks, dataset_pairs, metric_with, rank_heads, AblationMode, Head,
    };
    let m = model("gemma-3-270m");
    let ds = dataset::select_pairs(
        dataset::generate(&GenOptions {
            persona_pairs: vec!["child-phd".into()],
            topics: vec![],
            n_questions_per_pair: 2,
            templates: vec![0],
            include_neutral: false,
            include_lexical_controls: false,
        })
        .unwrap(),
        &["physics".to_string()],
    )
    .unwrap();
    let pairs = dataset_pairs(&ds);
    assert_eq!(pairs.len(), 2);
    let r = rank_heads(
        &m,
        &pairs,
        false,
        Some((" simple", " physics")),
        0.0,
        &|_| {},
    )
    .unwrap();
    assert_eq!(r.heads.len(), 18 * 4);
    assert!(r.heads[0].mean >= r.heads[71].mean);
    // Zero-ablating the top head changes the novice prompt's metric; ablating nothing does not.
    let ids = m.encode_prompt(&pairs[0].0.text, false).unwrap();
    let metric = Metric::logit_diff_words(&m, " simple", " physics").unwrap();
    let plain = metric_with(&m, &ids, &metric, &mut persona_lens_engine::Hooks::new()).unwrap();
    let none = metric_with(
        &m,
        &ids,
        &metric,
        &mut ablation_hooks(&[], AblationMode::Zero, None, &[]).unwrap(),
    )
    .unwrap();
    assert_eq!(plain, none);
    let top: Head = r.heads[0].head;
    let abl = metric_with(
        &m,
        &ids,
        &metric,
        &mut ablation_hooks(&[top], AblationMode::Zero, None, &[]).unwrap(),
    )
    .unwrap();
    assert!((abl - plain).abs() > 1e-3, "{abl} vs {plain}");
    assert!("L99H0".parse::<Head>().is_ok());
    assert!(persona_lens_analysis::heads::check_heads(&m, &["L99H0".parse().unwrap()]).is_err());
}

fn golden_pair_patcher<'a>(m: &'a persona_lens_engine::Model, name: &str) -> Patcher<'a> {
    let g = read_json(&golden_dir(name).join("patching.json"));
    let pair = PatchPair::new(
        m,
        g["clean_text"].as_str().unwrap(),
        g["corrupted_text"].as_str().unwrap(),
        false,
    )
    .unwrap();
    let metric = Metric::logit_diff_words(
        m,
        g["answer_token_a"]["text"].as_str().unwrap(),
        g["answer_token_b"]["text"].as_str().unwrap(),
    )
    .unwrap();
    Patcher::new(m, pair, metric).unwrap()
}

/// Batched path patching = the two-forwards-per-sender reference, for head receivers (q/k/v,
/// grouped-query k/v on SmolLM2) and the logits receiver, in both directions.
fn path_patching_matches_reference(name: &str, receivers: &str, inputs: &str, layers: &[usize]) {
    use persona_lens_analysis::heads::Head;
    use persona_lens_analysis::path_patching::{
        all_senders, path_patch, path_patch_one_by_one, Receivers,
    };
    let m = model(name);
    let p = golden_pair_patcher(&m, name);
    let n_heads = m.config().n_heads;
    for spec in [receivers, "logits"] {
        let r = Receivers::parse(spec, inputs).unwrap();
        let senders: Vec<Head> = all_senders(&p, &r)
            .into_iter()
            .filter(|s| layers.contains(&s.layer))
            .collect();
        assert_eq!(senders.len(), layers.len() * n_heads);
        for dir in [Direction::Denoise, Direction::Noise] {
            let fast = path_patch(&p, &senders, &r, dir, None).unwrap();
            let slow = path_patch_one_by_one(&p, &senders, &r, dir).unwrap();
            let base = p.base_metric(dir);
            let mut moved = 0;
            for ((s, a), b) in senders.iter().zip(&fast).zip(&slow) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{name} {spec} {dir:?} sender {s}: batched {a} vs reference {b}"
                );
                moved += ((b - base).abs() > 1e-3) as usize;
            }
            // The sweep is not trivially the base metric: some senders matter.
            assert!(
                moved > 0,
                "{name} {spec} {dir:?}: no sender moved the metric"
            );
        }
    }
    // Bad inputs: a sender at or after the last receiver, heads out of range, bad input names.
    let r = Receivers::parse(receivers, inputs).unwrap();
    let last = r.sender_layer_end(m.config().n_layers);
    let e = path_patch(
        &p,
        &[Head {
            layer: last,
            head: 0,
        }],
        &r,
        Direction::Denoise,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("is not before any receiver"), "{e}");
    let e = Receivers::parse("L3H99", "q")
        .and_then(|r| {
            path_patch(
                &p,
                &[Head { layer: 0, head: 0 }],
                &r,
                Direction::Denoise,
                None,
            )
        })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("head L3H99 out of range"), "{e}");
    let e = Receivers::parse("L3H0", "q,x").err().unwrap().to_string();
    assert!(e.contains("unknown receiver input 'x'"), "{e}");
}

#[test]
fn path_patching_gemma() {
    path_patching_matches_reference("gemma-3-270m", "L9H1,L14H2", "q,k,v", &[0, 3, 8, 12]);
}

#[test]
fn path_patching_smollm2() {
    path_patching_matches_reference(
        "smollm2-135m-instruct",
        "L20H3,L25H7",
        "k,v",
        &[0, 10, 19, 22],
    );
}
