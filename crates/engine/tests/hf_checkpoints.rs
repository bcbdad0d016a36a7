//! Hugging Face checkpoints as researchers have them: a hub cache directory (the layout `hf-hub`
//! reads) loaded by hub id with networking off, sharded and bf16 checkpoints, the
//! `Gemma3ForConditionalGeneration` layout, and clear errors for broken checkpoints.
//! Own test binary: it sets HF_HUB_CACHE / HF_HUB_OFFLINE for the whole process.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use persona_lens_engine::{Batch, Hooks, LoadOptions, LogitsAt, Model, Precision};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pl-hf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny(name: &str) -> PathBuf {
    fixtures().join("tiny-models").join(name)
}

fn golden_logits(name: &str) -> (Vec<Vec<u32>>, Tensor) {
    let g = candle_core::safetensors::load(tiny(name).join("golden.safetensors"), &Device::Cpu)
        .unwrap();
    let ids: Vec<Vec<u32>> = g["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    (ids, g["logits"].clone())
}

fn logits_of(m: &Model, ids: &[Vec<u32>]) -> Tensor {
    let batch = Batch::left_padded(ids, 0, m.device()).unwrap();
    m.forward(&batch, None, &mut Hooks::new(), LogitsAt::All)
        .unwrap()
        .unwrap()
}

fn load(spec: &str, precision: Precision) -> persona_lens_engine::Result<Model> {
    Model::load(
        spec,
        Path::new("/nonexistent-models-dir"),
        &LoadOptions {
            precision,
            ..Default::default()
        },
    )
}

fn f32() -> Precision {
    Precision::Dense(DType::F32)
}

/// Writes `tensors` as safetensors shards of about `per_shard` tensors plus the index.
fn write_sharded(dir: &Path, tensors: &HashMap<String, Tensor>, per_shard: usize) {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let chunks: Vec<&[&String]> = names.chunks(per_shard).collect();
    let n = chunks.len();
    let mut map = serde_json::Map::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|k| ((*k).clone(), tensors[*k].clone()))
            .collect();
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        for k in chunk.iter() {
            map.insert((*k).clone(), serde_json::json!(file));
        }
    }
    let idx = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string(&idx).unwrap(),
    )
    .unwrap();
}

fn tensors_of(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(tiny(name).join("model.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn hub_cache_by_id_offline() {
    // hf-hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/<files>}.
    let cache = tmp("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.join("models--tiny-org--tiny-llama");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(tiny("tiny-llama").join(f), snap.join(f)).unwrap();
    }
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let m = load("tiny-org/tiny-llama", f32()).unwrap();
    assert_eq!(m.config().arch.name(), "llama");
    let (ids, want) = golden_logits("tiny-llama");
    let d = max_abs_diff(&logits_of(&m, &ids), &want);
    assert!(d < 1e-4, "hub-cache tiny-llama logits max abs diff {d}");

    // Not cached and offline: one clear line, no download attempt.
    let e = load("tiny-org/not-there", f32()).err().unwrap().to_string();
    assert!(
        e.contains("HF_HUB_OFFLINE") && e.contains("not-there"),
        "{e}"
    );
    // A registry name whose hub id is not cached says so too.
    let e = load("gemma-2-2b-it", f32()).err().unwrap().to_string();
    assert!(e.contains("google/gemma-2-2b-it"), "{e}");
}

#[test]
fn sharded_bf16_checkpoint_loads() {
    let dir = tmp("sharded");
    std::fs::copy(
        tiny("tiny-gemma2").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let bf: HashMap<String, Tensor> = tensors_of("tiny-gemma2")
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
        .collect();
    write_sharded(&dir, &bf, 9);
    let (ids, want) = golden_logits("tiny-gemma2");
    // bf16 on disk, computed in f32: the only error is the weights' bf16 rounding.
    let m = load(dir.to_str().unwrap(), f32()).unwrap();
    let d32 = max_abs_diff(&logits_of(&m, &ids), &want);
    // Held in bf16 (no f32 round trip at load).
    let mb = load(dir.to_str().unwrap(), Precision::Dense(DType::BF16)).unwrap();
    // Matrices held in bf16 (half the bytes); only the small norm vectors stay f32.
    let ratio = mb.info.weight_bytes as f64 / m.info.weight_bytes as f64;
    assert!(
        ratio > 0.5 && ratio < 0.52,
        "bf16 / f32 weight bytes {ratio}"
    );
    let db = max_abs_diff(&logits_of(&mb, &ids), &want);
    println!(
        "sharded bf16 tiny-gemma2: max |logit diff| f32 compute {d32:.4}, bf16 weights {db:.4}"
    );
    assert!(d32 > 0.0 && d32 < 0.1, "{d32}");
    assert!(db < 0.2, "{db}");

    // A shard listed in the index is missing.
    let second = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("model-00002-of-"))
        .unwrap();
    std::fs::remove_file(&second).unwrap();
    let e = load(dir.to_str().unwrap(), f32())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing") && e.contains("model-00002"), "{e}");
}

#[test]
fn conditional_generation_layout_loads() {
    // Gemma3ForConditionalGeneration: text config under text_config, weights under
    // model.language_model.* (transformers >= 4.52), lm_head tied.
    let dir = tmp("cond");
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tiny("tiny-gemma3").join("config.json")).unwrap(),
    )
    .unwrap();
    let text = cfg.clone();
    cfg = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": {"hidden_size": 8},
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let mut t: HashMap<String, Tensor> = tensors_of("tiny-gemma3")
        .into_iter()
        .map(|(k, v)| {
            let k = match k.strip_prefix("model.") {
                Some(rest) => format!("model.language_model.{rest}"),
                None => k,
            };
            (k, v)
        })
        .collect();
    t.insert(
        "model.vision_tower.dummy.weight".into(),
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let m = load(dir.to_str().unwrap(), f32()).unwrap();
    let (ids, want) = golden_logits("tiny-gemma3");
    let d = max_abs_diff(&logits_of(&m, &ids), &want);
    assert!(
        d < 1e-4,
        "conditional-generation layout logits max abs diff {d}"
    );
}

/// A copy of a tiny checkpoint with its `config.json` edited.
fn with_config(name: &str, model: &str, edit: &dyn Fn(&mut serde_json::Value)) -> PathBuf {
    let dir = tmp(name);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny(model).join("config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        tiny(model).join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    dir
}

#[test]
fn broken_checkpoints_give_clear_errors() {
    // Unknown architecture.
    let dir = with_config("unknown-arch", "tiny-llama", &|c| {
        c["architectures"] = serde_json::json!(["MambaForCausalLM"])
    });
    let e = load(dir.to_str().unwrap(), f32())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("MambaForCausalLM") && e.contains("supported"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1);

    // A dtype the engine does not support (f64 weights).
    let dir = tmp("f64");
    std::fs::copy(
        tiny("tiny-llama").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let t: HashMap<String, Tensor> = tensors_of("tiny-llama")
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap()))
        .collect();
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let e = load(dir.to_str().unwrap(), f32())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("F64") && e.contains("supported: f32, f16, bf16"),
        "{e}"
    );

    // A missing tensor.
    let dir = tmp("missing-tensor");
    std::fs::copy(
        tiny("tiny-gpt2").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let mut t = tensors_of("tiny-gpt2");
    t.remove("transformer.h.1.mlp.c_fc.bias");
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let e = load(dir.to_str().unwrap(), f32())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("transformer.h.1.mlp.c_fc.bias"), "{e}");

    // An unsupported GPT-2 variant is named.
    let dir = with_config("gpt2-variant", "tiny-gpt2", &|c| {
        c["scale_attn_by_inverse_layer_idx"] = serde_json::json!(true)
    });
    let e = load(dir.to_str().unwrap(), f32())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("scale_attn_by_inverse_layer_idx"), "{e}");

    // Activations: an unknown one is named; exact-erf `gelu` is honoured, not swapped for tanh.
    let d = with_config("quick-gelu", "tiny-gpt2", &|c| {
        c["activation_function"] = serde_json::json!("quick_gelu")
    });
    let e = load(d.to_str().unwrap(), f32()).err().unwrap().to_string();
    assert!(
        e.contains("quick_gelu") && e.contains("activation_function"),
        "{e}"
    );
    let d = with_config("erf-gelu", "tiny-gpt2", &|c| {
        c["activation_function"] = serde_json::json!("gelu")
    });
    let m = load(d.to_str().unwrap(), f32()).unwrap();
    let (ids, want) = golden_logits("tiny-gpt2");
    let diff = max_abs_diff(&logits_of(&m, &ids), &want);
    println!("tiny-gpt2 with exact-erf GELU vs the tanh golden: max |logit diff| {diff:.2e}");
    assert!(
        diff > 1e-6 && diff < 0.05,
        "erf vs tanh GELU logits differ by {diff}"
    );
    let d = with_config("mlp-bias", "tiny-llama", &|c| {
        c["mlp_bias"] = serde_json::json!(true)
    });
    let e = load(d.to_str().unwrap(), f32()).err().unwrap().to_string();
    assert!(e.contains("mlp_bias"), "{e}");
}
