//! `persona-lens cache --ids` on every tiny Hugging Face checkpoint (both config layouts where
//! the fixture has them): pre-tokenized input through the binary reproduces HF's hidden states,
//! logits and a left-padded row.

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{assert_one_line_error, root, run};

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The model dir, or a temp copy whose `config.json` is the fixture's `config.v5.json`.
fn model_dir(src: &Path, v5: bool, tmp: &Path) -> PathBuf {
    if !v5 {
        return src.to_path_buf();
    }
    let d = tmp.join(format!("{}-v5", src.file_name().unwrap().to_string_lossy()));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(src.join("config.v5.json"), d.join("config.json")).unwrap();
    let _ = std::fs::remove_file(d.join("model.safetensors"));
    std::os::unix::fs::symlink(src.join("model.safetensors"), d.join("model.safetensors")).unwrap();
    d
}

fn check(src: &Path, v5: bool, tmp: &Path) -> String {
    let name = src.file_name().unwrap().to_string_lossy().to_string();
    let g = candle_core::safetensors::load(src.join("golden.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<Vec<u32>> = g["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    // Row 2 is row 1 without its first 3 tokens: the engine left-pads it by 3 in the batch.
    let rows = vec![ids[0].clone(), ids[1].clone(), ids[1][3..].to_vec()];
    let ids_file = tmp.join(format!("{name}-{v5}.json"));
    std::fs::write(&ids_file, serde_json::to_string(&rows).unwrap()).unwrap();
    let out = tmp.join(format!("{name}-{v5}.safetensors"));
    let dir = model_dir(src, v5, tmp);
    let (code, _, err) = run(&[
        "cache",
        "--model",
        dir.to_str().unwrap(),
        "--ids",
        ids_file.to_str().unwrap(),
        "--hooks",
        "blocks.*.hook_resid_pre",
        "--all-logits",
        "--batch-size",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{name} v5={v5}: {err}");
    let c = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let n_layers = (0..)
        .take_while(|i| c.contains_key(&format!("blocks.{i}.hook_resid_pre")))
        .count();
    assert!(n_layers > 0, "{name}: no resid_pre tensors");
    let mut worst = 0f64;
    for i in 0..n_layers {
        let got = c[&format!("blocks.{i}.hook_resid_pre")]
            .narrow(0, 0, 2)
            .unwrap();
        let e = rel_l2(&got, &g[&format!("hidden_states.{i}")]);
        assert!(
            e < 1e-5,
            "{name} v5={v5}: blocks.{i}.hook_resid_pre vs hidden_states.{i}: {e:.2e}"
        );
        worst = worst.max(e);
    }
    let logits = &c["logits"];
    let d = max_abs(&logits.narrow(0, 0, 2).unwrap(), &g["logits"]);
    assert!(d < 1e-4, "{name} v5={v5}: logits max abs diff {d}");
    let t = ids[1].len() - 3;
    let dp = max_abs(
        &logits.get(2).unwrap().narrow(0, 0, t).unwrap(),
        &g["padded_logits"].get(1).unwrap().narrow(0, 3, t).unwrap(),
    );
    assert!(
        dp < 1e-4,
        "{name} v5={v5}: padded row logits max abs diff {dp}"
    );
    format!(
        "{name}{}: resid_pre worst rel {worst:.1e}, logits {d:.1e}, padded {dp:.1e}",
        if v5 { " (v5)" } else { "" }
    )
}

#[test]
fn cache_ids_matches_hf_on_every_tiny_model() {
    let tiny = root().join("tests/fixtures/tiny-models");
    let tmp = std::env::temp_dir().join(format!("pl-cache-ids-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&tiny)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 15,
        "expected the three tiny-model sets, found {}",
        dirs.len()
    );
    for src in &dirs {
        println!("{}", check(src, false, &tmp));
        if src.join("config.v5.json").exists() {
            println!("{}", check(src, true, &tmp));
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn cache_ids_bad_files_and_text_without_tokenizer_are_one_line_errors() {
    let tmp = std::env::temp_dir().join(format!("pl-cache-ids-bad-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let model = root().join("tests/fixtures/tiny-models/tiny-qwen2");
    let out = tmp.join("c.safetensors");
    for (body, needle) in [
        ("[[1, 2], []]", "sequence 1 is empty"),
        ("[]", "no sequences"),
        ("{\"prompts\": [\"hi\"]}", "token-id lists"),
        (
            "[[1, 2, 600]]",
            "token id 600 is outside the vocabulary (size 512)",
        ),
    ] {
        let f = tmp.join("ids.json");
        std::fs::write(&f, body).unwrap();
        assert_one_line_error(
            &[
                "cache",
                "--model",
                model.to_str().unwrap(),
                "--ids",
                f.to_str().unwrap(),
                "--hooks",
                "blocks.0.hook_resid_pre",
                "--out",
                out.to_str().unwrap(),
            ],
            needle,
        );
        assert!(!out.exists(), "{body}: no output on error");
    }
    // Text for a checkpoint without a tokenizer: refused, not turned into id 0.
    assert_one_line_error(
        &[
            "cache",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hello there",
            "--hooks",
            "blocks.0.hook_resid_pre",
            "--out",
            out.to_str().unwrap(),
        ],
        "no tokenizer (no tokenizer.json / GGUF vocabulary): give token ids instead of text (--ids FILE)",
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn bench_forward_takes_token_ids() {
    let tmp = std::env::temp_dir().join(format!("pl-bench-ids-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let f = tmp.join("ids.json");
    std::fs::write(&f, "[[5, 6, 7, 8, 9, 10], [11, 12, 13]]").unwrap();
    let model = root().join("tests/fixtures/tiny-models/tiny-phi3");
    let out = Command::new(env!("CARGO_BIN_EXE_persona-lens"))
        .args(["bench-forward", "--model", model.to_str().unwrap()])
        .args(["--ids", f.to_str().unwrap(), "--batch-size", "2", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"], 9, "{v}");
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `generate --ids` on every tiny model that has HF's greedy continuation: the same 8 tokens,
/// with the KV cache and (where the frequencies do not depend on the length) with full
/// recompute.
#[test]
fn generate_ids_reproduces_hf_greedy_continuations() {
    let tiny = root().join("tests/fixtures/tiny-models");
    let tmp = std::env::temp_dir().join(format!("pl-gen-ids-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(&tiny).unwrap() {
        let dir = e.unwrap().path();
        let Ok(g) = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu)
        else {
            continue;
        };
        let Some(want) = g.get("generated_ids") else {
            continue;
        };
        let want: Vec<u32> = want.to_dtype(DType::U32).unwrap().to_vec1().unwrap();
        let ids: Vec<Vec<u32>> = g["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2()
            .unwrap();
        let f = tmp.join("ids.json");
        std::fs::write(&f, serde_json::to_string(&[&ids[0][..12]]).unwrap()).unwrap();
        let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let length_dependent = cfg.contains("\"dynamic\"") || cfg.contains("longrope");
        let modes: &[&[&str]] = if length_dependent {
            &[&[]]
        } else {
            &[&[], &["--no-kv-cache"]]
        };
        for extra in modes {
            let mut args = vec![
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--ids",
                f.to_str().unwrap(),
            ];
            args.extend(["--max-new-tokens", "8", "--greedy", "--no-stop", "--json"]);
            args.extend(extra.iter());
            let out = Command::new(env!("CARGO_BIN_EXE_persona-lens"))
                .args(&args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let got: Vec<u32> = serde_json::from_value(v["generated_ids"].clone()).unwrap();
            assert_eq!(got, want, "{}: {extra:?}", dir.display());
        }
        n += 1;
    }
    assert!(
        n >= 11,
        "expected the second and third tiny sets, found {n} with continuations"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
