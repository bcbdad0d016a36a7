//! Shared test helpers: locating fixtures and the real models, loading each model once.
#![allow(dead_code)]

use persona_lens_engine::{LoadOptions, Model, Precision};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

pub fn golden_dir(model: &str) -> PathBuf {
    fixtures().join("golden").join(model)
}

pub fn models_dir() -> PathBuf {
    match std::env::var_os("PERSONA_LENS_MODELS") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join("models"),
    }
}

pub fn read_json(p: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn load(name: &str, precision: Precision) -> Arc<Model> {
    let opts = LoadOptions {
        precision,
        ..Default::default()
    };
    match Model::load(name, &models_dir(), &opts) {
        Ok(m) => Arc::new(m),
        Err(e) => panic!("cannot load real model {name}: {e}\n(run `make models` first; tests need the real weights)"),
    }
}

type Slot = OnceLock<Mutex<Option<Arc<Model>>>>;
static GEMMA: Slot = OnceLock::new();
static SMOL: Slot = OnceLock::new();
static GEMMA_Q: Slot = OnceLock::new();
static SMOL_Q: Slot = OnceLock::new();

/// A private copy of the real model (f32, dequantized), for a test that edits the model with
/// standing hooks: the shared copy of [`model`] is used by tests running in parallel.
#[allow(dead_code)]
pub fn private_model(name: &str) -> Model {
    let opts = LoadOptions {
        precision: Precision::Dense(candle_core::DType::F32),
        ..Default::default()
    };
    Model::load(name, &models_dir(), &opts)
        .unwrap_or_else(|e| panic!("cannot load real model {name}: {e} (run `make models` first)"))
}

/// The real model, loaded once per test binary (f32, dequantized).
pub fn model(name: &str) -> Arc<Model> {
    model_with(name, false)
}

pub fn model_with(name: &str, quantized: bool) -> Arc<Model> {
    let slot = match (name, quantized) {
        ("gemma-3-270m", false) => &GEMMA,
        ("smollm2-135m-instruct", false) => &SMOL,
        ("gemma-3-270m", true) => &GEMMA_Q,
        ("smollm2-135m-instruct", true) => &SMOL_Q,
        _ => panic!("unknown test model {name}"),
    };
    let m = slot.get_or_init(|| Mutex::new(None));
    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
    if g.is_none() {
        let p = if quantized {
            Precision::Quantized(persona_lens_engine::QuantKernel::Exact)
        } else {
            Precision::Dense(candle_core::DType::F32)
        };
        *g = Some(load(name, p));
    }
    g.as_ref().unwrap().clone()
}

pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((*x as f64) - (*y as f64)).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn npy(p: &std::path::Path) -> candle_core::Tensor {
    candle_core::Tensor::read_npy(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Largest absolute elementwise difference of two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
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
