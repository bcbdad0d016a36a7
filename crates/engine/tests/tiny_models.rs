//! Hugging Face directory layout (config.json + model.safetensors) on the tiny random-weight
//! checkpoints with HF reference activations (`tests/fixtures/tiny-models/README.md`).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use persona_lens_engine::config::RopeScaling;
use persona_lens_engine::{
    generate, Batch, GenerateOptions, HookName, HookPoint, Hooks, LoadOptions, LogitsAt, Model,
};
use std::path::{Path, PathBuf};

fn check(name: &str) {
    let dir = fixtures().join("tiny-models").join(name);
    check_dir(name, &dir);
}

/// The checkpoint with transformers 5's `config.v5.json` as its `config.json` (weights linked).
fn v5_dir(name: &str) -> PathBuf {
    let src = fixtures().join("tiny-models").join(name);
    let d = std::env::temp_dir().join(format!("pl-v5-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(src.join("config.v5.json"), d.join("config.json")).unwrap();
    for f in ["model.safetensors", "golden.safetensors"] {
        std::os::unix::fs::symlink(src.join(f), d.join(f)).unwrap();
    }
    d
}

/// Both config layouts of a second-set checkpoint: activations, logits, padding, and the greedy
/// continuation with and without the KV cache.
fn check_both_layouts(name: &str) {
    check(name);
    let d = v5_dir(name);
    check_dir(&format!("{name} (config.v5.json)"), &d);
    let _ = std::fs::remove_dir_all(&d);
}

fn check_dir(name: &str, dir: &Path) {
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
    for l in 0..n {
        hooks.capture(HookName::block(l, HookPoint::ResidPre));
        hooks.capture(HookName::block(l, HookPoint::ResidPost));
    }
    hooks.capture(HookName::global(HookPoint::LnFinal));
    let logits = m
        .forward(&batch, None, &mut hooks, LogitsAt::All)
        .unwrap()
        .unwrap();
    let mut worst = 0f64;
    for i in 0..=n {
        // HF's hidden_states[0] is the input of block 0: scaled embeddings (Gemma), token plus
        // position embeddings (GPT-2).
        let h = if i == 0 {
            HookName::block(0, HookPoint::ResidPre)
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
        worst = worst.max(e as f64);
    }
    let d = max_abs_diff(&logits, &g["logits"]);
    println!("{name}: worst hidden-state relative error {worst:.2e}, logits max abs diff {d:.2e}");
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

    // Greedy continuation of input_ids[0, :12] (second set), with and without the KV cache.
    if let Some(want) = g.get("generated_ids") {
        let want: Vec<u32> = want.to_dtype(DType::U32).unwrap().to_vec1().unwrap();
        let prompt = seqs[0][..12].to_vec();
        // With length-dependent frequencies (dynamic NTK, LongRoPE past its original length) a
        // full recompute and cached decoding are different computations, in HF too: HF's
        // reference is the cached one.
        let length_dependent = matches!(
            m.config().rope_scaling,
            Some(RopeScaling::Dynamic { .. } | RopeScaling::Longrope { .. })
        );
        let modes: &[bool] = if length_dependent {
            &[true]
        } else {
            &[true, false]
        };
        for &use_kv_cache in modes {
            let opts = GenerateOptions {
                max_new_tokens: want.len(),
                use_kv_cache,
                ..Default::default()
            };
            let got = generate(&m, std::slice::from_ref(&prompt), &opts, &mut Hooks::new())
                .unwrap()
                .remove(0)
                .generated_ids;
            assert_eq!(
                got, want,
                "{name}: greedy continuation (kv cache {use_kv_cache})"
            );
        }
    }
}

#[test]
fn tiny_gpt2_matches_hf() {
    check("tiny-gpt2");
}

#[test]
fn tiny_gemma2_matches_hf() {
    check("tiny-gemma2");
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
fn tiny_qwen2_matches_hf() {
    check_both_layouts("tiny-qwen2");
}

#[test]
fn tiny_qwen3_matches_hf() {
    check_both_layouts("tiny-qwen3");
}

#[test]
fn tiny_mistral_matches_hf() {
    check_both_layouts("tiny-mistral");
}

#[test]
fn tiny_llama3_matches_hf() {
    check_both_layouts("tiny-llama3");
}

#[test]
fn tiny_gemma3_scaled_matches_hf() {
    check_both_layouts("tiny-gemma3-scaled");
}

#[test]
fn tiny_gemma2_caps_matches_hf() {
    check_both_layouts("tiny-gemma2-caps");
}

#[test]
fn tiny_phi3_matches_hf() {
    check_both_layouts("tiny-phi3");
}

#[test]
fn tiny_olmo2_matches_hf() {
    check_both_layouts("tiny-olmo2");
}

#[test]
fn tiny_qwen2_yarn_matches_hf() {
    check_both_layouts("tiny-qwen2-yarn");
}

#[test]
fn tiny_llama_dynamic_matches_hf() {
    check_both_layouts("tiny-llama-dynamic");
}

#[test]
fn tiny_phi3_longrope_matches_hf() {
    check_both_layouts("tiny-phi3-longrope");
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

fn load_tiny(name: &str) -> Model {
    let dir = fixtures().join("tiny-models").join(name);
    Model::load(
        dir.to_str().unwrap(),
        &models_dir(),
        &LoadOptions::default(),
    )
    .unwrap()
}

#[test]
fn gpt2_hooks_follow_transformer_lens() {
    // hook_embed + hook_pos_embed = blocks.0.hook_resid_pre; sum of hook_result + b_O =
    // hook_attn_out; resid_mid = resid_pre + attn_out; zeroing hook_pos_embed changes the output.
    let m = load_tiny("tiny-gpt2");
    assert_eq!(m.config().arch.name(), "gpt2");
    let batch = Batch::left_padded(&[vec![5, 6, 7, 8, 9, 10]], 0, m.device()).unwrap();
    let mut hooks = Hooks::new();
    let names = m
        .resolve_hooks("hook_embed,hook_pos_embed,blocks.1.*")
        .unwrap();
    hooks.capture_all(&names);
    let base = m
        .forward(&batch, None, &mut hooks, LogitsAt::Last)
        .unwrap()
        .unwrap();
    let get = |n: &str| -> Vec<f32> {
        hooks
            .cache
            .get(&HookName::parse(n, 3).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let emb: Vec<f32> = get("hook_embed")
        .iter()
        .zip(get("hook_pos_embed"))
        .map(|(a, b)| a + b)
        .collect();
    let mut h0 = Hooks::new();
    h0.capture(HookName::block(0, HookPoint::ResidPre));
    m.forward(&batch, None, &mut h0, LogitsAt::None).unwrap();
    let r0: Vec<f32> = h0
        .cache
        .get(&HookName::block(0, HookPoint::ResidPre))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(rel_l2(&emb, &r0) < 1e-7);
    let res = hooks
        .cache
        .get(&HookName::block(1, HookPoint::AttnResult))
        .unwrap()
        .sum(2)
        .unwrap();
    let g = candle_core::safetensors::load(
        fixtures().join("tiny-models/tiny-gpt2/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let with_bias: Vec<f32> = res
        .broadcast_add(&g["transformer.h.1.attn.c_proj.bias"])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let e = rel_l2(&with_bias, &get("blocks.1.hook_attn_out"));
    assert!(
        e < 1e-5,
        "sum of hook_result + b_O vs hook_attn_out: {e:.2e}"
    );
    let mid: Vec<f32> = get("blocks.1.hook_resid_pre")
        .iter()
        .zip(get("blocks.1.hook_attn_out"))
        .map(|(a, b)| a + b)
        .collect();
    assert!(rel_l2(&mid, &get("blocks.1.hook_resid_mid")) < 1e-6);
    assert!(!hooks
        .cache
        .names()
        .contains(&HookName::block(1, HookPoint::MlpPreLinear)));
    let mut hz = Hooks::new();
    hz.intervene(
        HookName::global(HookPoint::PosEmbed),
        persona_lens_engine::Op::Zero,
        persona_lens_engine::Selector::all(),
    );
    let z = m
        .forward(&batch, None, &mut hz, LogitsAt::Last)
        .unwrap()
        .unwrap();
    assert!(max_abs_diff(&z, &base) > 1e-3);
}

#[test]
fn pos_embed_hook_only_where_positions_are_learned() {
    let m = load_tiny("tiny-llama");
    let e = m.resolve_hooks("hook_pos_embed").unwrap_err().to_string();
    assert!(e.contains("learned positions"), "{e}");
    let all = m.resolve_hooks("hook_*").unwrap();
    assert_eq!(all.len(), 1, "{all:?}"); // hook_embed only
}

#[test]
fn gemma2_softcaps_and_sliding_window_are_active() {
    // The tiny Gemma 2 has a window of 8 on even layers and soft-caps 50 / 30: the final logits
    // never exceed 30 in magnitude, and a sliding layer's pattern is zero beyond the window.
    let m = load_tiny("tiny-gemma2");
    let c = m.config();
    assert_eq!(c.layer_is_sliding, vec![true, false, true, false]);
    assert_eq!(
        (c.attn_logit_softcap, c.final_logit_softcap),
        (Some(50.0), Some(30.0))
    );
    let ids: Vec<u32> = (1..=16).collect();
    let batch = Batch::left_padded(&[ids], 0, m.device()).unwrap();
    let mut hooks = Hooks::new();
    hooks
        .capture(HookName::block(0, HookPoint::AttnPattern))
        .capture(HookName::block(1, HookPoint::AttnPattern));
    let logits = m
        .forward(&batch, None, &mut hooks, LogitsAt::All)
        .unwrap()
        .unwrap();
    let mx = logits
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(mx <= 30.0, "final soft-cap: max |logit| {mx}");
    // [b, heads, q, k] -> head 0 of row 0: [q, k]
    let p0: Vec<Vec<f32>> = hooks
        .cache
        .get(&HookName::block(0, HookPoint::AttnPattern))
        .unwrap()
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    // [b, heads, q, k] -> head 0 of row 0: [q, k]
    let p1: Vec<Vec<f32>> = hooks
        .cache
        .get(&HookName::block(1, HookPoint::AttnPattern))
        .unwrap()
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    // query 15 on the sliding layer: keys 0..=7 are outside the window of 8.
    assert!(p0[15][..8].iter().all(|&x| x == 0.0));
    assert!(p1[15][..8].iter().any(|&x| x > 0.0));
}

/// GGUF files of the new families as llama.cpp lays them out (`tests/scripts/tiny_hf_to_gguf.py`:
/// tensor names, metadata keys, llama's q/k permutation, Llama 3 scaling as `rope_freqs`, Phi-3's
/// fused `attn_qkv` / `ffn_up`) reproduce the HF reference of the checkpoint they were written from.
#[test]
fn gguf_files_of_the_new_families_match_hf() {
    for (file, hf) in [
        ("tiny-llama3.gguf", "tiny-llama3"),
        ("tiny-qwen2.gguf", "tiny-qwen2"),
        ("tiny-qwen3.gguf", "tiny-qwen3"),
        ("tiny-phi3.gguf", "tiny-phi3"),
        ("tiny-olmo2.gguf", "tiny-olmo2"),
        ("tiny-phi3-longrope.gguf", "tiny-phi3-longrope"),
    ] {
        let path = fixtures().join("tiny-gguf").join(file);
        let m = Model::load(
            path.to_str().unwrap(),
            &models_dir(),
            &LoadOptions::default(),
        )
        .unwrap();
        let g = candle_core::safetensors::load(
            fixtures()
                .join("tiny-models")
                .join(hf)
                .join("golden.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let seqs: Vec<Vec<u32>> = g["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2()
            .unwrap();
        let batch = Batch::left_padded(&seqs, 0, m.device()).unwrap();
        let mut hooks = Hooks::new();
        let n = m.config().n_layers;
        for l in 0..n {
            hooks.capture(HookName::block(l, HookPoint::ResidPre));
        }
        let logits = m
            .forward(&batch, None, &mut hooks, LogitsAt::All)
            .unwrap()
            .unwrap();
        for l in 0..n {
            let got: Vec<f32> = hooks
                .cache
                .get(&HookName::block(l, HookPoint::ResidPre))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<f32> = g[&format!("hidden_states.{l}")]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let e = rel_l2(&got, &want);
            assert!(e < 1e-5, "{file} blocks.{l}.hook_resid_pre: {e:.2e}");
        }
        let d = max_abs_diff(&logits, &g["logits"]);
        println!("{file}: logits max abs diff {d:.2e} vs HF ({hf})");
        assert!(d < 1e-4, "{file}: logits max abs diff {d}");
        if hf == "tiny-llama3" {
            assert!(matches!(
                m.config().rope_scaling,
                Some(RopeScaling::FreqFactors { .. })
            ));
        }
        if hf == "tiny-phi3-longrope" {
            assert!(matches!(
                m.config().rope_scaling,
                Some(RopeScaling::Longrope { .. })
            ));
        }
    }
}

/// Phi-3's fused projections split as quantized blocks (`--quantized`): the same numbers as the
/// same file dequantized to f32, and the Q8_0 file stays near the f32 reference.
#[test]
fn quantized_fused_projections_split_exactly() {
    use persona_lens_engine::{Precision, QuantKernel};
    let path = fixtures().join("tiny-gguf/tiny-phi3-q8_0.gguf");
    let load = |precision| {
        Model::load(
            path.to_str().unwrap(),
            &models_dir(),
            &LoadOptions {
                precision,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let dense = load(Precision::Dense(DType::F32));
    let quant = load(Precision::Quantized(QuantKernel::Exact));
    let g = candle_core::safetensors::load(
        fixtures().join("tiny-models/tiny-phi3/golden.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let seqs: Vec<Vec<u32>> = g["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let run = |m: &Model| {
        let batch = Batch::left_padded(&seqs, 0, m.device()).unwrap();
        m.forward(&batch, None, &mut Hooks::new(), LogitsAt::All)
            .unwrap()
            .unwrap()
    };
    let (a, b) = (run(&dense), run(&quant));
    let d = max_abs_diff(&a, &b);
    let q = max_abs_diff(&a, &g["logits"]);
    println!("phi3 Q8_0: quantized-exact vs dequantized {d:.2e}; vs HF f32 {q:.2e}");
    assert!(d < 1e-5, "quantized split differs from dense: {d}");
    // Q8_0 rounding moves the logits, but far less than their scale.
    let scale = g["logits"]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        q > 0.0 && q < 0.05 * scale,
        "Q8_0 vs f32: {q} (logit scale {scale})"
    );
}

/// TransformerLens's convention: `attn.hook_q` / `hook_k` are before rotary and
/// `attn.hook_rot_q` / `hook_rot_k` after. Rotary is re-derived here from the config (rotate-half,
/// base^(-2i/d), in f64), not from the engine, and applied to the captured pre-rotary q/k; Phi-3's
/// partial rotary leaves the last dims alone.
#[test]
fn q_k_hooks_are_before_rotary_and_rot_hooks_after() {
    for name in ["tiny-llama", "tiny-qwen3", "tiny-phi3"] {
        let m = load_tiny(name);
        let c = m.config().clone();
        let ids: Vec<u32> = (5..15).collect();
        let batch = Batch::left_padded(&[ids], 0, m.device()).unwrap();
        let mut hooks = Hooks::new();
        hooks.capture_all(&m.resolve_hooks("blocks.1.attn.*").unwrap());
        m.forward(&batch, None, &mut hooks, LogitsAt::Last).unwrap();
        let get = |p: HookPoint| -> Vec<Vec<Vec<f32>>> {
            hooks
                .cache
                .get(&HookName::block(1, p))
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec3()
                .unwrap()
        };
        for (pre, rot) in [
            (HookPoint::AttnQ, HookPoint::AttnRotQ),
            (HookPoint::AttnK, HookPoint::AttnRotK),
        ] {
            let (x, y) = (get(pre), get(rot));
            let (d, r) = (c.head_dim, c.rotary_dim);
            let mut worst = 0f64;
            for (pos, (xp, yp)) in x.iter().zip(&y).enumerate() {
                for (xh, yh) in xp.iter().zip(yp) {
                    for i in 0..d {
                        let want = if i >= r {
                            xh[i] as f64
                        } else {
                            let half = r / 2;
                            let j = i % half;
                            let theta =
                                pos as f64 * c.rope_theta.powf(-(2.0 * j as f64) / r as f64);
                            let rotated = if i < half {
                                -(xh[i + half] as f64)
                            } else {
                                xh[i - half] as f64
                            };
                            xh[i] as f64 * theta.cos() + rotated * theta.sin()
                        };
                        worst = worst.max((yh[i] as f64 - want).abs());
                    }
                }
            }
            assert!(worst < 1e-4, "{name} {pre:?} -> {rot:?}: {worst}");
            // Position 0 is unrotated; later positions are not.
            assert_eq!(x[0], y[0], "{name}: rotary at position 0 is the identity");
            assert_ne!(x[3], y[3], "{name}: hook_q/k must be before rotary");
        }
    }
    let gpt2 = load_tiny("tiny-gpt2");
    let e = gpt2
        .resolve_hooks("blocks.0.attn.hook_rot_q")
        .unwrap_err()
        .to_string();
    assert!(e.contains("rotary"), "{e}");
    assert!(gpt2
        .resolve_hooks("blocks.0.attn.*")
        .unwrap()
        .iter()
        .all(|n| !matches!(n.point, HookPoint::AttnRotQ | HookPoint::AttnRotK)));
}

/// `run_with_cache` over prompts of different lengths in batches of 2: every row equals that
/// prompt run alone (the forward's own cache), `Last` equals `All` at each last position, and the
/// aligned logits equal the single runs'.
#[test]
fn run_with_cache_aligns_batches_like_single_runs() {
    use persona_lens_engine::CachePositions;
    let m = load_tiny("tiny-qwen2");
    let seqs: Vec<Vec<u32>> = vec![
        (5..17).collect(),
        (40..45).collect(),
        (100..109).collect(),
        vec![7, 8],
        (200..220).collect(),
    ];
    let names = m
        .resolve_hooks("blocks.1.hook_resid_post,blocks.0.attn.hook_z,blocks.2.attn.hook_pattern")
        .unwrap();
    let (logits, all) = m
        .run_with_cache(&seqs, &names, CachePositions::All, LogitsAt::All, 2, |_| {})
        .unwrap();
    let logits = logits.unwrap();
    let (last_logits, last) = m
        .run_with_cache(
            &seqs,
            &names,
            CachePositions::Last,
            LogitsAt::Last,
            3,
            |_| {},
        )
        .unwrap();
    let last_logits = last_logits.unwrap();
    let max_len = 20;
    for (r, s) in seqs.iter().enumerate() {
        let batch = Batch::left_padded(std::slice::from_ref(s), 0, m.device()).unwrap();
        let mut hooks = Hooks::new();
        hooks.capture_all(&names);
        let single = m
            .forward(&batch, None, &mut hooks, LogitsAt::All)
            .unwrap()
            .unwrap();
        for h in &names {
            let want = hooks.cache.get(h).unwrap().get(0).unwrap();
            let got = all.row(h, r).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-5, "{h} row {r}: {d}");
            let full = all.get(h).unwrap();
            assert_eq!(full.dim(h.point.pos_axis()).unwrap(), max_len, "{h}");
            // The last position through `Last` is the same vector.
            let axis = h.point.pos_axis() - 1;
            let want_last = want.narrow(axis, s.len() - 1, 1).unwrap();
            let mut got_last = last.get(h).unwrap().get(r).unwrap();
            if matches!(h.point, HookPoint::AttnPattern) {
                got_last = got_last.narrow(2, 0, s.len()).unwrap();
            }
            assert!(
                max_abs_diff(&got_last, &want_last) < 1e-5,
                "{h} last row {r}"
            );
        }
        let got = logits.get(r).unwrap().narrow(0, 0, s.len()).unwrap();
        assert!(
            max_abs_diff(&got, &single.get(0).unwrap()) < 1e-4,
            "logits row {r}"
        );
        let got = last_logits.get(r).unwrap();
        let want = single.get(0).unwrap().get(s.len() - 1).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-4, "last logits row {r}");
        // Zeros past the prompt's end.
        if s.len() < max_len {
            let tail = all
                .get(&names[0])
                .unwrap()
                .get(r)
                .unwrap()
                .narrow(0, s.len(), max_len - s.len())
                .unwrap();
            assert_eq!(
                tail.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
        }
    }
    let e = m
        .run_with_cache(
            &seqs,
            &names,
            CachePositions::All,
            LogitsAt::Last,
            0,
            |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch size 0"), "{e}");
}

/// An edit that overflows the residual stream is an error naming the first non-finite block
/// output and the edited hook, not NaN logits that decoding turns into token 0.
#[test]
fn non_finite_activations_are_errors_naming_the_hook() {
    let m = load_tiny("tiny-llama");
    let batch = Batch::left_padded(&[vec![5, 6, 7, 8]], 0, m.device()).unwrap();
    let d = m.config().d_model;
    // Two edits of f32::MAX each: the sum overflows to infinity.
    let v = Tensor::full(f32::MAX, d, m.device()).unwrap();
    let mut hooks = Hooks::new();
    for _ in 0..2 {
        hooks.intervene(
            HookName::block(1, HookPoint::ResidPre),
            persona_lens_engine::Op::Add(v.clone()),
            persona_lens_engine::Selector::all(),
        );
    }
    let e = m
        .forward(&batch, None, &mut hooks, LogitsAt::Last)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("at blocks.1.hook_resid_post") && e.contains("blocks.1.hook_resid_pre"),
        "{e}"
    );
    // A finite edit so large that the next norm's square overflows (the norm would then output
    // zeros and every later layer read nothing): refused too.
    let mut huge = Hooks::new();
    huge.intervene(
        HookName::block(1, HookPoint::ResidPre),
        persona_lens_engine::Op::Add(Tensor::full(-1e30f32, d, m.device()).unwrap()),
        persona_lens_engine::Selector::all(),
    );
    let e = m
        .forward(&batch, None, &mut huge, LogitsAt::Last)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("out of range at blocks.1.hook_resid_post") && e.contains("overflow"),
        "{e}"
    );
    // A large but representable edit is not an error.
    let mut ok = Hooks::new();
    ok.intervene(
        HookName::block(1, HookPoint::ResidPre),
        persona_lens_engine::Op::Add((v / 1e30).unwrap()),
        persona_lens_engine::Selector::all(),
    );
    m.forward(&batch, None, &mut ok, LogitsAt::Last).unwrap();
}

/// Long calls compute attention a block of query rows at a time and the MLP a chunk of rows at a
/// time: with blocks and chunks of 5 rows on the 24-token reference inputs (left padding, sliding
/// windows, soft-caps, a KV-cache prefix included) every residual and the logits equal the
/// whole computation.
#[test]
fn blocked_attention_equals_whole_attention() {
    let tiny = fixtures().join("tiny-models");
    let mut n = 0;
    for e in std::fs::read_dir(&tiny).unwrap() {
        let dir = e.unwrap().path();
        if !dir.join("golden.safetensors").exists() {
            continue;
        }
        let mut m = Model::load(
            dir.to_str().unwrap(),
            &models_dir(),
            &LoadOptions::default(),
        )
        .unwrap();
        let g =
            candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
        let pids: Vec<Vec<u32>> = g["padded_input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2()
            .unwrap();
        let batch = Batch {
            ids: Tensor::new(pids.clone(), m.device()).unwrap(),
            pad: vec![0, 3],
            lens: vec![24, 21],
        };
        let names = m.resolve_hooks("blocks.*.hook_resid_post").unwrap();
        let run = |m: &Model| {
            let mut hooks = Hooks::new();
            hooks.capture_all(&names);
            let logits = m
                .forward(&batch, None, &mut hooks, LogitsAt::All)
                .unwrap()
                .unwrap();
            // A cached prefix of 7 positions, then the other 17 in one (blocked) call.
            let mut kv = persona_lens_engine::KvCache::new(m.config().n_layers, batch.pad.clone());
            let head = Batch {
                ids: batch.ids.narrow(1, 0, 7).unwrap(),
                ..batch.clone()
            };
            let tail = Batch {
                ids: batch.ids.narrow(1, 7, 17).unwrap(),
                ..batch.clone()
            };
            m.forward(&head, Some(&mut kv), &mut Hooks::new(), LogitsAt::None)
                .unwrap();
            let cached = m
                .forward(&tail, Some(&mut kv), &mut Hooks::new(), LogitsAt::All)
                .unwrap()
                .unwrap();
            (logits, cached, hooks)
        };
        let (whole, whole_cached, wh) = run(&m);
        m.decoder.attention_block = 5;
        m.decoder.mlp_chunk_rows = 5;
        let (blocked, blocked_cached, bh) = run(&m);
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        // Row 1's padding positions are never read; compare real positions.
        for (a, b) in [(&whole, &blocked), (&whole_cached, &blocked_cached)] {
            let t = a.dim(1).unwrap();
            let d0 = max_abs_diff(&a.get(0).unwrap(), &b.get(0).unwrap());
            let d1 = max_abs_diff(
                &a.get(1)
                    .unwrap()
                    .narrow(
                        0,
                        3usize.saturating_sub(24 - t),
                        t - 3usize.saturating_sub(24 - t),
                    )
                    .unwrap(),
                &b.get(1)
                    .unwrap()
                    .narrow(
                        0,
                        3usize.saturating_sub(24 - t),
                        t - 3usize.saturating_sub(24 - t),
                    )
                    .unwrap(),
            );
            assert!(
                d0 < 1e-5 && d1 < 1e-5,
                "{name}: logits differ by {d0} / {d1}"
            );
        }
        for h in &names {
            let (a, b) = (wh.cache.get(h).unwrap(), bh.cache.get(h).unwrap());
            let e = rel_l2(
                &a.get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
                &b.get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert!(e < 1e-6, "{name} {h}: {e}");
        }
        n += 1;
    }
    assert!(n >= 15, "{n} tiny models");
}

/// `stop_after_block` runs the blocks a capture needs and no more: the same activations up to
/// the stop, nothing captured after it, no logits; asking for logits with it is an error.
#[test]
fn stop_after_block_captures_the_same_rows_and_nothing_later() {
    let dir = fixtures().join("tiny-models").join("tiny-llama");
    let m = Model::load(
        dir.to_str().unwrap(),
        &models_dir(),
        &LoadOptions::default(),
    )
    .unwrap();
    let n = m.config().n_layers;
    assert!(n >= 2);
    let batch = Batch::left_padded(&[vec![1, 5, 9, 3], vec![2, 7]], 0, m.device()).unwrap();
    let capture = |stop: Option<usize>| {
        let mut hooks = Hooks::new();
        for l in 0..n {
            hooks.capture(HookName::block(l, HookPoint::ResidPost));
        }
        hooks.stop_after_block = stop;
        let out = m.forward(&batch, None, &mut hooks, LogitsAt::None).unwrap();
        assert!(out.is_none());
        hooks.cache
    };
    let full = capture(None);
    let early = capture(Some(0));
    let first = HookName::block(0, HookPoint::ResidPost);
    let diff = full
        .get(&first)
        .unwrap()
        .sub(&early.get(&first).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    assert!(early
        .get(&HookName::block(1, HookPoint::ResidPost))
        .is_err());
    let mut hooks = Hooks::new();
    hooks.stop_after_block = Some(0);
    let err = m
        .forward(&batch, None, &mut hooks, LogitsAt::Last)
        .unwrap_err()
        .to_string();
    assert!(err.contains("stop_after_block"), "{err}");
}

/// `start_at_block` from an earlier forward's `resid_pre` gives that forward's logits and later
/// activations bit for bit, with an intervention after the start applied as usual; the blocks
/// before it do not run (their hooks stay empty); a residual of the wrong shape or a start the
/// call does not run is a one-line error.
#[test]
fn start_at_block_continues_an_earlier_forward_bit_for_bit() {
    let dir = fixtures().join("tiny-models").join("tiny-llama");
    let m = Model::load(
        dir.to_str().unwrap(),
        &models_dir(),
        &LoadOptions::default(),
    )
    .unwrap();
    let n = m.config().n_layers;
    assert!(n >= 2);
    let l = n - 1;
    let batch = Batch::left_padded(&[vec![1, 5, 9, 3], vec![2, 7]], 0, m.device()).unwrap();
    let last = HookName::block(l, HookPoint::ResidPost);
    let run = |start: Option<Tensor>, zero_z: bool| {
        let mut hooks = Hooks::new();
        hooks.capture(HookName::block(l, HookPoint::ResidPre));
        hooks.capture(HookName::block(0, HookPoint::ResidPost));
        hooks.capture(last);
        if zero_z {
            hooks.intervene(
                HookName::block(l, HookPoint::AttnZ),
                persona_lens_engine::Op::Zero,
                persona_lens_engine::Selector::all().heads(vec![0]),
            );
        }
        hooks.start_at_block = start.map(|x| (l, x));
        let logits = m
            .forward(&batch, None, &mut hooks, LogitsAt::All)
            .unwrap()
            .unwrap();
        (logits, hooks.cache)
    };
    let max_diff = |a: &Tensor, b: &Tensor| {
        a.sub(b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (whole, cache) = run(None, false);
    let resid = cache
        .get(&HookName::block(l, HookPoint::ResidPre))
        .unwrap()
        .clone();
    let (from_l, later) = run(Some(resid.clone()), false);
    assert_eq!(max_diff(&whole, &from_l), 0.0);
    assert_eq!(
        max_diff(&cache.get(&last).unwrap(), &later.get(&last).unwrap()),
        0.0
    );
    assert!(
        later
            .get(&HookName::block(0, HookPoint::ResidPost))
            .is_err(),
        "block 0 ran although the forward started at block {l}"
    );
    // An ablation in the started block acts as in a whole forward.
    let (ablated, _) = run(None, true);
    let (ablated_from_l, _) = run(Some(resid.clone()), true);
    assert!(max_diff(&whole, &ablated) > 0.0);
    assert_eq!(max_diff(&ablated, &ablated_from_l), 0.0);
    // Wrong shape, or a KV-cached call: errors that name the setting.
    let mut hooks = Hooks::new();
    hooks.start_at_block = Some((l, resid.narrow(1, 0, 2).unwrap()));
    let err = m
        .forward(&batch, None, &mut hooks, LogitsAt::Last)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("start_at_block") && !err.contains('\n'),
        "{err}"
    );
    // With a KV cache: the same logits, and the cache has no keys before the start, so a later
    // call that runs an earlier block is refused.
    let mut kv = persona_lens_engine::KvCache::new(n, batch.pad.clone());
    let mut hooks = Hooks::new();
    hooks.start_at_block = Some((l, resid));
    let cached = m
        .forward(&batch, Some(&mut kv), &mut hooks, LogitsAt::All)
        .unwrap()
        .unwrap();
    assert_eq!(max_diff(&whole, &cached), 0.0);
    let next = Batch {
        ids: batch.ids.narrow(1, 0, 1).unwrap(),
        pad: batch.pad.clone(),
        lens: batch.lens.clone(),
    };
    let err = m
        .forward(&next, Some(&mut kv), &mut Hooks::new(), LogitsAt::Last)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("KV cache") && err.contains("block 0") && !err.contains('\n'),
        "{err}"
    );
}

/// A standing hook (`Model::add_hook`) acts on every later forward exactly as the same
/// intervention passed to one call does, including generation with the KV cache, and
/// `reset_hooks` gives back the unedited model bit for bit.
#[test]
fn standing_hooks_act_on_every_forward_until_reset() {
    let dir = fixtures().join("tiny-models").join("tiny-llama");
    let m = Model::load(
        dir.to_str().unwrap(),
        &models_dir(),
        &LoadOptions::default(),
    )
    .unwrap();
    let batch = Batch::left_padded(&[vec![1, 5, 9, 3], vec![2, 7]], 0, m.device()).unwrap();
    let hook = HookName::block(1, HookPoint::AttnZ);
    let op = || persona_lens_engine::Op::Scale(-2.0);
    let sel = || persona_lens_engine::Selector::all().heads(vec![1]);
    let logits = |hooks: &mut Hooks| {
        m.forward(&batch, None, hooks, LogitsAt::All)
            .unwrap()
            .unwrap()
    };
    let max_diff = |a: &Tensor, b: &Tensor| {
        a.sub(b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let clean = logits(&mut Hooks::new());
    let mut per_call = Hooks::new();
    per_call.intervene(hook, op(), sel());
    let edited = logits(&mut per_call);
    assert!(
        max_diff(&clean, &edited) > 1e-3,
        "the edit must change the logits"
    );
    m.add_hook(hook, op(), sel());
    assert_eq!(max_diff(&logits(&mut Hooks::new()), &edited), 0.0);
    // Generation (KV cache, one position per step) sees the edit at every step.
    let opts = GenerateOptions {
        max_new_tokens: 6,
        sampling: persona_lens_engine::Sampling::Greedy,
        stop_tokens: vec![],
        use_kv_cache: true,
    };
    let with_standing = generate(&m, &[vec![1, 5, 9, 3]], &opts, &mut Hooks::new()).unwrap()[0]
        .generated_ids
        .clone();
    m.reset_hooks();
    let mut h = Hooks::new();
    h.intervene(hook, op(), sel());
    let with_call = generate(&m, &[vec![1, 5, 9, 3]], &opts, &mut h).unwrap()[0]
        .generated_ids
        .clone();
    assert_eq!(with_standing, with_call);
    assert_eq!(max_diff(&logits(&mut Hooks::new()), &clean), 0.0);
}

/// `Model::interrupt` stops every entry point (whole forwards, KV-cached generation) with
/// `EngineError::Interrupted` until cleared, and leaves the model's numbers untouched.
#[test]
fn an_interrupted_model_refuses_work_until_cleared() {
    let dir = fixtures().join("tiny-models").join("tiny-llama");
    let m = Model::load(
        dir.to_str().unwrap(),
        &models_dir(),
        &LoadOptions::default(),
    )
    .unwrap();
    let batch = Batch::left_padded(&[vec![1, 5, 9, 3]], 0, m.device()).unwrap();
    let run = || m.forward(&batch, None, &mut Hooks::new(), LogitsAt::All);
    let before = run().unwrap().unwrap();
    m.interrupt(true);
    assert!(matches!(
        run(),
        Err(persona_lens_engine::EngineError::Interrupted)
    ));
    let opts = GenerateOptions::default();
    assert!(matches!(
        generate(&m, &[vec![1, 5, 9, 3]], &opts, &mut Hooks::new()),
        Err(persona_lens_engine::EngineError::Interrupted)
    ));
    m.interrupt(false);
    let after = run().unwrap().unwrap();
    let diff = after
        .sub(&before)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}

/// `run_with_hooks` selects rows of the whole input: batched in ones or in threes, an edit of
/// prompt 2 lands on prompt 2 only, equal to one forward of that prompt with the edit.
#[test]
fn run_with_hooks_rows_index_the_whole_input_across_batches() {
    let dir = fixtures().join("tiny-models").join("tiny-llama");
    let m = Model::load(
        dir.to_str().unwrap(),
        &models_dir(),
        &LoadOptions::default(),
    )
    .unwrap();
    let seqs = vec![
        vec![1, 5, 9, 3],
        vec![2, 7],
        vec![4, 4, 8],
        vec![6, 1, 2, 3, 5],
    ];
    let iv = persona_lens_engine::Intervention {
        hook: HookName::block(0, HookPoint::ResidPost),
        op: persona_lens_engine::Op::Scale(3.0),
        sel: persona_lens_engine::Selector::all().rows(vec![2]),
    };
    let run = |bs: usize, ivs: &[persona_lens_engine::Intervention]| {
        m.run_with_hooks(
            &seqs,
            ivs,
            &[],
            persona_lens_engine::CachePositions::Last,
            LogitsAt::Last,
            bs,
            |_| {},
        )
        .unwrap()
        .0
        .unwrap()
    };
    let row = |t: &Tensor, r: usize| t.get(r).unwrap().to_vec1::<f32>().unwrap();
    for bs in [1, 3] {
        // Same batching, so untouched rows are equal bit for bit.
        let clean = run(bs, &[]);
        let edited = run(bs, std::slice::from_ref(&iv));
        for r in [0, 1, 3] {
            assert_eq!(
                row(&edited, r),
                row(&clean, r),
                "row {r} at batch size {bs}"
            );
        }
        let mut alone = Hooks::new();
        alone.intervene(iv.hook, iv.op.clone(), persona_lens_engine::Selector::all());
        let b = Batch::left_padded(&seqs[2..3], 0, m.device()).unwrap();
        let want = m
            .forward(&b, None, &mut alone, LogitsAt::Last)
            .unwrap()
            .unwrap();
        let (got, want) = (row(&edited, 2), row(&want, 0));
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "prompt 2 at batch size {bs}: {diff}");
        assert_ne!(got, row(&clean, 2));
    }
    let bad = persona_lens_engine::Intervention {
        sel: persona_lens_engine::Selector::all().rows(vec![4]),
        ..iv
    };
    let err = m
        .run_with_hooks(
            &seqs,
            &[bad],
            &[],
            persona_lens_engine::CachePositions::Last,
            LogitsAt::Last,
            2,
            |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("selects row 4, but there are 4 prompts"),
        "{err}"
    );
}
