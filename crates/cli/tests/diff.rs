//! `persona-lens diff`: encode matches the Python fixtures through the CLI; harvest -> train ->
//! analyze -> verify runs end to end on the real models (gemma-3-270m base vs SmolLM2 chat,
//! last-token pairing across tokenizers and widths); bad inputs give one-line errors.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;
use common::{assert_one_line_error as one_line_error, ok, root};

fn fx() -> PathBuf {
    root().join("tests/fixtures/crosscoders")
}

fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
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

#[test]
fn encode_matches_python_for_every_layout() {
    let io = load(&fx().join("io.safetensors"));
    let tmp = std::env::temp_dir().join(format!("pl-diff-enc-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let input = fx().join("io.safetensors");
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let cases: [Case; 5] = [
        (
            "l1",
            "true",
            &[
                ("features", "l1.encode"),
                ("scaled_features", "l1.get_activations"),
                ("reconstruction", "l1.forward"),
            ],
        ),
        (
            "l1/model_final.pt",
            "true",
            &[("features", "l1.encode"), ("reconstruction", "l1.forward")],
        ),
        (
            "batchtopk",
            "true",
            &[
                ("features", "batchtopk.encode_threshold"),
                ("scaled_features", "batchtopk.get_activations"),
                ("reconstruction", "batchtopk.forward"),
            ],
        ),
        (
            "batchtopk/model.safetensors",
            "false",
            &[("features", "batchtopk.encode_topk")],
        ),
        (
            "kissane",
            "true",
            &[
                ("features", "kissane.acts"),
                ("reconstruction", "kissane.recon"),
            ],
        ),
    ];
    for (i, (cc, thr, checks)) in cases.iter().enumerate() {
        let out = tmp.join(format!("{i}.safetensors"));
        ok(&[
            "diff",
            "encode",
            "--crosscoder",
            fx().join(cc).to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--use-threshold",
            thr,
        ]);
        let got = load(&out);
        for (ours, theirs) in checks.iter() {
            let d = max_diff(&got[*ours], &io[*theirs]);
            assert!(d <= 1e-5, "{cc}: {ours} vs {theirs}: {d}");
        }
    }
    // bad inputs
    let bad = tmp.join("bad.safetensors");
    let x = Tensor::zeros((3, 2, 15), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("x".to_string(), x)].into_iter().collect(), &bad).unwrap();
    let o = tmp.join("o.safetensors");
    let l1 = fx().join("l1");
    one_line_error(
        &[
            "diff",
            "encode",
            "--crosscoder",
            l1.to_str().unwrap(),
            "--input",
            bad.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ],
        "expects (batch, 2, 16)",
    );
    let nox = tmp.join("nox.safetensors");
    candle_core::safetensors::save(
        &[(
            "y".to_string(),
            Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
        )]
        .into_iter()
        .collect(),
        &nox,
    )
    .unwrap();
    one_line_error(
        &[
            "diff",
            "encode",
            "--crosscoder",
            l1.to_str().unwrap(),
            "--input",
            nox.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ],
        "no tensor named 'x'",
    );
    // NaN activations: refused, not encoded as zeros.
    let nan = tmp.join("nan.safetensors");
    let x = Tensor::full(f32::NAN, (3, 2, 16), &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("x".to_string(), x)].into_iter().collect(), &nan).unwrap();
    one_line_error(
        &[
            "diff",
            "encode",
            "--crosscoder",
            l1.to_str().unwrap(),
            "--input",
            nan.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ],
        "activations out of range at tensor 'x'",
    );
    let txt = tmp.join("weights.txt");
    std::fs::write(&txt, "not weights").unwrap();
    one_line_error(
        &[
            "diff",
            "encode",
            "--crosscoder",
            txt.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ],
        "unknown dictionary format",
    );
    let corrupt = tmp.join("model.safetensors");
    std::fs::write(&corrupt, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    one_line_error(
        &[
            "diff",
            "encode",
            "--crosscoder",
            corrupt.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ],
        "corrupt",
    );
    assert!(!o.exists(), "no output after errors");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn harvest_train_analyze_verify_on_real_models() {
    let tmp = std::env::temp_dir().join(format!("pl-diff-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let store = tmp.join("store");
    let cc = tmp.join("cc");
    // a small built-in corpus: 120 dataset prompts, the verification/sycophancy prompts, 4
    // self-sampled texts per model
    let out = ok(&[
        "diff",
        "harvest",
        "--out",
        store.to_str().unwrap(),
        "--max-dataset-items",
        "120",
        "--self-samples",
        "4",
        "--self-sample-tokens",
        "16",
        "--quiet",
    ]);
    assert!(out.contains("Last alignment"), "{out}");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(store.join("paired.json")).unwrap()).unwrap();
    assert_eq!(
        meta["dims"],
        serde_json::json!([640, 576]),
        "gemma and SmolLM2 widths"
    );
    assert_eq!(meta["d"], 640);
    let rows = meta["rows"].as_u64().unwrap();
    assert_eq!(
        rows as usize,
        meta["samples"].as_array().unwrap().len(),
        "one row per sample"
    );
    // the padded SmolLM2 coordinates are zero
    let x = load(&store.join("shard_00000.safetensors"))["acts"].clone();
    let pad = x
        .narrow(1, 1, 1)
        .unwrap()
        .narrow(2, 576, 64)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(pad, 0.0);
    let train = ok(&[
        "diff",
        "train",
        "--store",
        store.to_str().unwrap(),
        "--out",
        cc.to_str().unwrap(),
        "--dict-size",
        "64",
        "--steps",
        "60",
        "--batch-size",
        "64",
        "--checkpoint-every",
        "20",
        "--warmup-steps",
        "5",
        "--quiet",
    ]);
    assert!(train.contains("trained 60 steps"), "{train}");
    // 10 % of the samples held out by default: the validation numbers come from them and the
    // training rows are the rest
    let log: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cc.join("train_log.json")).unwrap()).unwrap();
    let val = &log["validation"];
    let held = val["samples"].as_u64().unwrap();
    assert!((3..=40).contains(&held), "{val}");
    assert_eq!(
        val["rows"].as_u64().unwrap(),
        held,
        "one row per sample (last-token pairs)"
    );
    assert_eq!(log["train_rows"].as_u64().unwrap() + held, rows);
    let fve = val["fve"].as_f64().unwrap();
    assert!(fve.is_finite() && fve < 1.0, "{val}");
    assert_eq!(log["config"]["objective"]["kind"], "batch_top_k");
    for f in [
        "model.safetensors",
        "config.json",
        "train_log.json",
        "training.png",
        "training.svg",
    ] {
        assert!(cc.join(f).exists(), "{f}");
    }
    // a second train into the same folder without --resume refuses
    one_line_error(
        &[
            "diff",
            "train",
            "--store",
            store.to_str().unwrap(),
            "--out",
            cc.to_str().unwrap(),
            "--steps",
            "60",
        ],
        "--resume",
    );
    let an = tmp.join("analysis");
    let s = ok(&[
        "diff",
        "analyze",
        "--crosscoder",
        cc.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--pair-id",
        "physics",
        "--n-questions-per-pair",
        "6",
        "--templates",
        "0,1,2,3",
        "--n-verify",
        "1",
        "--out",
        an.to_str().unwrap(),
        "--json",
        "--quiet",
    ]);
    let s: serde_json::Value = serde_json::from_str(&s).unwrap();
    // 6 questions x 4 templates: half of the questions and half of the templates rank (3 x 2
    // pairs), the other halves test (3 x 2); mixed pairs are in neither split.
    assert_eq!(s["n_pairs_select"], 6);
    assert_eq!(s["n_pairs_evaluate"], 6);
    assert_eq!(s["n_pairs_analyzed"], 12);
    assert_eq!(s["top_candidates"][0]["held_out"]["n_pairs"], 6);
    assert!(s["exploratory"]
        .as_str()
        .unwrap()
        .contains("widths 640 vs 576"));
    // a different-family pair gets no per-token KL or PCA of differences, and says why
    assert!(s["baselines"]["per_token_kl"].is_null() && s["baselines"]["pca"].is_null());
    assert!(s["baselines"]["not_computed"]
        .as_str()
        .unwrap()
        .contains("same token ids"));
    let null = &s["top_null"];
    assert_eq!(null["feature_idx"], s["top_candidates"][0]["feature_idx"]);
    assert!(null["p_value"].as_f64().unwrap() > 0.0 && null["p_value"].as_f64().unwrap() <= 1.0);
    // the one verified candidate's claim is never supported on a different-family pair
    for c in s["claims"].as_array().unwrap() {
        assert_eq!(c["supported"], false, "{c}");
        assert!(c["statement"].as_str().unwrap().starts_with("Exploratory"));
    }
    assert_eq!(s["cross_coder_available"], true);
    let counts = &s["latent_classes"]["counts"];
    let total: u64 = ["base_only", "chat_only", "shared", "other"]
        .iter()
        .map(|k| counts[k].as_u64().unwrap())
        .sum();
    assert_eq!(total, 64);
    let v = &s["verification"][0];
    assert_eq!(v["rows"].as_array().unwrap().len(), 27);
    assert_eq!(v["n_neutral"], 12);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(an.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["top_candidates"], s["top_candidates"]);
    for p in summary["plots"].as_array().unwrap() {
        let p = an.join(p.as_str().unwrap());
        let bytes = std::fs::read(&p).unwrap();
        if p.extension().unwrap() == "png" {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", p.display());
        } else {
            assert!(
                String::from_utf8_lossy(&bytes).contains("<svg"),
                "{}",
                p.display()
            );
        }
    }
    // The report's two renderings (the report crate's document model): the top candidate's
    // row in both, every PNG plot embedded in the HTML.
    let md = std::fs::read_to_string(an.join("report.md")).unwrap();
    let html = std::fs::read_to_string(an.join("report.html")).unwrap();
    let top = format!("| {} |", s["top_candidates"][0]["feature_idx"]);
    assert!(md.contains(&top), "report.md lacks {top}");
    assert!(html.contains(&format!(
        "<td>{}</td>",
        s["top_candidates"][0]["feature_idx"]
    )));
    let n_png = summary["plots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p.as_str().unwrap().ends_with(".png"))
        .count();
    assert!(n_png > 0);
    assert_eq!(html.matches("data:image/png;base64,").count(), n_png);
    // verify: the top candidate's activations equal what analyze reported for it
    let top = s["top_candidates"][0]["feature_idx"]
        .as_u64()
        .unwrap()
        .to_string();
    let vj = ok(&[
        "diff",
        "verify",
        "--crosscoder",
        cc.to_str().unwrap(),
        "--latent",
        &top,
        "--out",
        tmp.join("verify").to_str().unwrap(),
        "--json",
        "--quiet",
    ]);
    let vj: serde_json::Value = serde_json::from_str(&vj).unwrap();
    let a: Vec<f64> = vj[0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["activation"].as_f64().unwrap())
        .collect();
    let b: Vec<f64> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["activation"].as_f64().unwrap())
        .collect();
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
    }
    // fallback without a crosscoder: chat-model dimensions
    let f = ok(&[
        "diff",
        "analyze",
        "--pair-id",
        "physics",
        "--n-questions-per-pair",
        "4",
        "--templates",
        "0,1",
        "--n-verify",
        "1",
        "--out",
        tmp.join("direct").to_str().unwrap(),
        "--json",
        "--quiet",
    ]);
    let f: serde_json::Value = serde_json::from_str(&f).unwrap();
    assert_eq!(f["cross_coder_available"], false);
    assert_eq!(f["feature_type"], "Dimension");
    assert!(f["top_candidates"][0]["feature_idx"].as_u64().unwrap() < 576);
    assert_eq!(
        f["claims"],
        serde_json::json!([]),
        "no crosscoder, no latent claims"
    );
    // one question cannot be split into a ranking and a test half
    one_line_error(
        &[
            "diff",
            "analyze",
            "--pair-id",
            "physics",
            "--n-questions-per-pair",
            "1",
            "--templates",
            "0",
            "--out",
            tmp.join("direct1").to_str().unwrap(),
        ],
        "at least 2 pairs",
    );
    // bad: a crosscoder of another width
    one_line_error(
        &[
            "diff",
            "analyze",
            "--crosscoder",
            fx().join("l1").to_str().unwrap(),
            "--out",
            tmp.join("x").to_str().unwrap(),
        ],
        "does not match models",
    );
    one_line_error(
        &[
            "diff",
            "train",
            "--store",
            tmp.join("nostore").to_str().unwrap(),
            "--out",
            tmp.join("y").to_str().unwrap(),
        ],
        "diff harvest",
    );
    one_line_error(
        &[
            "diff",
            "verify",
            "--crosscoder",
            cc.to_str().unwrap(),
            "--latent",
            "999",
        ],
        "out of range",
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn a_pair_with_one_tokenizer_reads_the_chat_ids_per_token() {
    // No base/chat twin is on this machine: the same chat model on both sides has the matched
    // pair's defining property (one tokenizer, one width), so `--template auto` must feed both
    // the chat template's ids and pair rows per token.
    let tmp = std::env::temp_dir().join(format!("pl-diff-twin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let corpus = tmp.join("corpus.txt");
    std::fs::write(&corpus, "Why is the sky blue?\nI am five. What is rain?\n").unwrap();
    let store = tmp.join("store");
    ok(&[
        "diff",
        "harvest",
        "--base-model",
        "smollm2-135m-instruct",
        "--chat-model",
        "smollm2-135m-instruct",
        "--corpus",
        corpus.to_str().unwrap(),
        "--out",
        store.to_str().unwrap(),
        "--quiet",
    ]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(store.join("paired.json")).unwrap()).unwrap();
    assert_eq!(meta["alignment"], "tokens");
    assert_eq!(meta["chat_template"], serde_json::json!([true, true]));
    let samples = meta["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    // the chat template wraps each question in more than ten tokens, all paired
    assert!(meta["rows"].as_u64().unwrap() > 20, "{}", meta["rows"]);
    // both sides read the same ids: the paired rows are equal
    let x = load(&store.join("shard_00000.safetensors"))["acts"].clone();
    let diff = (x.narrow(1, 0, 1).unwrap() - x.narrow(1, 1, 1).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    // and a different-family pair cannot be forced onto shared ids
    one_line_error(
        &[
            "diff",
            "harvest",
            "--template",
            "shared",
            "--corpus",
            corpus.to_str().unwrap(),
            "--out",
            tmp.join("bad").to_str().unwrap(),
        ],
        "shared token ids need one tokenizer",
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Every row of a store, in manifest order (whatever files hold them), and the manifest.
fn store_rows(store: &Path) -> (Tensor, serde_json::Value) {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(store.join("paired.json")).unwrap()).unwrap();
    let parts: Vec<Tensor> = meta["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| load(&store.join(s["file"].as_str().unwrap()))["acts"].clone())
        .collect();
    (Tensor::cat(&parts, 0).unwrap(), meta)
}

#[test]
fn a_harvest_in_parts_equals_the_unsharded_store_bitwise_and_resumes() {
    let tmp = std::env::temp_dir().join(format!("pl-diff-parts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let corpus = tmp.join("corpus.txt");
    let lines: Vec<String> = (0..10)
        .map(|i| format!("Question {i}: why does water boil at {} degrees?", 90 + i))
        .collect();
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let harvest = |out: &Path, extra: &[&str]| -> String {
        let mut args = vec![
            "diff",
            "harvest",
            "--base-model",
            "smollm2-135m-instruct",
            "--chat-model",
            "smollm2-135m-instruct",
            "--corpus",
            corpus.to_str().unwrap(),
            "--batch-size",
            "4",
            "--shard-rows",
            "16",
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    let whole = tmp.join("whole");
    harvest(&whole, &[]);
    let parts = tmp.join("parts");
    // Parts finish in any order; the manifest appears with the last one.
    let out = harvest(&parts, &["--shard", "2/3"]);
    assert!(out.contains("not finished yet"), "{out}");
    // A partial store lists what is missing (training can start from it).
    let listed = ok(&["diff", "manifest", "--store", parts.to_str().unwrap()]);
    assert!(
        listed.contains("1 of 3 parts") && listed.contains("[0, 1]"),
        "{listed}"
    );
    harvest(&parts, &["--shard", "0/3"]);
    let out = harvest(&parts, &["--shard", "1/3"]);
    assert!(out.contains("all 3 parts finished"), "{out}");

    let (a, ma) = store_rows(&whole);
    let (b, mb) = store_rows(&parts);
    assert_eq!(ma["alignment"], "tokens");
    assert!(
        mb["shards"].as_array().unwrap().len() > 3,
        "parts split into files"
    );
    assert_eq!(a.dims(), b.dims());
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    assert_eq!(
        bits(&a),
        bits(&b),
        "the parts' rows are the unsharded rows, bitwise"
    );
    assert_eq!(ma["samples"], mb["samples"]);
    let sharding = &mb["sharding"];
    assert_eq!(sharding["missing"], serde_json::json!([]));
    let ranges: Vec<(u64, u64)> = sharding["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["first_sample"].as_u64().unwrap(),
                p["n_samples"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ranges, vec![(0, 4), (4, 4), (8, 2)]);

    // --resume skips a finished part, and harvests again a part whose file was damaged.
    let out = harvest(&parts, &["--shard", "1/3", "--resume"]);
    assert!(out.contains("skipped"), "{out}");
    let damaged = parts.join(sharding["parts"][0]["files"][0]["file"].as_str().unwrap());
    std::fs::write(&damaged, b"not a safetensors file").unwrap();
    let out = harvest(&parts, &["--shard", "0/3", "--resume"]);
    assert!(!out.contains("skipped"), "{out}");
    assert_eq!(bits(&store_rows(&parts).0), bits(&a));

    one_line_error(
        &[
            "diff",
            "harvest",
            "--shard",
            "3/3",
            "--out",
            tmp.join("x").to_str().unwrap(),
        ],
        "is not a shard",
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
