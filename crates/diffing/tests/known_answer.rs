//! Known-answer model diffing on the real gemma-3-270m: model B is model A plus a planted
//! direction that switches on only at a trigger token (through the hook API). A crosscoder
//! trained on A vs B must find a B-only latent (Δ_norm ≥ 0.9) whose B decoder is the planted
//! direction (cosine ≥ 0.9) and which fires on the trigger, while shared latents stay near 0.5.
//! The latent is also chosen blind, as `diff analyze` ranks: chat-only class, then the persona
//! statistic on prompt pairs whose "novice" side carries the trigger; the planted direction only
//! checks that choice.
//! Also: a killed-and-resumed training run reproduces the uninterrupted run's loss curve.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use candle_core::{Device, Tensor};
use persona_lens_diffing::baselines::{pca_of_differences, per_token_kl};
use persona_lens_diffing::harvest::{
    harvest_paired, middle_resid_post, plant_on_token, CorpusItem, PairedHarvestSpec,
};
use persona_lens_diffing::metrics::{DecoderMetrics, LatentClass};
use persona_lens_diffing::paired::{Alignment, PairedStore};
use persona_lens_diffing::persona::{codes_for, consistency, pair_differences};
use persona_lens_diffing::train::{train, Objective, TrainConfig};
use persona_lens_engine::{Batch, Hooks, LogitsAt};
use rand::{Rng, SeedableRng};

fn tmp(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("pl-ka-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

#[test]
fn planted_chat_only_feature_is_found_and_resume_is_exact() {
    let m = common::model("gemma-3-270m");
    let hook = middle_resid_post(&m);
    let trigger_ids = m.tokenizer.encode(" zebra", false).unwrap();
    assert_eq!(
        trigger_ids.len(),
        1,
        "trigger must be one token: {trigger_ids:?}"
    );
    let trigger = trigger_ids[0];

    // A frozen corpus (the first built-in persona dataset's prompts): the crosscoder's known
    // answer must not move when the persona dataset does.
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/corpus_builtin1.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut corpus: Vec<CorpusItem> = fixture["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|it| CorpusItem {
            id: it["id"].as_str().unwrap().into(),
            source: it["source"].as_str().unwrap().into(),
            text: it["text"].as_str().unwrap().into(),
        })
        .collect();
    assert_eq!(corpus.len(), 240);
    for (i, c) in corpus.iter_mut().enumerate() {
        if i % 3 == 0 {
            c.text = format!("I saw a zebra at the zoo today. {}", c.text);
        }
    }

    // Planted direction: a seeded random unit vector; its size is the residual's total std at
    // the hook (so it is large in its own direction but not dominating the stream).
    let d = m.config().d_model;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let v: Vec<f32> = (0..d).map(|_| rng.random::<f32>() - 0.5).collect();
    let nv = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let v: Vec<f32> = v.iter().map(|x| x / nv).collect();
    let direction = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
    let total_std = {
        let seqs: Vec<Vec<u32>> = corpus[..32]
            .iter()
            .map(|c| m.encode_prompt(&c.text, false).unwrap())
            .collect();
        let b = Batch::left_padded(&seqs, m.pad_id(), m.device()).unwrap();
        let mut h = Hooks::new();
        h.capture(hook);
        m.forward(&b, None, &mut h, LogitsAt::None).unwrap();
        let a = h.cache.get(&hook).unwrap();
        let rows: Vec<Tensor> = seqs
            .iter()
            .enumerate()
            .map(|(r, s)| {
                a.get(r)
                    .unwrap()
                    .narrow(0, b.pad[r] + 1, s.len() - 1)
                    .unwrap()
            })
            .collect();
        let x = Tensor::cat(&rows, 0).unwrap();
        let var = x
            .var_keepdim(0)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        var.sqrt() as f64
    };
    let plant = plant_on_token(hook, trigger, direction.clone(), total_std, true);
    let store_dir = tmp("store");
    let spec = PairedHarvestSpec {
        shared_ids: false,
        hooks: [hook, hook],
        chat_template: [false, false],
        alignment: None,
        batch_size: 16,
        shard_rows: 2000,
        setup: [None, Some(&plant)],
        stored: [None, None],
    };
    let meta = harvest_paired([&m, &m], &corpus, &spec, &store_dir, &|_| {}).unwrap();
    assert_eq!(
        meta.alignment,
        Alignment::Tokens,
        "same model, same ids: per token"
    );
    assert!(
        meta.shards.len() >= 2,
        "several shards: {}",
        meta.shards.len()
    );
    let store = PairedStore::open(&store_dir).unwrap();
    eprintln!(
        "rows {} in {} shards, planted |v| = {total_std:.1}",
        store.meta.rows,
        store.meta.shards.len()
    );

    let cfg = TrainConfig {
        objective: Objective::L1 {
            l1_coeff: std::env::var("KA_L1")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.02),
        },
        dict_size: 128,
        batch_size: 256,
        steps: std::env::var("KA_STEPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1200),
        lr: 2e-3,
        warmup_steps: 50,
        seed: 3,
        checkpoint_every: 100,
        normaliser_rows: 100_000,
        target_rms: 1.0,
        dec_init_norm: 0.1,
        validation_fraction: 0.0,
        chunk_rows: 2000,
    };
    let ck = tmp("ckpt");
    let t0 = std::time::Instant::now();
    let full = train(&store, &cfg, &ck, false, None, &|_| {}).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let last = full.log.last().unwrap();
    eprintln!(
        "trained {} steps in {secs:.1} s ({:.0} rows/s): loss {:.4} mse {:.4} FVE {:.3} L0 {:.1} dead {:.2}",
        cfg.steps,
        (cfg.steps * cfg.batch_size) as f64 / secs,
        last.loss,
        last.mse,
        last.fve,
        last.l0,
        last.dead_fraction
    );
    assert!(
        last.fve > 0.5,
        "the crosscoder reconstructs: FVE {}",
        last.fve
    );

    let cc = full.crosscoder;
    let dm = DecoderMetrics::compute(&cc).unwrap();
    // B decoder cosine with the planted direction
    let chat_dec = cc.w_dec.get(1).unwrap(); // (F, d)
    let cos: Vec<f32> = {
        let dots = chat_dec
            .matmul(&direction.unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap();
        let norms = chat_dec.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        (dots / norms).unwrap().to_vec1().unwrap()
    };
    let best = (0..cos.len())
        .max_by(|&a, &b| cos[a].total_cmp(&cos[b]))
        .unwrap();
    eprintln!(
        "best latent {best}: cos {:.3}, Δ_norm {:.3}; chat-only latents {:?}",
        cos[best],
        dm.rel_norm_diff[best],
        dm.of_class(LatentClass::ChatOnly)
    );
    assert!(
        cos[best] >= 0.9,
        "B decoder cosine with the planted direction {}",
        cos[best]
    );
    assert!(
        dm.rel_norm_diff[best] >= 0.9,
        "planted latent is B-only: Δ_norm {}",
        dm.rel_norm_diff[best]
    );

    // Blind, as `diff analyze` chooses: among chat-only latents, the top of the persona
    // statistic (mean "novice" − "expert" scaled activation at the last token over pairs). The
    // "novice" prompt carries the trigger early, like a persona cue (the plant persists to the
    // last token); the "expert" prompt the same words without it. The planted direction only
    // checks the choice afterwards.
    let questions = [
        "Why is the sky blue?",
        "How do magnets work?",
        "What causes earthquakes?",
        "Why is the ocean salty?",
        "How do plants grow?",
        "What is a black hole?",
        "How does the internet work?",
        "Why do we have seasons?",
    ];
    let mut persona = vec![];
    let mut ids = vec![];
    for (i, q) in questions.iter().enumerate() {
        for (class, animal) in [("novice", "zebra"), ("expert", "horse")] {
            let id = format!("q{i}/{class}");
            persona.push(CorpusItem {
                id: id.clone(),
                source: class.into(),
                text: format!("I saw a {animal} at the zoo today. {q}"),
            });
            ids.push((id, class.to_string()));
        }
    }
    let pdir = tmp("persona");
    let pspec = PairedHarvestSpec {
        alignment: Some(Alignment::Last),
        ..spec
    };
    harvest_paired([&m, &m], &persona, &pspec, &pdir, &|_| {}).unwrap();
    let px = PairedStore::open(&pdir).unwrap().all().unwrap();
    let codes = codes_for(&cc, &px, &ids).unwrap();
    let ranked = consistency(&pair_differences(&codes, "novice", "expert"), 10);
    let chat_only_now = dm.of_class(LatentClass::ChatOnly);
    let pick = ranked
        .iter()
        .find(|c| chat_only_now.contains(&c.feature_idx))
        .expect("a chat-only latent among the ranked ones");
    eprintln!(
        "blind pick: latent {} (mean novice − expert {:.3}, t {:.1}), cos with the planted direction {:.3}",
        pick.feature_idx, pick.mean_score, pick.t, cos[pick.feature_idx]
    );
    assert!(
        cos[pick.feature_idx] >= 0.9,
        "the blind ranking picked latent {} (cos {:.3}), not the planted one",
        pick.feature_idx,
        cos[pick.feature_idx]
    );
    assert!(pick.frac_positive >= 0.99, "{pick:?}");
    // the persona statistic alone, before the class filter, ranks it first too
    assert_eq!(
        ranked[0].feature_idx,
        pick.feature_idx,
        "{:?}",
        &ranked[..3]
    );
    let _ = std::fs::remove_dir_all(&pdir);

    // The cheap baselines see the same plant. PCA of B − A on the persona prompts: the first
    // component is the planted direction, carried by the trigger ("novice") prompts.
    let labels: Vec<(String, String, String)> = persona
        .iter()
        .map(|c| (c.id.clone(), c.source.clone(), c.text.clone()))
        .collect();
    let pca = pca_of_differences(&px, d, &labels, ("novice", "expert"), 3, 5).unwrap();
    let pc1 = &pca.components[0];
    let pc_cos: f32 = pc1.direction.iter().zip(&v).map(|(a, b)| a * b).sum();
    eprintln!(
        "PCA of B − A: PC1 explains {:.3}, |cos| with the planted direction {:.4}, mean projection {:?}",
        pc1.explained_variance_ratio,
        pc_cos.abs(),
        pc1.mean_projection_by_class
    );
    assert!(
        pc_cos.abs() >= 0.99,
        "PC1 is the planted direction: {pc_cos}"
    );
    assert!(pc1.explained_variance_ratio >= 0.9, "{pc1:?}");
    assert!(
        pc1.top_positive.iter().all(|e| e.class == "novice"),
        "{pc1:?}"
    );
    // per-token KL: B differs from A only from the trigger on
    let kl = per_token_kl([&m, &m], &persona, false, [None, Some(&plant)], 8, 10).unwrap();
    eprintln!(
        "per-token KL(B ‖ A): mean {:.4} nats over {} tokens, by class {:?}; top {:?}",
        kl.mean_kl_nats,
        kl.n_tokens,
        kl.mean_kl_by_class,
        kl.top
            .iter()
            .take(3)
            .map(|t| (&t.context, t.kl_nats))
            .collect::<Vec<_>>()
    );
    assert!(
        kl.mean_kl_by_class["expert"] < 1e-6,
        "{:?}",
        kl.mean_kl_by_class
    );
    assert!(
        kl.mean_kl_by_class["novice"] > 0.01,
        "{:?}",
        kl.mean_kl_by_class
    );
    for t in &kl.top {
        let ids = m
            .encode_prompt(
                &persona.iter().find(|c| c.id == t.sample).unwrap().text,
                false,
            )
            .unwrap();
        let at = ids
            .iter()
            .position(|&i| i == trigger)
            .expect("a trigger prompt");
        assert!(t.position >= at, "top KL before the trigger: {t:?}");
    }

    // it fires on trigger tokens and not elsewhere
    let x = store.all().unwrap();
    let f = cc.encode(&x, true).unwrap();
    let fb: Vec<f32> = f
        .narrow(1, best, 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    // any chat-only latent, per row: together they should cover the planted positions
    let chat_only = dm.of_class(LatentClass::ChatOnly);
    let any_chat_only: Vec<f32> = {
        let idx = Tensor::new(
            chat_only
                .iter()
                .map(|&j| j as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            &Device::Cpu,
        )
        .unwrap();
        f.index_select(&idx, 1)
            .unwrap()
            .max(1)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    // per position and per sample: planted positions are the trigger and everything after it
    let (mut planted_rows, mut off) = (vec![], vec![]);
    let (mut trig_samples, mut trig_hit, mut clean_samples, mut clean_hit) = (0, 0, 0, 0);
    let (mut union_trig_hit, mut union_clean_hit) = (0, 0);
    for s in &store.meta.samples {
        let mut planted = false;
        let (mut hit, mut uhit) = (false, false);
        for (i, t) in s.tokens.iter().enumerate() {
            let r = s.first_row + i;
            planted |= m.tokenizer.token_to_id(t) == Some(trigger);
            hit |= fb[r] > 0.0;
            uhit |= any_chat_only[r] > 0.0;
            if planted {
                planted_rows.push(fb[r]);
            } else {
                off.push(fb[r]);
            }
        }
        if planted {
            trig_samples += 1;
            trig_hit += hit as usize;
            union_trig_hit += uhit as usize;
        } else {
            clean_samples += 1;
            clean_hit += hit as usize;
            union_clean_hit += uhit as usize;
        }
    }
    let frac = |v: &[f32]| v.iter().filter(|&&a| a > 0.0).count() as f64 / v.len().max(1) as f64;
    let (ts, cs) = (
        trig_hit as f64 / trig_samples as f64,
        clean_hit as f64 / clean_samples as f64,
    );
    eprintln!(
        "latent {best} fires in {trig_hit}/{trig_samples} samples with the trigger and {clean_hit}/{clean_samples} without; on {:.3} of {} planted positions and {:.4} of {} unplanted; all chat-only latents: {union_trig_hit}/{trig_samples} and {union_clean_hit}/{clean_samples} samples",
        frac(&planted_rows), planted_rows.len(), frac(&off), off.len()
    );
    assert!(
        ts >= 0.95,
        "fires on the trigger: in {ts} of trigger samples"
    );
    assert!(
        cs <= 0.02,
        "silent without the trigger: fires in {cs} of clean samples"
    );
    assert!(
        frac(&planted_rows) >= 0.5,
        "fires on most planted positions: {}",
        frac(&planted_rows)
    );
    assert!(
        frac(&off) <= 0.01,
        "silent at unplanted positions: {}",
        frac(&off)
    );

    // shared latents: the other live latents sit near 0.5
    let alive: Vec<usize> = (0..cc.dict_size())
        .filter(|&j| {
            !chat_only.contains(&j)
                && f.narrow(1, j, 1)
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
        })
        .collect();
    let mut rel: Vec<f64> = alive.iter().map(|&j| dm.rel_norm_diff[j]).collect();
    rel.sort_by(f64::total_cmp);
    let median = rel[rel.len() / 2];
    let shared = alive
        .iter()
        .filter(|&&j| dm.class[j] == LatentClass::Shared)
        .count() as f64
        / alive.len() as f64;
    eprintln!(
        "{} live latents: median Δ_norm {median:.3}, {:.2} shared",
        alive.len(),
        shared
    );
    // B's extra variance from the plant shrinks its normalisation scale a little, so shared
    // latents sit slightly below 0.5; they must stay inside the shared band.
    assert!(
        (0.4..=0.6).contains(&median),
        "median Δ_norm of the other latents {median}"
    );
    assert!(shared >= 0.8, "most other latents are shared: {shared}");

    // kill after 250 steps (the last checkpoint is at 200), resume, and compare the curves
    // (a smaller config: resumption does not depend on size)
    let cfg = TrainConfig {
        dict_size: 64,
        steps: 300,
        ..cfg
    };
    let full = train(&store, &cfg, &tmp("ckpt-small"), false, None, &|_| {}).unwrap();
    let ck2 = tmp("ckpt2");
    let part = train(&store, &cfg, &ck2, true, Some(250), &|_| {}).unwrap();
    assert!(!part.finished);
    let resumed = train(&store, &cfg, &ck2, true, None, &|_| {}).unwrap();
    assert_eq!(
        resumed.resumed_from, 200,
        "resumes from the last checkpoint before the kill"
    );
    assert!(resumed.finished);
    assert_eq!(resumed.log.len(), full.log.len());
    for (a, b) in resumed.log.iter().zip(&full.log) {
        assert_eq!(a, b, "step {} differs after resume", a.step);
    }
    let _ = std::fs::remove_dir_all(&store_dir);
    let _ = std::fs::remove_dir_all(&ck);
    let _ = std::fs::remove_dir_all(&ck2);
}
