//! Known-answer model diffing on the last-token, different-width path with the default
//! BatchTopK objective: model A is the real gemma-3-270m (width 640, raw text), model B the
//! real SmolLM2-135M-Instruct (width 576, its chat template) plus a planted direction that
//! switches on at a trigger token and stays on to the last token. Rows are one per sample at
//! each model's last token, zero-padded to 640. The latent is chosen blind, as `diff analyze`
//! ranks (chat-only class, then the persona statistic on trigger / no-trigger prompt pairs);
//! the planted direction only checks the choice afterwards, together with Δ_norm and firing on
//! held-out samples.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use candle_core::{Device, Tensor};
use persona_lens_diffing::analyze::auto_rendering;
use persona_lens_diffing::harvest::{
    harvest_paired, middle_resid_post, plant_on_token, CorpusItem, PairedHarvestSpec,
};
use persona_lens_diffing::metrics::{DecoderMetrics, LatentClass};
use persona_lens_diffing::paired::{Alignment, PairedStore};
use persona_lens_diffing::persona::{codes_for, consistency, pair_differences};
use persona_lens_diffing::train::{is_validation_sample, train, Objective, TrainConfig};
use persona_lens_engine::{Batch, Hooks, LogitsAt};
use rand::{Rng, SeedableRng};

fn tmp(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("pl-ka-last-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn planted_chat_only_feature_is_found_on_the_last_token_across_widths_with_batchtopk() {
    let base = common::model("gemma-3-270m");
    let chat = common::model("smollm2-135m-instruct");
    let models = [&*base, &*chat];
    assert_ne!(
        base.config().d_model,
        chat.config().d_model,
        "this test is about models of different widths"
    );
    let hooks = [middle_resid_post(&base), middle_resid_post(&chat)];
    let (_, shared_ids) = auto_rendering(models);
    assert!(
        !shared_ids,
        "a different-family pair reads its own renderings"
    );
    // raw text for both (the chat template's system prompt would triple the tokens to run;
    // the rendering does not change the alignment path under test)
    let chat_template = [false, false];
    let trigger_ids = chat.tokenizer.encode(" zebra", false).unwrap();
    assert_eq!(
        trigger_ids.len(),
        1,
        "trigger is one token: {trigger_ids:?}"
    );
    let trigger = trigger_ids[0];

    // The frozen corpus (a second framing doubles the rows: one row per sample), every third
    // sample with the trigger sentence in front.
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/corpus_builtin1.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let items = fixture["items"].as_array().unwrap();
    let mut corpus = vec![];
    let framings = [("a", ""), ("b", "A question for you. ")];
    for (framing, prefix) in framings.iter().take(env_or("KA_FRAMINGS", 2)) {
        for (i, it) in items.iter().enumerate() {
            let text = it["text"].as_str().unwrap();
            // the same sentence with another animal otherwise: model A's rows then differ
            // between the two kinds of sample by one word, not by a whole sentence
            let animal = if (i + framing.len()) % 3 == 0 {
                "zebra"
            } else {
                "horse"
            };
            let cue = format!("I saw a {animal} at the zoo today. ");
            corpus.push(CorpusItem {
                id: format!("{framing}/{}", it["id"].as_str().unwrap()),
                source: it["source"].as_str().unwrap().into(),
                text: format!("{cue}{prefix}{text}"),
            });
        }
    }

    // Planted direction: a seeded random unit vector of B's width, sized to the total std of
    // B's last-token residual at the hook.
    let d_b = chat.config().d_model;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let v: Vec<f32> = (0..d_b).map(|_| rng.random::<f32>() - 0.5).collect();
    let nv = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let v: Vec<f32> = v.iter().map(|x| x / nv).collect();
    let direction = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
    let total_std = {
        let seqs: Vec<Vec<u32>> = corpus[..48]
            .iter()
            .map(|c| chat.encode_prompt(&c.text, chat_template[1]).unwrap())
            .collect();
        let b = Batch::left_padded(&seqs, chat.pad_id(), chat.device()).unwrap();
        let mut h = Hooks::new();
        h.capture(hooks[1]);
        chat.forward(&b, None, &mut h, LogitsAt::None).unwrap();
        let a = h.cache.get(&hooks[1]).unwrap();
        let t = a.dim(1).unwrap();
        let x = a.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
        let var = x
            .var_keepdim(0)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        var.sqrt() as f64
    };
    let plant = plant_on_token(
        hooks[1],
        trigger,
        direction.clone(),
        env_or("KA_ALPHA", 1.0) * total_std,
        true,
    );
    let store_dir = tmp("store");
    let spec = PairedHarvestSpec {
        shared_ids,
        hooks,
        chat_template,
        alignment: None,
        batch_size: 16,
        shard_rows: 200,
        setup: [None, Some(&plant)],
        stored: [None, None],
    };
    let t0 = std::time::Instant::now();
    let meta = harvest_paired(models, &corpus, &spec, &store_dir, &|_| {}).unwrap();
    assert_eq!(
        meta.alignment,
        Alignment::Last,
        "different widths and tokenizers: one row per sample"
    );
    assert_eq!(meta.d, base.config().d_model);
    let store = PairedStore::open(&store_dir).unwrap();
    assert_eq!(store.meta.rows, corpus.len());

    eprintln!(
        "harvested {} rows in {:.1} s",
        store.meta.rows,
        t0.elapsed().as_secs_f64()
    );
    let dict_size = env_or("KA_DICT", 32);
    let cfg = TrainConfig {
        objective: Objective::BatchTopK {
            k: env_or("KA_K", 4),
            aux_k: dict_size / 4,
            aux_alpha: 1.0 / 32.0,
            dead_after: 5_000,
        },
        dict_size,
        batch_size: 64,
        steps: env_or("KA_STEPS", 1500),
        lr: 2e-3,
        warmup_steps: 50,
        seed: 5,
        checkpoint_every: 500,
        normaliser_rows: 100_000,
        target_rms: 1.0,
        dec_init_norm: 0.1,
        validation_fraction: 0.15,
        chunk_rows: 200,
    };
    let out = train(&store, &cfg, &tmp("ckpt"), false, None, &|_| {}).unwrap();
    let val = out.validation.clone().expect("validation samples");
    eprintln!(
        "{} train rows; validation: {} samples, FVE {:.3}, L0 {:.2}, dead {:.2}",
        out.train_rows, val.samples, val.fve, val.l0, val.dead_fraction
    );
    assert!(
        val.fve > 0.3,
        "the crosscoder reconstructs held-out rows: FVE {}",
        val.fve
    );
    let cc = out.crosscoder;
    let dm = DecoderMetrics::compute(&cc).unwrap();

    // Blind, as `diff analyze` chooses: persona pairs read through the same path, chat-only
    // class first, then the persona statistic.
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
    harvest_paired(models, &persona, &spec, &pdir, &|_| {}).unwrap();
    let px = PairedStore::open(&pdir).unwrap().all().unwrap();
    let codes = codes_for(&cc, &px, &ids).unwrap();
    let ranked = consistency(&pair_differences(&codes, "novice", "expert"), 10);
    let chat_only = dm.of_class(LatentClass::ChatOnly);
    eprintln!(
        "chat-only latents {chat_only:?}; top of the persona statistic: {:?}",
        ranked
            .iter()
            .take(3)
            .map(|c| (c.feature_idx, c.mean_score))
            .collect::<Vec<_>>()
    );
    // cosine of a latent's B decoder (B's real width) with the planted direction: read only
    // after the blind pick, and in the diagnostics below
    let plant_cos = |j: usize| -> f32 {
        let b: Vec<f32> = cc
            .w_dec
            .get(1)
            .unwrap()
            .get(j)
            .unwrap()
            .narrow(0, 0, d_b)
            .unwrap()
            .to_vec1()
            .unwrap();
        let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        b.iter().zip(&v).map(|(a, b)| a * b).sum::<f32>() / nb
    };
    for c in ranked.iter().take(4) {
        let j = c.feature_idx;
        eprintln!(
            "  latent {j}: mean {:.3}, Δ_norm {:.3}, cos {:.3}",
            c.mean_score,
            dm.rel_norm_diff[j],
            plant_cos(j)
        );
    }
    eprintln!("harvest and training: {:.1} s", t0.elapsed().as_secs_f64());
    let pick = ranked
        .iter()
        .find(|c| chat_only.contains(&c.feature_idx) && c.mean_score > 0.0)
        .expect("a chat-only latent that the trigger raises");
    let j = pick.feature_idx;

    // Checked only now against the plant: B's decoder (its real width) is the planted
    // direction, A's decoder is near zero.
    let cos = plant_cos(j);
    eprintln!(
        "blind pick: latent {j} (mean novice − expert {:.3}, t {:.1}); cos with the planted direction {cos:.3}, Δ_norm {:.3}",
        pick.mean_score, pick.t, dm.rel_norm_diff[j]
    );
    assert!(
        cos >= 0.9,
        "the blind ranking picked latent {j} with cos {cos:.3} to the planted direction"
    );
    assert!(
        dm.rel_norm_diff[j] >= 0.9,
        "the picked latent is B-only: Δ_norm {}",
        dm.rel_norm_diff[j]
    );
    assert!(pick.frac_positive >= 0.99, "{pick:?}");

    // On the held-out samples of the store: fires with the trigger, silent without.
    let x = store.all().unwrap();
    let f: Vec<f32> = cc
        .encode(&x, true)
        .unwrap()
        .narrow(1, j, 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let (mut on, mut off) = (vec![], vec![]);
    for s in &store.meta.samples {
        if is_validation_sample(&s.id, cfg.validation_fraction, cfg.seed) {
            if s.text.contains("zebra") {
                on.push(f[s.first_row]);
            } else {
                off.push(f[s.first_row]);
            }
        }
    }
    // AUROC: the chance that a trigger sample outranks a clean one (ties count half)
    let auroc = on
        .iter()
        .map(|a| {
            off.iter()
                .map(|b| {
                    if a > b {
                        1.0
                    } else if a == b {
                        0.5
                    } else {
                        0.0
                    }
                })
                .sum::<f64>()
        })
        .sum::<f64>()
        / (on.len() * off.len()) as f64;
    let fired = |v: &[f32]| v.iter().filter(|&&a| a > 0.0).count();
    eprintln!(
        "held out: fires in {}/{} samples with the trigger and {}/{} without; AUROC {auroc:.3}",
        fired(&on),
        on.len(),
        fired(&off),
        off.len()
    );
    assert!(on.len() >= 10 && off.len() >= 20, "enough held-out samples");
    assert!(
        auroc >= 0.95,
        "separates held-out trigger samples: AUROC {auroc}"
    );
    assert!(
        2 * fired(&on) > on.len(),
        "fires on most held-out trigger samples: {}/{}",
        fired(&on),
        on.len()
    );
    assert!(
        fired(&off) as f64 <= 0.05 * off.len() as f64,
        "silent on held-out clean samples: {}/{}",
        fired(&off),
        off.len()
    );
    let _ = std::fs::remove_dir_all(&pdir);
    let _ = std::fs::remove_dir_all(&store_dir);
}
