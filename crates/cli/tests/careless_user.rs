//! Inputs a careless user gives: each is refused in one line (`error: ...`, exit 2, no panic),
//! before any model loads where the input alone is wrong, and before any analysis work where the
//! model decides it.

use std::path::PathBuf;

mod common;
use common::{assert_one_line_error as refused, root};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pl-careless-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Flag values that are wrong whatever the model: refused before it loads (a model path that
/// does not exist proves the order: its error would come first otherwise).
#[test]
fn bad_flags_are_refused_before_the_model_loads() {
    let nowhere = "/nonexistent/model.gguf";
    for (args, needle) in [
        (
            vec!["probe", "--folds", "0"],
            "cross-validation needs at least 2 folds",
        ),
        (
            vec!["probe", "--folds", "1"],
            "cross-validation needs at least 2 folds",
        ),
        (vec!["probe", "--l2", "nan"], "L2 strength NaN"),
        (vec!["probe", "--l2", "-1"], "L2 strength -1"),
        (
            vec!["probe", "--classes", "novice,novice"],
            "class 'novice' is listed twice",
        ),
        (
            vec![
                "cache",
                "--prompt",
                "hi",
                "--hooks",
                "hook_embed",
                "--out",
                "/tmp/x.safetensors",
                "--threads",
                "100000",
            ],
            "100000 threads: give 1 to 1024",
        ),
        (
            vec![
                "cache",
                "--prompt",
                "hi",
                "--hooks",
                "hook_embed",
                "--out",
                "/tmp/x.safetensors",
                "--batch-size",
                "0",
            ],
            "--batch-size",
        ),
        (
            vec![
                "bench-forward",
                "--prompts",
                "bench/prompts.json",
                "--batch-size",
                "0",
            ],
            "give at least 1",
        ),
        (
            vec!["steer", "--layer", "3", "--batch-size", "0"],
            "--batch-size",
        ),
    ] {
        let mut a = args.clone();
        a.extend(["--model", nowhere]);
        refused(&a, needle);
    }
}

/// `--out` under a regular file: refused before the model loads, in one line.
#[test]
fn output_under_a_file_is_refused_first() {
    let t = tmp("out");
    let file = t.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = file.join("study");
    refused(
        &[
            "run",
            "--model",
            "/nonexistent/model.gguf",
            "--out",
            out.to_str().unwrap(),
        ],
        "cannot write results under",
    );
}

/// Study configs: wrong values are refused before the model loads; a layer the model does not
/// have is refused right after it loads, before any step runs (no step output appears).
#[test]
fn study_configs_are_checked_before_the_steps() {
    let t = tmp("cfg");
    let cfg = t.join("bad.toml");
    std::fs::write(&cfg, "[probe]\nfolds = 1\n").unwrap();
    refused(
        &[
            "run",
            "--model",
            "/nonexistent/model.gguf",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            t.join("o1").to_str().unwrap(),
        ],
        "cross-validation needs at least 2 folds",
    );
    std::fs::write(&cfg, "[steer]\nlayers = [6, 999]\n").unwrap();
    let out = t.join("o2");
    refused(
        &[
            "run",
            "--model",
            "gemma-3-270m",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ],
        "[steer] layers: 999 is out of range; the model has 18 blocks",
    );
    assert!(
        !out.join("probe").exists(),
        "the probe step ran before the check"
    );
}

/// Model-dependent limits: a generation longer than the context names the new tokens, not the
/// prompt; a config with no layers does not load.
#[test]
fn model_limits_are_named() {
    refused(
        &[
            "generate",
            "--model",
            "smollm2-135m-instruct",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "100000",
        ],
        "new tokens",
    );
    let t = tmp("layers0");
    let tiny = root().join("tests/fixtures/tiny-models/tiny-gemma2");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    cfg["num_hidden_layers"] = 0.into();
    cfg["layer_types"] = serde_json::json!([]);
    std::fs::write(t.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(tiny.join("model.safetensors"), t.join("model.safetensors")).unwrap();
    refused(&["inspect", "--model", t.to_str().unwrap()], "0 layers");
}

/// A store folder without a store or without parts: one line that names the command making one.
#[test]
fn missing_stores_name_the_command_that_makes_them() {
    let t = tmp("store");
    let empty = t.to_str().unwrap();
    refused(
        &["diff", "manifest", "--store", empty],
        "diff harvest --shard I/N --out",
    );
    refused(
        &[
            "diff",
            "train",
            "--store",
            empty,
            "--out",
            &format!("{empty}/cc"),
        ],
        "diff harvest --out",
    );
}
