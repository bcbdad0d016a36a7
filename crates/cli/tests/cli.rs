//! The `persona-lens` binary: JSON interfaces on the real models and one-line errors on bad input.

use std::process::Command;

mod common;
#[path = "../../rate/tests/mock_judge/mod.rs"]
mod mock_judge;

use common::{assert_one_line_error, models, root, run};

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn tokenize_json_matches_golden_ids() {
    let golden = json(
        &std::fs::read_to_string(root().join("tests/fixtures/golden/gemma-3-270m/prompts.json"))
            .unwrap(),
    );
    let p = &golden["prompts"][7];
    let (code, out, err) = run(&[
        "tokenize",
        "--model",
        "gemma-3-270m",
        "--json",
        p["text"].as_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    assert_eq!(v["ids"], p["input_ids"]);
    assert_eq!(v["tokens"][0], "<bos>");
    let (_, out, _) = run(&[
        "tokenize",
        "--model",
        "gemma-3-270m",
        "--json",
        "--no-special",
        p["text"].as_str().unwrap(),
    ]);
    let ids = json(&out)["ids"].as_array().unwrap().clone();
    assert_eq!(ids[..], p["input_ids"].as_array().unwrap()[1..]);
}

#[test]
fn generate_json_is_greedy_golden() {
    let golden = json(
        &std::fs::read_to_string(
            root().join("tests/fixtures/golden/smollm2-135m-instruct/prompts.json"),
        )
        .unwrap(),
    );
    let p = &golden["prompts"][7];
    let text = p["text"].as_str().unwrap();
    let (code, out, err) = run(&[
        "generate",
        "--model",
        "smollm2-135m-instruct",
        "--prompt",
        text,
        "--max-new-tokens",
        "16",
        "--greedy",
        "--no-stop",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    assert_eq!(v["prompt_ids"], p["input_ids"]);
    assert_eq!(v["generated_ids"], p["greedy_ids"]);
    assert_eq!(v["text"], p["greedy_text"]);
}

#[test]
fn cache_writes_hook_named_tensors() {
    let dir = std::env::temp_dir().join(format!("pl-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("c.safetensors");
    let (code, _, err) = run(&[
        "cache",
        "--model",
        "smollm2-135m-instruct",
        "--prompt",
        "The capital of Japan is",
        "--prompt",
        "Hi there, how are you today?",
        "--hooks",
        "blocks.*.hook_resid_post,blocks.0.attn.hook_z",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let t = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t.len(), 30 + 1 + 1);
    assert_eq!(t["blocks.29.hook_resid_post"].dims(), &[2, 8, 576]);
    assert_eq!(t["blocks.0.attn.hook_z"].dims(), &[2, 8, 9, 64]);
    assert_eq!(t["logits"].dims(), &[2, 49152]);
    // position-aligned: prompt 0 has 5 tokens, zero beyond
    let tail = t["blocks.29.hook_resid_post"]
        .get(0)
        .unwrap()
        .narrow(0, 5, 3)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert_eq!(tail.to_scalar::<f32>().unwrap(), 0.0);
    // last real position of prompt 0 = golden last-position residual after block 29 (row 30 of resid_last)
    let gold = candle_core::Tensor::read_npy(
        root().join("tests/fixtures/golden/smollm2-135m-instruct/resid_last_p07.npy"),
    )
    .unwrap();
    let a = t["blocks.29.hook_resid_post"]
        .get(0)
        .unwrap()
        .get(4)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = gold.get(30).unwrap().to_vec1::<f32>().unwrap();
    let num: f32 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    assert!((num / den).sqrt() < 1e-4);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn inspect_reports_architecture_and_memory() {
    let (code, out, err) = run(&["inspect", "--model", "smollm2-135m-instruct", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["config"]["n_layers"], 30);
    assert_eq!(v["config"]["n_kv_heads"], 3);
    assert_eq!(v["tokenizer"]["has_chat_template"], true);
    let f32_bytes = v["weight_memory_bytes"].as_u64().unwrap();
    let (_, out, _) = run(&[
        "inspect",
        "--model",
        "smollm2-135m-instruct",
        "--quantized",
        "--json",
    ]);
    let q_bytes = json(&out)["weight_memory_bytes"].as_u64().unwrap();
    assert!(
        q_bytes * 3 < f32_bytes,
        "quantized {q_bytes} vs f32 {f32_bytes}"
    );
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let dir = std::env::temp_dir().join(format!("pl-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    assert_one_line_error(
        &["inspect", "--model", "/nonexistent/model.gguf"],
        "not found",
    );
    assert_one_line_error(&["inspect", "--model", "no-such-model"], "neither a file");

    // truncated GGUF: the real file cut short
    let real = std::fs::read(models().join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let trunc = dir.join("trunc.gguf");
    std::fs::write(&trunc, &real[..real.len() / 2]).unwrap();
    assert_one_line_error(
        &["inspect", "--model", trunc.to_str().unwrap()],
        "truncated",
    );

    // GGUF of an unsupported architecture
    let bert = dir.join("bert.gguf");
    {
        use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
        let t = QTensor::quantize(
            &candle_core::Tensor::zeros(
                (4, 32),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let arch = gguf_file::Value::String("bert".into());
        let mut f = std::fs::File::create(&bert).unwrap();
        gguf_file::write(
            &mut f,
            &[("general.architecture", &arch)],
            &[("token_embd.weight", &t)],
        )
        .unwrap();
    }
    assert_one_line_error(
        &["inspect", "--model", bert.to_str().unwrap()],
        "unsupported architecture 'bert'",
    );

    // config.json missing a field
    let hf = dir.join("tiny-broken");
    std::fs::create_dir_all(&hf).unwrap();
    let tiny = root().join("tests/fixtures/tiny-models/tiny-llama");
    let mut cfg = json(&std::fs::read_to_string(tiny.join("config.json")).unwrap());
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(hf.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(tiny.join("model.safetensors"), hf.join("model.safetensors")).unwrap();
    assert_one_line_error(
        &["inspect", "--model", hf.to_str().unwrap()],
        "missing field 'hidden_size'",
    );

    // unknown hook name, layer out of range
    let out = dir.join("x.safetensors");
    let o = out.to_str().unwrap();
    assert_one_line_error(
        &[
            "cache",
            "--model",
            "smollm2-135m-instruct",
            "--prompt",
            "hi",
            "--hooks",
            "blocks.0.hook_nope",
            "--out",
            o,
        ],
        "unknown hook",
    );
    assert_one_line_error(
        &[
            "cache",
            "--model",
            "smollm2-135m-instruct",
            "--prompt",
            "hi",
            "--hooks",
            "blocks.30.hook_resid_pre",
            "--out",
            o,
        ],
        "out of range",
    );
    assert!(!out.exists(), "no output on error");

    // prompt longer than the context window (8192 tokens), empty prompt
    let long = "word ".repeat(9000);
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "smollm2-135m-instruct",
            "--prompt",
            &long,
            "--max-new-tokens",
            "1",
        ],
        "longer than the context window",
    );
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "gemma-3-270m",
            "--prompt",
            "",
            "--max-new-tokens",
            "1",
        ],
        "empty",
    );
    assert_one_line_error(
        &["tokenize", "--model", "gemma-3-270m", "--chat", "hi"],
        "no chat template",
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn analysis_bad_inputs_give_one_line_errors() {
    let dir = std::env::temp_dir().join(format!("pl-bad-analysis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out");
    let out_s = out.to_str().unwrap();
    let smol = ["--model", "smollm2-135m-instruct", "--quiet"];

    // Malformed dataset: the error points at the JSON field.
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"prompt_pairs": {"expertise_level": [{"id": "exp_001", "topic": "physics",
            "novice": {"prompt": "I'm 5. Why is the sky blue?"}, "expert": {"promt": "x"}}]}}"#,
    )
    .unwrap();
    let mut args = vec!["probe", "--dataset", bad.to_str().unwrap(), "--out", out_s];
    args.extend(smol);
    assert_one_line_error(&args, "prompt_pairs.expertise_level[0].expert");

    // Empty class: a file with sycophancy pairs only has no novice/expert prompts.
    let syc = dir.join("syc.json");
    std::fs::write(
        &syc,
        r#"{"prompt_pairs": {"sycophancy_triggers": [{"id": "syc_001", "topic": "flat_earth",
            "biased": {"prompt": "I think the earth is flat. Explain gravity."},
            "neutral": {"prompt": "Explain gravity."}}]}}"#,
    )
    .unwrap();
    let mut args = vec![
        "direction",
        "--dataset",
        syc.to_str().unwrap(),
        "--out",
        out_s,
    ];
    args.extend(smol);
    assert_one_line_error(&args, "class 'novice' has no prompts");

    // A tracked word that is not a single token.
    let mut args = vec![
        "lens",
        "--pair-id",
        "physics",
        "--n-questions-per-pair",
        "1",
        "--templates",
        "0",
        "--expert-words",
        "photosynthesisological",
        "--out",
        out_s,
    ];
    args.extend(smol);
    assert_one_line_error(&args, "not a single token");

    // Layer out of range (SmolLM2-135M has 30 blocks).
    let mut args = vec![
        "direction",
        "--pair-id",
        "physics",
        "--n-questions-per-pair",
        "1",
        "--layer",
        "30",
        "--out",
        out_s,
    ];
    args.extend(smol);
    assert_one_line_error(&args, "--layer 30 is out of range");

    // Unknown topic / persona pair.
    let mut args = vec!["probe", "--pair-id", "astrology", "--out", out_s];
    args.extend(smol);
    assert_one_line_error(
        &args,
        "matched no prompt (it matches pair ids and topics; topics here: astronomy, biology",
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn lens_json_is_the_documented_interface() {
    let (code, out, err) = run(&[
        "lens",
        "--model",
        "gemma-3-270m",
        "--prompt",
        "The capital of France is",
        "--top-k",
        "3",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v = json(&out);
    let ids = v["input_ids"].as_array().unwrap();
    assert_eq!(ids[0], 2, "BOS first");
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 19);
    for (i, l) in layers.iter().enumerate() {
        assert_eq!(l["resid_index"], i);
        let top = l["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert!(top[0][1].as_f64().unwrap() >= top[1][1].as_f64().unwrap());
    }
}

#[test]
fn patch_json_matches_golden_and_bad_inputs_fail_cleanly() {
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/golden/gemma-3-270m/patching.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let clean = g["clean_text"].as_str().unwrap();
    let corrupted = g["corrupted_text"].as_str().unwrap();
    let (code, out, err) = run(&[
        "patch",
        "--model",
        "gemma-3-270m",
        "--clean",
        clean,
        "--corrupted",
        corrupted,
        "--answer-a",
        "simple",
        "--answer-b",
        "physics",
        "--sweep",
        "z_last",
        "--json",
        "--no-files",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        (v["clean_logit_diff"].as_f64().unwrap() - g["clean_logit_diff"].as_f64().unwrap()).abs()
            < 1e-3
    );
    assert!(
        (v["corrupted_logit_diff"].as_f64().unwrap() - g["corrupted_logit_diff"].as_f64().unwrap())
            .abs()
            < 1e-3
    );
    let ours = v["values"].as_array().unwrap();
    let want = g["head_out_patch_last_pos"]["values"].as_array().unwrap();
    assert_eq!(ours.len(), want.len());
    for (a, b) in ours.iter().zip(want) {
        for (x, y) in a.as_array().unwrap().iter().zip(b.as_array().unwrap()) {
            assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-3);
        }
    }
    // Path patching to the logits: every head is a sender, values in JSON.
    let (code, out, err) = run(&[
        "path-patch",
        "--model",
        "gemma-3-270m",
        "--clean",
        clean,
        "--corrupted",
        corrupted,
        "--answer-a",
        "simple",
        "--answer-b",
        "physics",
        "--json",
        "--no-files",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let d = &v["runs"]["denoise"];
    assert_eq!(d["values"].as_array().unwrap().len(), 18 * 4);
    assert_eq!(d["senders"][0], "L0H0");
    assert_eq!(v["receivers"]["kind"], "logits");
    // Heads matter on the direct path: some sender moves the logit difference by > 0.1.
    let base = d["base_metric"].as_f64().unwrap();
    assert!(d["values"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| (x.as_f64().unwrap() - base).abs() > 0.1));
    // Unequal lengths, multi-token answers, bad heads: one line, exit 2, no panic.
    for (args, needle) in [
        (
            vec![
                "patch",
                "--clean",
                "I am a child. Hi",
                "--corrupted",
                "I am a theoretical physicist. Hi",
                "--answer-a",
                "simple",
                "--answer-b",
                "physics",
                "--no-files",
            ],
            "different token lengths",
        ),
        (
            vec![
                "patch",
                "--clean",
                clean,
                "--corrupted",
                corrupted,
                "--answer-a",
                "simple",
                "--answer-b",
                "antidisestablishmentarianism",
                "--no-files",
            ],
            "not a single token",
        ),
        (
            vec!["ablate", "--heads", "L99H0", "--pair-id", "physics"],
            "out of range",
        ),
        (
            vec!["ablate", "--heads", "banana", "--pair-id", "physics"],
            "write heads as",
        ),
        (
            vec![
                "path-patch",
                "--clean",
                clean,
                "--corrupted",
                corrupted,
                "--receivers",
                "L3H0",
                "--senders",
                "L5H0",
                "--no-files",
            ],
            "is not before any receiver",
        ),
        (
            vec![
                "path-patch",
                "--clean",
                clean,
                "--corrupted",
                corrupted,
                "--receivers",
                "L3H0",
                "--receiver-input",
                "q,query",
                "--no-files",
            ],
            "unknown receiver input",
        ),
    ] {
        let mut a = args.clone();
        a.extend(["--model", "gemma-3-270m"]);
        let (code, _, err) = run(&a);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

fn write_npy(path: &std::path::Path, v: &[f32]) {
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        v.len()
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((header.len() as u16).to_le_bytes());
    b.extend(header.as_bytes());
    for x in v {
        b.extend(x.to_le_bytes());
    }
    std::fs::write(path, b).unwrap();
}

fn jsonl(p: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(json)
        .collect()
}

/// direction -> steer -> control-vector export -> llama.cpp's reader (Python `gguf`) -> steer
/// from the control vector: the same generations; plus bad directions and layers.
#[test]
fn steering_and_control_vectors() {
    let t = std::env::temp_dir().join(format!("pl-steer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&t);
    let s = |p: &str| t.join(p).to_string_lossy().to_string();
    let small = [
        "--n-questions-per-pair",
        "1",
        "--templates",
        "0",
        "--pair-id",
        "physics,biology",
    ];
    let dir_out = s("dir");
    let mut args = vec!["direction", "--out", &dir_out, "--quiet"];
    args.extend(small);
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let dirs = s("dir/directions.safetensors");
    let steer = |dir: &str, extra: &[&str], out: &str| -> Vec<serde_json::Value> {
        let mut a = vec![
            "steer",
            "--direction",
            dir,
            "--layer",
            "9",
            "--max-new-tokens",
            "10",
            "--n-prompts",
            "2",
            "--out",
            out,
            "--quiet",
        ];
        a.extend(small);
        a.extend(extra);
        let (code, _, err) = run(&a);
        assert_eq!(code, 0, "{err}");
        jsonl(&std::path::Path::new(out).join("patched_outputs.jsonl"))
    };
    let out1 = s("steer1");
    let recs = steer(&dirs, &["--alpha", "0,6", "--norm", "raw"], &out1);
    assert_eq!(recs.len(), 4);
    for r in &recs {
        for k in [
            "prompt",
            "persona",
            "layer",
            "alpha",
            "seed",
            "sampling",
            "generated_ids",
            "text",
            "hook",
            "norm",
            "positions",
        ] {
            assert!(!r[k].is_null(), "record lacks {k}: {r}");
        }
        assert_eq!(r["hook"], "blocks.10.hook_resid_pre");
        assert_eq!(r["persona"], "novice");
    }
    assert!(
        recs[..2]
            .iter()
            .zip(&recs[2..])
            .any(|(a, b)| a["generated_ids"] != b["generated_ids"]),
        "alpha 6 changed nothing"
    );
    // Rate with a judge that breaks after one verdict: one-line error, rated records kept;
    // the rerun asks only for what is missing.
    let input = std::path::Path::new(&out1).join("patched_outputs.jsonl");
    let inp = input.to_string_lossy().to_string();
    let flaky = mock_judge::start("e", 0, 1);
    assert_one_line_error(
        &[
            "rate",
            "--input",
            &inp,
            "--judge-url",
            &flaky.url,
            "--judge-model",
            "mock",
            "--judge-retries",
            "0",
            "--quiet",
        ],
        "rated records are kept",
    );
    let partial =
        std::fs::read_to_string(std::path::Path::new(&out1).join("scores.jsonl.partial")).unwrap();
    assert_eq!(partial.lines().count(), 3, "{partial}");
    let good = mock_judge::start("e", 0, usize::MAX);
    let (code, out, err) = run(&[
        "rate",
        "--input",
        &inp,
        "--judge-url",
        &good.url,
        "--judge-model",
        "mock",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(good.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    let scores = jsonl(&std::path::Path::new(&out1).join("scores.jsonl"));
    assert_eq!(scores.len(), 4);
    for sc in &scores {
        assert!(sc["perplexity"].as_f64().unwrap() > 1.0);
        assert!(
            sc["readability"]["flesch_kincaid_grade"].is_number() || sc["readability"].is_null()
        );
        assert_eq!(sc["judge_win"].is_null(), sc["alpha"].as_f64() == Some(0.0));
    }
    let summary = json(&out);
    assert_eq!(summary["cells"].as_array().unwrap().len(), 2);
    assert!(!std::path::Path::new(&out1)
        .join("scores.jsonl.partial")
        .exists());
    // Export unit x 2 at blocks 5 and 9, read it with llama.cpp's Python reader.
    let cv = s("cv.gguf");
    let (code, out, err) = run(&[
        "control-vector",
        "export",
        "--direction",
        &dirs,
        "--layer",
        "5,9",
        "--norm",
        "unit",
        "--alpha",
        "2",
        "--out",
        &cv,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("read back identical"), "{out}");
    let py = std::env::var("PERSONA_LENS_PYTHON").unwrap_or_else(|_| "python3".into());
    let o = Command::new(&py)
        .arg(root().join("tests/scripts/read_control_vector.py"))
        .arg(&cv)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py}: {e}; run `make test` (it installs gguf)"));
    assert!(
        o.status.success(),
        "gguf reader failed (run `make test`, which installs the gguf package): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let g = json(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(g["architecture"], "controlvector");
    assert_eq!(g["model_hint"], "gemma3");
    assert_eq!(g["layer_count"], 2);
    let d9 = &g["tensors"]["direction.9"];
    assert_eq!(d9["shape"], serde_json::json!([640]));
    assert_eq!(d9["type"], "F32");
    let v9: Vec<f64> = d9["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let n: f64 = v9.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((n - 2.0).abs() < 1e-5, "norm {n}");
    // Import it back: identical numbers to what the Python reader saw.
    let (code, out, err) = run(&["control-vector", "import", "--input", &cv, "--json"]);
    assert_eq!(code, 0, "{err}");
    let imp = json(&out);
    assert_eq!(imp["layers"].as_array().unwrap().len(), 2);
    // Steering from the control vector (raw, alpha 1) = from the directions (unit, alpha 2).
    let a = steer(&cv, &["--alpha", "1", "--norm", "raw"], &s("steer2"));
    let b = steer(&dirs, &["--alpha", "2", "--norm", "unit"], &s("steer3"));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["generated_ids"], y["generated_ids"]);
    }
    // Bad directions and layers: one line, no panic.
    write_npy(&t.join("narrow.npy"), &[1.0; 10]);
    write_npy(&t.join("nan.npy"), &[f32::NAN; 640]);
    write_npy(&t.join("zero.npy"), &[0.0; 640]);
    let models_gguf = models().join("gemma-3-270m-q4_k_m.gguf");
    let mg = models_gguf.to_string_lossy().to_string();
    for (d, layer, needle) in [
        (s("narrow.npy"), "9", "width 10"),
        (s("nan.npy"), "9", "NaN"),
        (s("zero.npy"), "9", "all zeros"),
        (dirs.clone(), "99", "out of range"),
        (s("missing.safetensors"), "9", "not found"),
        (mg.clone(), "9", "not a control vector"),
    ] {
        assert_one_line_error(
            &[
                "steer",
                "--direction",
                &d,
                "--layer",
                layer,
                "--n-prompts",
                "1",
            ],
            needle,
        );
    }
    // A strength that overflows the residual stream: one line naming where it broke, not
    // `<pad>` tokens with exit 0.
    let mut huge = vec![
        "steer",
        "--direction",
        dirs.as_str(),
        "--layer",
        "9",
        "--alpha",
        "-1e30",
        "--norm",
        "raw",
        "--n-prompts",
        "1",
        "--max-new-tokens",
        "2",
        "--quiet",
    ];
    huge.extend(small);
    let huge_out = s("steer_huge");
    huge.extend(["--out", huge_out.as_str()]);
    assert_one_line_error(
        &huge,
        "activations out of range at blocks.10.hook_resid_post",
    );
    // Patch mode: the expert prompt's activation into the novice prompt changes the answer.
    let patched = steer(
        &dirs,
        &["--mode", "patch", "--positions", "prompt"],
        &s("steer4"),
    );
    assert_eq!(patched.len(), 2);
    assert!(patched.iter().all(|r| r["mode"] == "patch"));
    assert!(patched
        .iter()
        .zip(&recs[..2])
        .any(|(p, b)| p["generated_ids"] != b["generated_ids"]));
    assert_one_line_error(
        &[
            "steer",
            "--mode",
            "patch",
            "--layer",
            "9",
            "--n-prompts",
            "1",
        ],
        "--positions prompt",
    );
    assert_one_line_error(
        &[
            "control-vector",
            "export",
            "--direction",
            &dirs,
            "--layer",
            "0",
            "--out",
            &s("x.gguf"),
        ],
        "direction.0",
    );
    let _ = std::fs::remove_dir_all(&t);
}

#[test]
fn registry_and_hf_architectures_from_the_cli() {
    // The registry lists the notes' models with hub ids and facts.
    let (code, out, err) = run(&["models", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows = json(&out);
    let g2 = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "gemma-2-2b-it")
        .expect("gemma-2-2b-it in the registry");
    assert_eq!(g2["hub"], "google/gemma-2-2b-it");
    assert_eq!(g2["arch"], "gemma2");
    let g = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "gemma-3-270m")
        .unwrap();
    assert!(g["available"].as_str().unwrap().starts_with("file "), "{g}");
    let q = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "qwen2.5-0.5b-instruct")
        .expect("qwen2.5-0.5b-instruct in the registry");
    assert_eq!(q["hub"], "Qwen/Qwen2.5-0.5B-Instruct");
    assert_eq!(q["arch"], "qwen2");
    assert_eq!(q["chat"], true);

    // Every HF architecture through `inspect` and `cache` (ids-only tiny checkpoints).
    for (dir, arch, pos) in [
        ("tiny-gpt2", "gpt2", "learned"),
        ("tiny-gemma2", "gemma2", "rotary"),
        ("tiny-gemma3", "gemma3", "rotary"),
        ("tiny-llama", "llama", "rotary"),
        ("tiny-qwen2", "qwen2", "rotary"),
        ("tiny-qwen3", "qwen3", "rotary"),
        ("tiny-mistral", "mistral", "rotary"),
        ("tiny-phi3", "phi3", "rotary"),
        ("tiny-olmo2", "olmo2", "rotary"),
    ] {
        let p = root().join("tests/fixtures/tiny-models").join(dir);
        let (code, out, err) = run(&["inspect", "--model", p.to_str().unwrap(), "--json"]);
        assert_eq!(code, 0, "{dir}: {err}");
        let v = json(&out);
        assert_eq!(v["config"]["arch"], arch, "{v}");
        assert_eq!(v["positions"], pos);
    }

    // A registry name that is neither fetched nor cached: one line naming the hub id.
    let empty = std::env::temp_dir().join(format!("pl-empty-hub-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_persona-lens"))
        .args(["inspect", "--model", "gemma-2-2b-it"])
        .env("PERSONA_LENS_MODELS", models())
        .env("HF_HUB_CACHE", &empty)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("google/gemma-2-2b-it"), "{err}");
}
