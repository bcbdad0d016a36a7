//! A store harvested in parts (synthetic rows, no model needed): the joined manifest reads the
//! unsharded store's rows bitwise, trains the same crosscoder (the batch order follows rows, not
//! files), a partial store trains and resumes when its missing part arrives, and parts of other
//! harvests are refused. The real-model harvest in parts is tested in the CLI's `diff` tests.

use candle_core::{Device, Tensor};
use persona_lens_diffing::paired::{Alignment, PairedMeta, PairedStore, PairedWriter, SampleInfo};
use persona_lens_diffing::shards::{finished_part, write_manifest, ShardSpec};
use persona_lens_diffing::train::{train, Objective, TrainConfig};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

const D: usize = 6;
const SAMPLES: usize = 30;
const BATCH: usize = 4;
const FILE_ROWS: usize = 10;

fn meta() -> PairedMeta {
    PairedMeta {
        models: vec!["a".into(), "b".into()],
        model_paths: vec![],
        hooks: vec!["h".into(), "h".into()],
        chat_template: vec![false, false],
        shared_ids: None,
        alignment: Alignment::Tokens,
        dims: vec![D, D],
        d: D,
        rows: 0,
        shards: vec![],
        samples: vec![],
        corpus: "synthetic".into(),
        tool: "test".into(),
        sharding: None,
    }
}

/// Sample `i`: 1 + i % 5 rows (as per-token rows of prompts of different lengths); `salt`
/// changes the values (another harvest).
fn sample_rows(i: usize, salt: u64) -> Tensor {
    let n = 1 + i % 5;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1000 * salt + i as u64);
    let v: Vec<f32> = (0..n * 2 * D)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    Tensor::from_vec(v, (n, 2, D), &Device::Cpu).unwrap()
}

fn push_sample(w: &mut PairedWriter, i: usize, salt: u64) {
    let rows = sample_rows(i, salt);
    w.meta.samples.push(SampleInfo {
        id: format!("s{i}"),
        source: "synthetic".into(),
        text: format!("sample {i}"),
        first_row: w.meta.rows,
        n_rows: rows.dim(0).unwrap(),
        tokens: vec![],
        stored_rows: vec![],
    });
    w.push(rows).unwrap();
}

fn unsharded(dir: &Path) -> PairedStore {
    let mut w = PairedWriter::new(dir, FILE_ROWS, meta()).unwrap();
    for i in 0..SAMPLES {
        push_sample(&mut w, i, 0);
    }
    w.finish().unwrap();
    PairedStore::open(dir).unwrap()
}

fn write_part(dir: &Path, shard: ShardSpec, corpus: &str, salt: u64) {
    let range = shard.sample_range(SAMPLES, BATCH);
    let mut w = PairedWriter::part(dir, FILE_ROWS, meta(), shard).unwrap();
    for i in range.clone() {
        push_sample(&mut w, i, salt);
    }
    w.finish_part(shard, range, corpus.into(), SAMPLES).unwrap();
}

fn part(index: usize) -> ShardSpec {
    ShardSpec { index, count: 3 }
}

fn values(s: &PairedStore) -> Vec<f32> {
    s.all().unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        objective: Objective::L1 { l1_coeff: 0.1 },
        dict_size: 8,
        batch_size: 8,
        steps,
        lr: 1e-2,
        warmup_steps: 2,
        seed: 5,
        checkpoint_every: 5,
        normaliser_rows: 100_000,
        target_rms: 1.0,
        dec_init_norm: 0.1,
        validation_fraction: 0.0,
        // Chunks that cut across both layouts' files.
        chunk_rows: 16,
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pl-sharded-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn parts_join_into_the_unsharded_store_and_train_the_same_crosscoder() {
    let a = unsharded(&tmp("a"));
    let dir_b = tmp("b");
    // Parts finish in any order.
    for i in [2, 0, 1] {
        write_part(&dir_b, part(i), "corpus-1", 0);
    }
    let joined = write_manifest(&dir_b).unwrap();
    let b = PairedStore::open(&dir_b).unwrap();
    let s = joined.sharding.as_ref().unwrap();
    assert!(s.missing.is_empty());
    assert_eq!(
        s.parts.iter().map(|p| p.index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    // Different files ...
    assert_ne!(
        a.meta.shards.iter().map(|s| s.rows).collect::<Vec<_>>(),
        b.meta.shards.iter().map(|s| s.rows).collect::<Vec<_>>()
    );
    // ... the same rows, bitwise, and the same samples at the same rows.
    assert_eq!(a.meta.rows, b.meta.rows);
    assert_eq!(values(&a), values(&b));
    let key = |s: &PairedStore| -> Vec<(String, usize, usize)> {
        s.meta
            .samples
            .iter()
            .map(|x| (x.id.clone(), x.first_row, x.n_rows))
            .collect()
    };
    assert_eq!(key(&a), key(&b));

    // The same crosscoder: the same loss at every step and the same weights.
    let ta = train(&a, &cfg(30), &tmp("ck-a"), false, None, &|_| {}).unwrap();
    let tb = train(&b, &cfg(30), &tmp("ck-b"), false, None, &|_| {}).unwrap();
    let losses = |t: &persona_lens_diffing::train::TrainOutcome| -> Vec<f64> {
        t.log.iter().map(|s| s.loss).collect()
    };
    assert_eq!(losses(&ta).len(), 30);
    assert_eq!(losses(&ta), losses(&tb));
    let w = |t: &persona_lens_diffing::train::TrainOutcome| -> Vec<f32> {
        t.crosscoder.w_dec.flatten_all().unwrap().to_vec1().unwrap()
    };
    assert_eq!(w(&ta), w(&tb));
}

#[test]
fn a_partial_store_trains_and_resumes_when_its_missing_part_arrives() {
    let dir = tmp("partial");
    write_part(&dir, part(0), "corpus-1", 0);
    write_part(&dir, part(2), "corpus-1", 0);
    let partial = write_manifest(&dir).unwrap();
    assert_eq!(partial.sharding.as_ref().unwrap().missing, vec![1]);
    let partial_rows = partial.rows;
    let store = PairedStore::open(&dir).unwrap();
    let ck = tmp("ck-partial");
    let first = train(&store, &cfg(20), &ck, true, Some(10), &|_| {}).unwrap();
    assert!(!first.finished);

    write_part(&dir, part(1), "corpus-1", 0);
    let full = write_manifest(&dir).unwrap();
    assert!(full.rows > partial_rows);
    let grown = PairedStore::open(&dir).unwrap();
    let resumed = train(&grown, &cfg(20), &ck, true, None, &|_| {}).unwrap();
    assert!(resumed.finished);
    assert_eq!(resumed.resumed_from, 10);
    assert_eq!(resumed.store_grew_from, Some(partial_rows));
    // The checkpoint's normaliser goes on (statistics of the partial store, not the grown one).
    let norm = resumed.crosscoder.normaliser.as_ref().unwrap();
    let first_norm = first.crosscoder.normaliser.as_ref().unwrap();
    let v = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    assert_eq!(v(&norm.mean), v(&first_norm.mean));

    // A store whose part was replaced by other data is not the checkpoint's store grown.
    let other = tmp("other");
    write_part(&other, part(0), "corpus-1", 7);
    write_part(&other, part(1), "corpus-1", 0);
    write_part(&other, part(2), "corpus-1", 0);
    write_manifest(&other).unwrap();
    let ck2 = tmp("ck-other");
    train(&store, &cfg(20), &ck2, true, Some(10), &|_| {}).unwrap();
    let e = match train(
        &PairedStore::open(&other).unwrap(),
        &cfg(20),
        &ck2,
        true,
        None,
        &|_| {},
    ) {
        Ok(_) => panic!("resumed on a store with a replaced part"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("other settings or data") && !e.contains('\n'),
        "{e}"
    );
}

#[test]
fn finished_parts_are_checked_and_other_harvests_refused() {
    let dir = tmp("check");
    write_part(&dir, part(0), "corpus-1", 0);
    assert!(finished_part(&dir, part(0), "corpus-1").unwrap().is_some());
    assert!(finished_part(&dir, part(1), "corpus-1").unwrap().is_none());
    // Another corpus in the same folder: refused in one line.
    let e = finished_part(&dir, part(0), "corpus-2")
        .unwrap_err()
        .to_string();
    assert!(e.contains("another corpus") && !e.contains('\n'), "{e}");
    // A damaged file: the part counts as unfinished (it is harvested again on --resume).
    let m = finished_part(&dir, part(0), "corpus-1").unwrap().unwrap();
    let f = dir.join(&m.part.files[0].file);
    let mut bytes = std::fs::read(&f).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    assert!(finished_part(&dir, part(0), "corpus-1").unwrap().is_none());
    // Parts of another corpus do not join.
    write_part(&dir, part(1), "corpus-2", 0);
    let e = write_manifest(&dir).unwrap_err().to_string();
    assert!(e.contains("different harvests") && !e.contains('\n'), "{e}");
    // An empty folder is a typed error (the command line adds the command that makes a part).
    let empty = tmp("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = write_manifest(&empty).unwrap_err();
    assert!(
        matches!(&e, persona_lens_diffing::DiffError::NoParts { dir } if dir == &empty),
        "{e}"
    );
    let e = e.to_string();
    assert!(e.contains("no finished parts") && !e.contains('\n'), "{e}");
}
