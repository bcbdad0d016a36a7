//! Training on synthetic paired data with known sparse structure (no model needed): both
//! objectives learn it, BatchTopK keeps k latents per example and learns its threshold, and the
//! saved crosscoder reloads (dictionary_learning layout) with the same outputs.

use candle_core::{Device, Tensor};
use persona_lens_diffing::paired::{Alignment, PairedMeta, PairedStore, PairedWriter};
use persona_lens_diffing::train::{train, Objective, TrainConfig};
use persona_lens_diffing::{load_dictionary, Dictionary, Sparsity};
use rand::{Rng, SeedableRng};

/// 32 ground-truth features (unit directions per model), 3 active per row, shared by both
/// models except features 0-3, which exist only in model 1 (chat).
fn store(dir: &std::path::Path) -> PairedStore {
    let (d, nf, rows) = (24usize, 32usize, 6000usize);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut dirs = vec![vec![0f32; 2 * d]; nf];
    for f in dirs.iter_mut() {
        for x in f.iter_mut() {
            *x = rng.random::<f32>() - 0.5;
        }
    }
    let meta = PairedMeta {
        models: vec!["a".into(), "b".into()],
        model_paths: vec![],
        hooks: vec!["h".into(), "h".into()],
        chat_template: vec![false, false],
        shared_ids: None,
        alignment: Alignment::Last,
        dims: vec![d, d],
        d,
        rows: 0,
        shards: vec![],
        samples: vec![],
        corpus: "synthetic".into(),
        tool: "test".into(),
        sharding: None,
    };
    let mut w = PairedWriter::new(dir, 2500, meta).unwrap();
    let mut v = vec![0f32; rows * 2 * d];
    for r in 0..rows {
        for _ in 0..3 {
            let f = rng.random_range(0..nf);
            let a = 1.0 + rng.random::<f32>();
            for m in 0..2 {
                if f < 4 && m == 0 {
                    continue;
                }
                for j in 0..d {
                    v[r * 2 * d + m * d + j] += a * dirs[f][m * d + j];
                }
            }
        }
    }
    w.push(Tensor::from_vec(v, (rows, 2, d), &Device::Cpu).unwrap())
        .unwrap();
    w.finish().unwrap();
    PairedStore::open(dir).unwrap()
}

#[test]
fn both_objectives_learn_sparse_structure_and_save() {
    let dir = std::env::temp_dir().join(format!("pl-train-syn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let st = store(&dir.join("store"));
    assert_eq!(st.meta.shards.len(), 3);
    let base = TrainConfig {
        objective: Objective::L1 { l1_coeff: 0.1 },
        dict_size: 64,
        batch_size: 128,
        steps: 600,
        lr: 3e-3,
        warmup_steps: 30,
        seed: 0,
        checkpoint_every: 0,
        normaliser_rows: 100_000,
        target_rms: 1.0,
        dec_init_norm: 0.1,
        validation_fraction: 0.0,
        chunk_rows: 2500,
    };
    let x = st.all().unwrap();
    for objective in [
        Objective::L1 { l1_coeff: 0.1 },
        Objective::BatchTopK {
            k: 3,
            aux_k: 16,
            aux_alpha: 1.0 / 32.0,
            dead_after: 2000,
        },
    ] {
        let cfg = TrainConfig {
            objective,
            ..base.clone()
        };
        let out = train(&st, &cfg, &dir.join("ck"), false, None, &|_| {}).unwrap();
        let last = out.log.last().unwrap();
        eprintln!(
            "{objective:?}: FVE {:.3} L0 {:.2} dead {:.2}",
            last.fve, last.l0, last.dead_fraction
        );
        assert!(last.fve > 0.8, "{objective:?}: FVE {}", last.fve);
        let cc = out.crosscoder;
        if let Objective::BatchTopK { k, .. } = objective {
            assert!(
                (last.l0 - k as f64).abs() < 0.5,
                "top-k keeps k per example: {}",
                last.l0
            );
            match cc.sparsity {
                Sparsity::BatchTopK { threshold, .. } => {
                    assert!(threshold > 0.0, "threshold learned: {threshold}")
                }
                s => panic!("{s:?}"),
            }
            // at inference the threshold gives about k active latents too
            let f = cc.encode(&x, true).unwrap();
            let l0 = f
                .gt(0f32)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                / x.dim(0).unwrap() as f32;
            assert!((1.0..=9.0).contains(&l0), "threshold L0 {l0}");
        }
        // saved in dictionary_learning's layout, reloaded: same reconstruction
        let save = dir.join(cc.dict_class());
        cc.save(&save).unwrap();
        let Dictionary::CrossCoder(back) = load_dictionary(&save).unwrap() else {
            panic!()
        };
        let diff = (back.forward(&x).unwrap() - cc.forward(&x).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        // model-1-only features show up as chat-only latents
        let m = persona_lens_diffing::metrics::DecoderMetrics::compute(&cc).unwrap();
        let chat_only = m.count(persona_lens_diffing::metrics::LatentClass::ChatOnly);
        let mut rel = m.rel_norm_diff.clone();
        rel.sort_by(|a, b| b.total_cmp(a));
        eprintln!(
            "{objective:?}: {chat_only} chat-only latents; top Δ_norm {:?}",
            &rel[..6]
        );
        // the 4 model-1-only features: chat-only latents under L1 (its decoder-norm penalty
        // drives the base decoder to 0); BatchTopK has no such penalty, so their base decoders
        // shrink more slowly (Δ_norm ~0.89 after 600 steps)
        let high = rel.iter().filter(|&&r| r >= 0.85).count();
        assert!(
            high >= 4,
            "{objective:?}: {high} latents with Δ_norm >= 0.85"
        );
        if matches!(objective, Objective::L1 { .. }) {
            assert!(chat_only >= 4, "L1: {chat_only} chat-only latents");
        }
        let _ = std::fs::remove_dir_all(dir.join("ck"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The normaliser's mean and std come from the training samples only: held-out samples are
/// evaluated in a normalisation they did not set. Validation rows here sit at 100, training rows
/// at 1 ± 0.5, so one leaked validation row moves the mean.
#[test]
fn normaliser_statistics_exclude_validation_samples() {
    use persona_lens_diffing::paired::SampleInfo;
    use persona_lens_diffing::train::is_validation_sample;
    let dir = std::env::temp_dir().join(format!("pl-train-norm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (d, n, fraction, seed) = (4usize, 200usize, 0.2, 9u64);
    let meta = PairedMeta {
        models: vec!["a".into(), "b".into()],
        model_paths: vec![],
        hooks: vec!["h".into(), "h".into()],
        chat_template: vec![false, false],
        shared_ids: None,
        alignment: Alignment::Last,
        dims: vec![d, d],
        d,
        rows: 0,
        shards: vec![],
        samples: vec![],
        corpus: "synthetic".into(),
        tool: "test".into(),
        sharding: None,
    };
    let mut w = PairedWriter::new(&dir, 64, meta).unwrap();
    let (mut train_sum, mut n_train) = (0f64, 0usize);
    for i in 0..n {
        let id = format!("s{i}");
        let val = is_validation_sample(&id, fraction, seed);
        let x: f32 = if val {
            100.0
        } else {
            1.0 + if i % 2 == 0 { 0.5 } else { -0.5 }
        };
        if !val {
            train_sum += x as f64;
            n_train += 1;
        }
        w.meta.samples.push(SampleInfo {
            id,
            source: "s".into(),
            text: String::new(),
            first_row: i,
            n_rows: 1,
            tokens: vec![],
            stored_rows: vec![],
        });
        w.push(Tensor::full(x, (1, 2, d), &Device::Cpu).unwrap())
            .unwrap();
    }
    w.finish().unwrap();
    let st = PairedStore::open(&dir).unwrap();
    assert!(
        n_train > 100 && n_train < n,
        "both splits hold samples: {n_train}"
    );
    let cfg = TrainConfig {
        objective: Objective::L1 { l1_coeff: 0.1 },
        dict_size: 8,
        batch_size: 16,
        steps: 1,
        lr: 1e-3,
        warmup_steps: 1,
        seed,
        checkpoint_every: 0,
        normaliser_rows: 100_000,
        target_rms: 1.0,
        dec_init_norm: 0.1,
        validation_fraction: fraction,
        chunk_rows: 64,
    };
    let out = train(&st, &cfg, &dir.join("ck"), false, None, &|_| {}).unwrap();
    let norm = out
        .crosscoder
        .normaliser
        .expect("a trained crosscoder keeps its normaliser");
    let mean: Vec<f32> = norm.mean.flatten_all().unwrap().to_vec1().unwrap();
    let want = train_sum / n_train as f64;
    for m in mean {
        assert!(
            (m as f64 - want).abs() < 1e-4,
            "normaliser mean {m} vs the training rows' mean {want}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
