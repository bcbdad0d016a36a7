//! The analysis reads a prompt's paired row from the store when the store already holds that
//! prompt (same id and text, model files, hooks and rendering), and runs the models only on
//! the rest. Real gemma-3-270m on both sides; the chat side of the store carries a planted
//! direction, so a row that came from the store is told apart from a fresh forward by the plant
//! alone, and the base side (no plant) checks that the store row read is the prompt's last
//! token.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use candle_core::{Device, Tensor};
use persona_lens_diffing::analyze::{rows_of, AnalyzeSpec};
use persona_lens_diffing::harvest::{
    harvest_paired, middle_resid_post, plant_on_token, CorpusItem, PairedHarvestSpec,
};
use persona_lens_diffing::paired::{Alignment, PairedStore};

fn tmp(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("pl-reuse-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn item(id: &str, text: &str) -> CorpusItem {
    CorpusItem {
        id: id.into(),
        source: "persona".into(),
        text: text.into(),
    }
}

#[test]
fn analysis_rows_come_from_the_store_only_where_it_holds_the_same_clean_prompt() {
    let m = common::model("gemma-3-270m");
    let models = [&*m, &*m];
    let hook = middle_resid_post(&m);
    let d = m.config().d_model;
    // The plant switches on at the first token (BOS) and stays on: every chat-side row moves.
    let bos = m.encode_prompt("x", false).unwrap()[0];
    let mut direction = vec![0f32; d];
    direction[7] = 1.0;
    let plant = plant_on_token(
        hook,
        bos,
        Tensor::from_vec(direction, d, &Device::Cpu).unwrap(),
        50.0,
        true,
    );
    let stored = [
        item("a", "I am a child. Why is the sky blue?"),
        item("b", "I have a PhD. Why is the sky blue?"),
        item("c", "I am a child. What is a star made of?"),
    ];
    let dir = tmp("store");
    let hs = PairedHarvestSpec {
        hooks: [hook, hook],
        chat_template: [false, false],
        shared_ids: true,
        alignment: Some(Alignment::Tokens),
        batch_size: 2,
        shard_rows: 7, // several shards, so rows are gathered across them
        setup: [None, Some(&plant)],
        stored: [None, None],
    };
    harvest_paired(models, &stored, &hs, &dir, &|_| {}).unwrap();
    let planted = PairedStore::open(&dir).unwrap();
    assert!(planted.meta.shards.len() > 1);
    assert_eq!(
        planted.meta.shared_ids, None,
        "a store made with an intervention must not pass for plain forwards"
    );

    // Asked in another order, with one prompt the store lacks and one whose text changed.
    let asked = [
        item("new", "I have a PhD. What is a star made of?"),
        stored[1].clone(),
        item("c", "I am a child. What is a planet made of?"),
        stored[0].clone(),
    ];
    fn spec(hook: persona_lens_engine::HookName, store: Option<&PairedStore>) -> AnalyzeSpec<'_> {
        AnalyzeSpec {
            hooks: [hook, hook],
            chat_template: [false, false],
            shared_ids: true,
            alignment: Some(Alignment::Last),
            batch_size: 3,
            crosscoder: None,
            store,
            top_k: 5,
            n_verify: 0,
            seed: 0,
        }
    }
    let fresh = rows_of(models, &asked, &spec(hook, None), &tmp("fresh")).unwrap();
    assert_eq!(fresh.dims3().unwrap(), (4, 2, d));
    let chat = |x: &Tensor, i: usize| x.get(i).unwrap().get(1).unwrap();
    // Two forwards of one prompt in different batches (other padding, other kernel shapes,
    // MKL or gemm) agree to f32 rounding, not bitwise: gemma's middle residual reaches the
    // hundreds, so an absolute bound is no bound. Rows are compared as the golden tests
    // compare residual rows to HF: relative L2 error per row below 1e-4.
    let row_err = |a: &Tensor, b: &Tensor| -> f64 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        common::rel_l2(&a, &b)
    };
    let same_rows = |a: &Tensor, b: &Tensor| -> f64 {
        (0..a.dim(0).unwrap())
            .flat_map(|i| (0..2).map(move |s| (i, s)))
            .map(|(i, s)| {
                row_err(
                    &a.get(i).unwrap().get(s).unwrap(),
                    &b.get(i).unwrap().get(s).unwrap(),
                )
            })
            .fold(0.0, f64::max)
    };
    let base = |x: &Tensor, i: usize| x.get(i).unwrap().get(0).unwrap();

    // The planted store is not reused: every row equals a fresh forward.
    let refused = rows_of(models, &asked, &spec(hook, Some(&planted)), &tmp("refused")).unwrap();
    let e = same_rows(&refused, &fresh);
    assert!(
        e < 1e-4,
        "a refused store's rows differ from fresh forwards by {e:.2e}"
    );

    // The same rows recorded as plain forwards: the two held prompts come from the store (the
    // plant shows on their chat side), the other two are computed.
    let mut clean = planted.clone();
    clean.meta.shared_ids = Some(true);
    let reused = rows_of(models, &asked, &spec(hook, Some(&clean)), &tmp("reused")).unwrap();
    for i in [0, 2] {
        for side in 0..2 {
            let at = |x: &Tensor| x.get(i).unwrap().get(side).unwrap();
            let e = row_err(&at(&reused), &at(&fresh));
            assert!(
                e < 1e-4,
                "row {i} is not in the store and must be computed (relative L2 {e:.2e})"
            );
        }
    }
    for i in [1, 3] {
        let moved = (chat(&reused, i) - chat(&fresh, i))
            .unwrap()
            .get(7)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            moved > 10.0,
            "row {i}'s chat side must be the store's planted row (coordinate 7 moved {moved})"
        );
        // The base side carries no plant: the store's row is this prompt's last token.
        let gap = row_err(&base(&reused, i), &base(&fresh, i));
        assert!(
            gap < 1e-4,
            "row {i}'s base side differs from the prompt's last token by relative L2 {gap:.2e}"
        );
    }
    // Another rendering (each model its own ids) is a different forward: not reused.
    let mut own = spec(hook, Some(&clean));
    own.shared_ids = false;
    let other = rows_of(models, &asked, &own, &tmp("own")).unwrap();
    let e = same_rows(&other, &fresh);
    assert!(
        e < 1e-4,
        "own-ids rows differ from fresh forwards by {e:.2e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Last-token rows of prompts in SmolLM2's chat template: the system turn every prompt starts
/// with runs once for all rows, and the stored rows agree with every row run whole (a no-op
/// setup turns the sharing off) at the golden tests' per-row tolerance (relative L2 < 1e-4).
#[test]
fn last_token_rows_sharing_the_chat_prefix_match_whole_rows() {
    let m = common::model("smollm2-135m-instruct");
    let models = [&*m, &*m];
    let hook = middle_resid_post(&m);
    let corpus: Vec<CorpusItem> = [
        "I am a child. Why is the sky blue?",
        "I have a PhD in physics. Why is the sky blue?",
        "I am five. What is a star made of?",
        "As a chemist, tell me what a star is made of.",
        "I'm a kid. How do magnets work?",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| item(&format!("p{i}"), t))
    .collect();
    let noop =
        |_: &[Vec<u32>], _: &persona_lens_engine::Batch, _: &mut persona_lens_engine::Hooks| Ok(());
    let store = |setup: bool, name: &str| {
        let dir = tmp(name);
        let hs = PairedHarvestSpec {
            hooks: [hook, hook],
            chat_template: [false, true],
            shared_ids: false,
            alignment: Some(Alignment::Last),
            batch_size: 3,
            shard_rows: 100,
            setup: [None, if setup { Some(&noop) } else { None }],
            stored: [None, None],
        };
        harvest_paired(models, &corpus, &hs, &dir, &|_| {}).unwrap();
        let s = PairedStore::open(&dir).unwrap();
        let rows = s.rows(0, corpus.len()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        rows
    };
    let (shared, whole) = (store(false, "shared"), store(true, "whole"));
    assert_eq!(
        shared.dims3().unwrap(),
        (corpus.len(), 2, m.config().d_model)
    );
    let mut worst = 0f64;
    for i in 0..corpus.len() {
        let a: Vec<f32> = shared.get(i).unwrap().get(1).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = whole.get(i).unwrap().get(1).unwrap().to_vec1().unwrap();
        let e = common::rel_l2(&a, &b);
        worst = worst.max(e);
        assert!(e < 1e-4, "prompt {i}: chat-side row relative error {e:.2e}");
    }
    eprintln!("chat-side rows sharing the system turn vs whole: worst relative error {worst:.2e}");
}

/// The study's diff step hands the probe step's stored harvest to the paired harvest: a sample
/// the harvest holds (same id, token count and last position, same model file and chat
/// rendering) takes its chat-side row from there, every other sample runs. The probe harvest is
/// made by the analysis crate's own harvester (its own batching and ordering), so the check that
/// every fresh store row equals the harvest's row is independent of the paired harvest's order.
#[test]
fn paired_harvest_reads_the_probe_harvest_where_it_holds_the_prompt() {
    use persona_lens_analysis::dataset::{generate, GenOptions};
    use persona_lens_analysis::harvest::harvest;
    use persona_lens_analysis::{resid_rows, HarvestSpec, PositionRule};
    let m = common::model("smollm2-135m-instruct");
    let models = [&*m, &*m];
    let hook = middle_resid_post(&m);
    let layer = hook.layer.unwrap();
    let ds = generate(&GenOptions {
        persona_pairs: vec!["child-phd".into()],
        topics: vec!["physics".into()],
        n_questions_per_pair: 2,
        templates: vec![0, 4],
        ..Default::default()
    })
    .unwrap();
    let probe = harvest(
        &m,
        &ds,
        &HarvestSpec {
            hooks: resid_rows(m.config().n_layers),
            rule: PositionRule::Last,
            chat: true,
            batch_size: 4,
            share_prefix: true,
        },
        &|_| {},
    )
    .unwrap();
    // resid_post of block L is resid_pre of block L + 1: the name the probe harvest keeps.
    let key = format!("blocks.{}.hook_resid_pre", layer + 1);
    let probe_row = |id: &str| -> Vec<f32> {
        let i = probe.meta.items.iter().position(|it| it.id == id).unwrap();
        probe.acts[&key].get(i).unwrap().to_vec1().unwrap()
    };
    // The dataset's prompts, one the harvest lacks, and a held id whose text changed.
    let mut corpus = persona_lens_diffing::corpus::from_dataset(&ds);
    corpus.push(item("new", "I am a child. What is a planet made of?"));
    let changed = ds.items[1].id.clone();
    corpus.push(item(
        &changed,
        "I have a PhD. What, precisely, is a planet made of?",
    ));
    let n_held = ds.items.len();
    let store = |stored, name: &str| {
        let dir = tmp(name);
        let hs = PairedHarvestSpec {
            hooks: [hook, hook],
            chat_template: [false, true],
            shared_ids: false,
            alignment: Some(Alignment::Last),
            batch_size: 3,
            shard_rows: 100,
            setup: [None, None],
            stored: [None, stored],
        };
        harvest_paired(models, &corpus, &hs, &dir, &|_| {}).unwrap();
        let s = PairedStore::open(&dir).unwrap();
        let rows = s.all().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        (s.meta, rows)
    };
    let ((fresh_meta, fresh), (read_meta, read)) = (
        store(None, "fresh-probe"),
        store(Some(&probe), "read-probe"),
    );
    let flags: Vec<Vec<usize>> = read_meta
        .samples
        .iter()
        .map(|s| s.stored_rows.clone())
        .collect();
    let mut want = vec![vec![1]; n_held];
    want.extend([vec![], vec![]]);
    assert_eq!(flags, want, "which samples came from the probe harvest");
    assert!(fresh_meta.samples.iter().all(|s| s.stored_rows.is_empty()));
    let ids: Vec<&str> = read_meta.samples.iter().map(|s| s.id.as_str()).collect();
    let corpus_ids: Vec<&str> = corpus.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, corpus_ids, "samples are written in corpus order");
    let row = |x: &Tensor, i: usize, side: usize| -> Vec<f32> {
        x.get(i).unwrap().get(side).unwrap().to_vec1().unwrap()
    };
    let mut worst = 0f64;
    for (i, it) in ds.items.iter().enumerate() {
        assert!(
            row(&read, i, 1) == probe_row(&it.id),
            "{}: not the harvest's row",
            it.id
        );
        // The same quantity: the probe's rendering is the paired harvest's.
        let e = common::rel_l2(&row(&fresh, i, 1), &probe_row(&it.id));
        worst = worst.max(e);
        assert!(
            e < 1e-4,
            "{}: fresh row vs the probe harvest's, relative L2 {e:.2e}",
            it.id
        );
    }
    eprintln!("fresh chat-side rows vs the probe harvest's: worst relative L2 {worst:.2e}");
    for i in 0..corpus.len() {
        // Base side: never stored, the same forwards in both stores.
        assert!(
            row(&read, i, 0) == row(&fresh, i, 0),
            "sample {i}'s base side differs"
        );
    }
    for i in [n_held, n_held + 1] {
        let e = common::rel_l2(&row(&read, i, 1), &row(&fresh, i, 1));
        assert!(
            e < 1e-4,
            "sample {i} is not in the harvest and must run (relative L2 {e:.2e})"
        );
    }
}
