//! Every crosscoder layout saved by the published Python implementation
//! (dictionary_learning@173f7fa) gives the reference outputs within 1e-5.

use candle_core::{Device, Tensor};
use persona_lens_diffing::crosscoder::Layout;
use persona_lens_diffing::{load_dictionary, CrossCoder, Dictionary, Sparsity};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/crosscoders")
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("io.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn close(name: &str, got: &Tensor, io: &HashMap<String, Tensor>) {
    let want = io.get(name).unwrap_or_else(|| panic!("{name} missing"));
    let d = max_abs_diff(got, want);
    // relative to the reference's scale, so large reconstructions are not judged by 1e-5 absolute
    let scale = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0);
    eprintln!("fixture {name}: max abs diff {d:.3e}");
    assert!(d <= 1e-5 * scale, "{name}: max |diff| {d} (scale {scale})");
}

fn cc(path: &str) -> CrossCoder {
    match load_dictionary(&fixtures().join(path)).unwrap() {
        Dictionary::CrossCoder(c) => *c,
        Dictionary::Sae(_) => panic!("{path} loaded as an SAE"),
    }
}

#[test]
fn l1_crosscoder_safetensors_and_pt_match_python() {
    let io = io();
    let x = io["x"].clone();
    for path in ["l1", "l1/model.safetensors", "l1/model_final.pt"] {
        let c = cc(path);
        assert!(c.normaliser.is_some(), "{path}: normaliser");
        assert_eq!(c.sparsity, Sparsity::Relu);
        close("l1.normalize_activations", &c.normalize(&x).unwrap(), &io);
        let f = c.encode(&x, true).unwrap();
        close("l1.encode", &f, &io);
        close(
            "l1.get_activations",
            &c.get_activations(&x, true).unwrap(),
            &io,
        );
        close("l1.decode", &c.decode(&f).unwrap(), &io);
        close("l1.forward", &c.forward(&x).unwrap(), &io);
        close(
            "l1.forward_features",
            &f.broadcast_mul(&c.feature_scale().unwrap()).unwrap(),
            &io,
        );
        close(
            "l1.code_normalization",
            &c.code_normalization().unwrap(),
            &io,
        );
        let norms = c.decoder_norms().unwrap();
        close("l1.dec_norm_base", &norms.get(0).unwrap(), &io);
        close("l1.dec_norm_chat", &norms.get(1).unwrap(), &io);
        let m = persona_lens_diffing::metrics::DecoderMetrics::compute(&c).unwrap();
        close(
            "l1.rel_norm_diff",
            &Tensor::new(m.rel_norm_diff_f32(), &Device::Cpu).unwrap(),
            &io,
        );
        close(
            "l1.dec_cosine",
            &Tensor::new(m.cosine_f32(), &Device::Cpu).unwrap(),
            &io,
        );
    }
}

#[test]
fn batchtopk_threshold_and_topk_match_python() {
    let io = io();
    let x = io["x"].clone();
    for path in ["batchtopk", "batchtopk/model_final.pt"] {
        let c = cc(path);
        match c.sparsity {
            Sparsity::BatchTopK { k, threshold } => {
                assert_eq!(k, 6);
                assert!(threshold > 0.0);
            }
            s => panic!("{path}: {s:?}"),
        }
        close(
            "batchtopk.encode_threshold",
            &c.encode(&x, true).unwrap(),
            &io,
        );
        let topk = c.encode(&x, false).unwrap();
        close("batchtopk.encode_topk", &topk, &io);
        // exactly k · batch latents kept over the batch (when that many are positive)
        let nnz = topk
            .ne(0f32)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let nnz = nnz.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(nnz <= (6 * 32) as f32, "{nnz}");
        close(
            "batchtopk.get_activations",
            &c.get_activations(&x, true).unwrap(),
            &io,
        );
        close("batchtopk.forward", &c.forward(&x).unwrap(), &io);
        let f = c.encode(&x, true).unwrap();
        close("batchtopk.decode", &c.decode(&f).unwrap(), &io);
    }
}

#[test]
fn old_checkpoint_without_code_normalization_id_is_crosscoder() {
    let io = io();
    let x = io["x"].clone();
    let c = cc("l1_nonorm/model_final.pt");
    assert!(c.normaliser.is_none(), "NaN buffers mean no normaliser");
    assert_eq!(c.layout, Layout::DictionaryLearningPt);
    close("l1_nonorm.encode", &c.encode(&x, true).unwrap(), &io);
    close("l1_nonorm.forward", &c.forward(&x).unwrap(), &io);
    close(
        "l1_nonorm.reloaded_code_normalization",
        &c.code_normalization().unwrap(),
        &io,
    );
    // what the SAE code normalisation it was trained with gives
    let mut sae = c.clone();
    sae.code_norm = persona_lens_diffing::CodeNormalization::Sae;
    close(
        "l1_nonorm.code_normalization_sae",
        &sae.code_normalization().unwrap(),
        &io,
    );
}

#[test]
fn replication_layout_matches_python() {
    let io = io();
    let x = io["x"].clone();
    let c = cc("kissane");
    assert_eq!(c.layout, Layout::Replication);
    let f = c.encode(&x, true).unwrap();
    close("kissane.acts", &f, &io);
    close("kissane.recon", &c.decode(&f).unwrap(), &io);
    close(
        "kissane.decoder_norms",
        &c.decoder_norms().unwrap().t().unwrap(),
        &io,
    );
}

#[test]
fn saved_dictionary_learning_layout_round_trips() {
    let io = io();
    let x = io["x"].clone();
    let dir = std::env::temp_dir().join(format!("pl-cc-save-{}", std::process::id()));
    for src in ["l1", "batchtopk", "kissane"] {
        let c = cc(src);
        let out = dir.join(src);
        c.save(&out).unwrap();
        // the same keys, dtypes and config Python's save_pretrained writes
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        if src != "kissane" {
            let py: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(fixtures().join(src).join("config.json")).unwrap(),
            )
            .unwrap();
            let keys = |v: &serde_json::Value| {
                let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
                k.sort();
                k
            };
            assert_eq!(keys(&cfg), keys(&py), "{src}: config keys");
            let ours = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)
                .unwrap();
            let theirs = candle_core::safetensors::load(
                fixtures().join(src).join("model.safetensors"),
                &Device::Cpu,
            )
            .unwrap();
            for (k, t) in &theirs {
                let o = ours
                    .get(k)
                    .unwrap_or_else(|| panic!("{src}: {k} not saved"));
                assert_eq!(o.dtype(), t.dtype(), "{src}: {k} dtype");
                assert_eq!(o.dims(), t.dims(), "{src}: {k} shape");
            }
            assert_eq!(ours.len(), theirs.len(), "{src}: same tensors");
        }
        let back = cc(out.to_str().unwrap());
        let d = max_abs_diff(&back.forward(&x).unwrap(), &c.forward(&x).unwrap());
        assert!(d == 0.0, "{src}: reloaded forward differs by {d}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = std::env::temp_dir().join(format!("pl-cc-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // unknown format
    let p = dir.join("weights.bin.txt");
    std::fs::write(&p, b"hello").unwrap();
    let e = load_dictionary(&p).unwrap_err().to_string();
    assert!(e.contains("unknown dictionary format"), "{e}");
    // corrupt safetensors
    let p = dir.join("model.safetensors");
    let good = std::fs::read(fixtures().join("l1/model.safetensors")).unwrap();
    std::fs::write(&p, &good[..good.len() / 2]).unwrap();
    let e = load_dictionary(&p).unwrap_err().to_string();
    assert!(e.contains("cannot read") && e.contains("corrupt"), "{e}");
    // corrupt .pt
    let p = dir.join("model_final.pt");
    std::fs::write(&p, b"PK\x03\x04 not a zip").unwrap();
    let e = load_dictionary(&p).unwrap_err().to_string();
    assert!(e.contains("cannot read"), "{e}");
    // shape mismatch between crosscoder and input
    let c = cc("l1");
    let x = Tensor::zeros((4, 2, 15), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = c.encode(&x, true).unwrap_err().to_string();
    assert!(e.contains("expects (batch, 2, 16)"), "{e}");
    // missing path
    let e = load_dictionary(&dir.join("nope")).unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SAELens and Gemma Scope layouts, checked against the formulas written out by hand.
#[test]
fn sae_layouts_load_and_follow_their_formulas() {
    use persona_lens_diffing::SaeActivation;
    let dev = Device::Cpu;
    let (d, f, b) = (8usize, 12usize, 5usize);
    let w_enc = Tensor::randn(0f32, 1.0, (d, f), &dev).unwrap();
    let w_dec = Tensor::randn(0f32, 1.0, (f, d), &dev).unwrap();
    let b_enc = Tensor::randn(0f32, 0.5, f, &dev).unwrap();
    let b_dec = Tensor::randn(0f32, 0.5, d, &dev).unwrap();
    let threshold = Tensor::full(0.3f32, f, &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (b, d), &dev).unwrap();
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (we, wd, be, bd, xv) = (v(&w_enc), v(&w_dec), v(&b_enc), v(&b_dec), v(&x));
    // pre[r][j] = Σ_i (x[r][i] - sub·b_dec[i]) W_enc[i][j] + b_enc[j]
    let pre = |sub: bool| -> Vec<f32> {
        let mut out = vec![0f32; b * f];
        for r in 0..b {
            for j in 0..f {
                let mut s = be[j];
                for i in 0..d {
                    let xi = xv[r * d + i] - if sub { bd[i] } else { 0.0 };
                    s += xi * we[i * f + j];
                }
                out[r * f + j] = s;
            }
        }
        out
    };
    let dir = std::env::temp_dir().join(format!("pl-sae-{}", std::process::id()));
    // Gemma Scope: params.npz, JumpReLU, no b_dec subtraction
    let gs = dir.join("gemma_scope");
    std::fs::create_dir_all(&gs).unwrap();
    Tensor::write_npz(
        &[
            ("W_enc", &w_enc),
            ("W_dec", &w_dec),
            ("b_enc", &b_enc),
            ("b_dec", &b_dec),
            ("threshold", &threshold),
        ],
        gs.join("params.npz"),
    )
    .unwrap();
    let Dictionary::Sae(s) = load_dictionary(&gs).unwrap() else {
        panic!("not an SAE")
    };
    assert_eq!(s.activation, SaeActivation::JumpRelu);
    let got = v(&s.encode(&x).unwrap());
    let want: Vec<f32> = pre(false)
        .iter()
        .map(|&p| if p > 0.3 { p } else { 0.0 })
        .collect();
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "{g} vs {w}");
    }
    // decode = f W_dec + b_dec
    let rec = v(&s.decode(&s.encode(&x).unwrap()).unwrap());
    for r in 0..b {
        for i in 0..d {
            let mut acc = bd[i];
            for j in 0..f {
                acc += want[r * f + j] * wd[j * d + i];
            }
            assert!((rec[r * d + i] - acc).abs() < 1e-4);
        }
    }
    // SAELens standard ReLU SAE with apply_b_dec_to_input
    let sl = dir.join("saelens");
    std::fs::create_dir_all(&sl).unwrap();
    candle_core::safetensors::save(
        &[
            ("W_enc".to_string(), w_enc.clone()),
            ("W_dec".to_string(), w_dec.clone()),
            ("b_enc".to_string(), b_enc.clone()),
            ("b_dec".to_string(), b_dec.clone()),
        ]
        .into_iter()
        .collect(),
        sl.join("sae_weights.safetensors"),
    )
    .unwrap();
    std::fs::write(
        sl.join("cfg.json"),
        r#"{"architecture": "standard", "d_in": 8, "d_sae": 12, "apply_b_dec_to_input": true, "hook_name": "blocks.6.hook_resid_post"}"#,
    )
    .unwrap();
    let Dictionary::Sae(s) = load_dictionary(&sl).unwrap() else {
        panic!("not an SAE")
    };
    assert_eq!(s.activation, SaeActivation::Relu);
    assert_eq!(s.hook_name.as_deref(), Some("blocks.6.hook_resid_post"));
    let got = v(&s.encode(&x).unwrap());
    for (g, w) in got.iter().zip(pre(true).iter().map(|p| p.max(0.0))) {
        assert!((g - w).abs() < 1e-5, "{g} vs {w}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
