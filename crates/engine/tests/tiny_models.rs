//! Hugging Face directory layout (config.json + model.safetensors) on the tiny random-weight
//! checkpoints with HF reference activations (`tests/fixtures/tiny-models/README.md`).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use persona_lens_engine::{Batch, HookName, HookPoint, Hooks, LoadOptions, LogitsAt, Model};

fn check(name: &str) {
    let dir = fixtures().join("tiny-models").join(name);
    let m = Model::load(
        dir.to_str().unwrap(),
        &models_dir(),
        &LoadOptions::default(),
    )
    .unwrap();
    let g = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let seqs: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    let n = m.config().n_layers;
    let batch = Batch::left_padded(&seqs, 0, m.device()).unwrap();
    let mut hooks = Hooks::new();
    hooks.capture(HookName::global(HookPoint::Embed));
    for l in 0..n {
        hooks.capture(HookName::block(l, HookPoint::ResidPost));
    }
    hooks.capture(HookName::global(HookPoint::LnFinal));
    let logits = m
        .forward(&batch, None, &mut hooks, LogitsAt::All)
        .unwrap()
        .unwrap();
    for i in 0..=n {
        let h = if i == 0 {
            HookName::global(HookPoint::Embed)
        } else if i == n {
            HookName::global(HookPoint::LnFinal) // HF's last hidden state is after the final norm
        } else {
            HookName::block(i - 1, HookPoint::ResidPost)
        };
        let got = hooks
            .cache
            .get(&h)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = g[&format!("hidden_states.{i}")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let e = rel_l2(&got, &want);
        assert!(e < 1e-5, "{name} hidden_states.{i}: relative error {e:.2e}");
    }
    let d = max_abs_diff(&logits, &g["logits"]);
    assert!(d < 1e-4, "{name} logits max abs diff {d}");

    // Left-padded batch: row 1's real positions equal the reference padded logits.
    let mask: Vec<Vec<i64>> = g["attention_mask"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2()
        .unwrap();
    let pids: Vec<Vec<u32>> = g["padded_input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let pad: Vec<usize> = mask
        .iter()
        .map(|r| r.iter().take_while(|&&x| x == 0).count())
        .collect();
    let pb = Batch {
        ids: Tensor::new(pids.clone(), m.device()).unwrap(),
        pad: pad.clone(),
        lens: pids.iter().zip(&pad).map(|(r, p)| r.len() - p).collect(),
    };
    let pl = m
        .forward(&pb, None, &mut Hooks::new(), LogitsAt::All)
        .unwrap()
        .unwrap();
    for (r, &p) in pad.iter().enumerate() {
        let t = pids[r].len() - p;
        let got = pl.get(r).unwrap().narrow(0, p, t).unwrap();
        let want = g["padded_logits"].get(r).unwrap().narrow(0, p, t).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "{name} padded row {r}: logits max abs diff {d}");
    }
}

#[test]
fn tiny_gemma3_matches_hf() {
    check("tiny-gemma3");
}

#[test]
fn tiny_llama_matches_hf() {
    check("tiny-llama");
}

#[test]
fn hook_result_sums_to_attn_out_and_interventions_apply() {
    // Gemma's post-attention norm: per-head results must still sum to hook_attn_out.
    let dir = fixtures().join("tiny-models/tiny-gemma3");
    let m = Model::load(
        dir.to_str().unwrap(),
        &models_dir(),
        &LoadOptions::default(),
    )
    .unwrap();
    let batch = Batch::left_padded(&[vec![5, 6, 7, 8, 9, 10]], 0, m.device()).unwrap();
    let mut hooks = Hooks::new();
    let (res, out) = (
        HookName::block(2, HookPoint::AttnResult),
        HookName::block(2, HookPoint::AttnOut),
    );
    hooks.capture(res).capture(out);
    let base = m
        .forward(&batch, None, &mut hooks, LogitsAt::Last)
        .unwrap()
        .unwrap();
    let sum = hooks.cache.get(&res).unwrap().sum(2).unwrap();
    let e = rel_l2(
        &sum.flatten_all().unwrap().to_vec1().unwrap(),
        &hooks
            .cache
            .get(&out)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
    );
    assert!(e < 1e-5, "sum of hook_result vs hook_attn_out: {e:.2e}");

    // Zeroing head 0's z at position 3 changes logits; layers before are untouched.
    let mut h2 = Hooks::new();
    h2.capture(HookName::block(1, HookPoint::ResidPost));
    h2.intervene(
        HookName::block(2, HookPoint::AttnZ),
        persona_lens_engine::Op::Zero,
        persona_lens_engine::Selector::all()
            .positions(vec![3])
            .heads(vec![0]),
    );
    let mut h1 = Hooks::new();
    h1.capture(HookName::block(1, HookPoint::ResidPost));
    let _ = m.forward(&batch, None, &mut h1, LogitsAt::Last).unwrap();
    let patched = m
        .forward(&batch, None, &mut h2, LogitsAt::Last)
        .unwrap()
        .unwrap();
    let d = max_abs_diff(&patched, &base);
    assert!(d > 1e-4, "ablation had no effect ({d})");
    let a = h1
        .cache
        .get(&HookName::block(1, HookPoint::ResidPost))
        .unwrap();
    let b = h2
        .cache
        .get(&HookName::block(1, HookPoint::ResidPost))
        .unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}
