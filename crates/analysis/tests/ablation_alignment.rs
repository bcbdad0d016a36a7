//! Known answers for mean and resample ablation, planted in a z bank built by hand: the donor's
//! z at position j is the constant j + 1 (every head, every dim), so the value an ablated head
//! reads tells which donor position it got. Runs on the tiny Llama checkpoint (HF layout).

use candle_core::{DType, Device, Tensor};
use persona_lens_analysis::heads::{add_ablation, end_aligned, AblationMode, Head, ZBank};
use persona_lens_engine::{Batch, HookName, HookPoint, Hooks, LoadOptions, LogitsAt, Model};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn tiny() -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny-models/tiny-llama");
    Model::load(dir.to_str().unwrap(), &dir, &LoadOptions::default()).unwrap()
}

/// A donor of `len` positions whose z at position j is j + 1.
fn donor(len: usize, h: usize, hd: usize) -> Tensor {
    let v: Vec<f32> = (0..len)
        .flat_map(|j| std::iter::repeat_n(j as f32 + 1.0, h * hd))
        .collect();
    Tensor::from_vec(v, (len, h, hd), &Device::Cpu).unwrap()
}

#[test]
fn end_aligned_maps_last_to_last() {
    // Row of 5, donor of 8: positions 0..5 -> donor 3..8.
    assert_eq!(
        (0..5).map(|p| end_aligned(p, 5, 8)).collect::<Vec<_>>(),
        vec![3, 4, 5, 6, 7]
    );
    // Row of 6, donor of 3: the first three clamp to the donor's first position.
    assert_eq!(
        (0..6).map(|p| end_aligned(p, 6, 3)).collect::<Vec<_>>(),
        vec![0, 0, 0, 0, 1, 2]
    );
}

/// Through the hooks, in a left-padded batch: each row's last position reads its donor's last
/// z, whatever the lengths (a start-aligned replacement would give a longer donor's middle).
#[test]
fn resample_is_end_aligned_in_padded_batches() {
    let m = tiny();
    let c = m.config().clone();
    let (h, hd) = (c.n_heads, c.head_dim);
    let layer = 1;
    let mut z = BTreeMap::new();
    z.insert(layer, vec![donor(9, h, hd), donor(3, h, hd)]);
    let bank = ZBank::from_z(z).unwrap();
    // Row 0: 5 tokens, donor 0 (9 positions); row 1: 7 tokens, donor 1 (3 positions).
    let seqs = vec![vec![5, 6, 7, 8, 9], vec![10, 11, 12, 13, 14, 15, 16]];
    let batch = Batch::left_padded(&seqs, 0, m.device()).unwrap();
    let heads = [Head { layer, head: 1 }];
    let mut hooks = Hooks::new();
    add_ablation(
        &mut hooks,
        &heads,
        AblationMode::Resample,
        Some(&bank),
        &[0, 1],
    )
    .unwrap();
    let name = HookName::block(layer, HookPoint::AttnZ);
    hooks.capture(name);
    m.forward(&batch, None, &mut hooks, LogitsAt::Last).unwrap();
    let zc = hooks.cache.get(&name).unwrap(); // [2, 7, H, hd], after the intervention
    let read = |r: usize, i: usize, head: usize| -> f32 {
        zc.get(r)
            .unwrap()
            .get(i)
            .unwrap()
            .get(head)
            .unwrap()
            .get(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    // Row 0 is padded by 2: its positions 0..5 sit at indices 2..7 and map to donor 4..9.
    for p in 0..5 {
        assert_eq!(
            read(0, 2 + p, 1),
            (end_aligned(p, 5, 9) + 1) as f32,
            "row 0 position {p}"
        );
    }
    assert_eq!(
        read(0, 6, 1),
        9.0,
        "row 0's last position reads donor 0's last (9th) z"
    );
    assert_eq!(
        read(1, 6, 1),
        3.0,
        "row 1's last position reads donor 1's last (3rd) z"
    );
    assert_eq!(
        read(1, 0, 1),
        1.0,
        "row 1's first position clamps to donor 1's first"
    );
    // The other heads are untouched (not a planted constant).
    assert_ne!(read(0, 6, 0), 9.0);
}

/// During cached generation the row's end moves: each new token reads the donor's last z.
#[test]
fn resample_end_follows_the_kv_cache() {
    let m = tiny();
    let c = m.config().clone();
    let layer = 2;
    let mut z = BTreeMap::new();
    z.insert(layer, vec![donor(6, c.n_heads, c.head_dim)]);
    let bank = ZBank::from_z(z).unwrap();
    let mut hooks = Hooks::new();
    add_ablation(
        &mut hooks,
        &[Head { layer, head: 0 }],
        AblationMode::Resample,
        Some(&bank),
        &[0],
    )
    .unwrap();
    let name = HookName::block(layer, HookPoint::AttnZ);
    hooks.capture(name);
    let opts = persona_lens_engine::GenerateOptions {
        max_new_tokens: 3,
        ..Default::default()
    };
    persona_lens_engine::generate(&m, &[vec![5, 6, 7, 8]], &opts, &mut hooks).unwrap();
    let zc = hooks.cache.get(&name).unwrap(); // [1, 4 + 2, H, hd]: prompt, then one per step
    let last: Vec<f32> = (0..zc.dim(1).unwrap())
        .map(|i| {
            zc.get(0)
                .unwrap()
                .get(i)
                .unwrap()
                .get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        })
        .collect();
    assert_eq!(last, vec![3.0, 4.0, 5.0, 6.0, 6.0, 6.0], "{last:?}");
}

/// The mean leaves out position 0 (BOS / the sink): with donors 1..=n per position, the mean is
/// that of 2..=n over both prompts, not of 1..=n.
#[test]
fn mean_ablation_leaves_out_the_first_position() {
    let (h, hd) = (2, 3);
    let mut z = BTreeMap::new();
    z.insert(0, vec![donor(4, h, hd), donor(2, h, hd)]);
    let bank = ZBank::from_z(z).unwrap();
    let mean: Vec<f32> = bank.mean[&0].flatten_all().unwrap().to_vec1().unwrap();
    // positions 1..4 of the first (values 2, 3, 4) and 1..2 of the second (value 2): mean 11/4.
    assert!(mean.iter().all(|&v| (v - 2.75).abs() < 1e-6), "{mean:?}");
    // A real bank from the model: the mean equals the hand mean over positions >= 1.
    let m = tiny();
    let prompts = vec![vec![5u32, 6, 7, 8, 9], vec![20, 21, 22]];
    let bank = ZBank::collect(&m, &prompts, &[1]).unwrap();
    let rest: Vec<Tensor> = bank.z[&1]
        .iter()
        .map(|t| t.narrow(0, 1, t.dim(0).unwrap() - 1).unwrap())
        .collect();
    let want = Tensor::cat(&rest, 0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .mean(0)
        .unwrap();
    let got = bank.mean[&1].to_dtype(DType::F64).unwrap();
    let d: f64 = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d < 1e-6, "{d}");
}

/// Random baseline head sets never contain the selected heads, have the selected count, and
/// depend only on the seed.
#[test]
fn random_head_sets_exclude_the_selected_heads() {
    use persona_lens_analysis::heads::random_head_sets;
    let m = tiny(); // 3 layers x 4 heads
    let selected = vec![Head { layer: 0, head: 1 }, Head { layer: 2, head: 3 }];
    let sets = random_head_sets(&m, 2, 40, 9, &selected);
    assert_eq!(sets.len(), 40);
    for s in &sets {
        assert_eq!(s.len(), 2);
        assert!(s.iter().all(|h| !selected.contains(h)), "{s:?}");
    }
    // 10 eligible heads: over 40 draws every one of them shows up.
    let mut seen: Vec<Head> = sets.concat();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 10);
    assert_eq!(sets, random_head_sets(&m, 2, 40, 9, &selected));
}
