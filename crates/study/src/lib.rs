//! `persona-lens-study`: the jobs every front end calls (the command line, the tests, later the
//! Python module and the server) and the whole study (`study::run`).
//!
//! Each job takes a typed spec: one struct per analysis that the command line parses (clap), that
//! is a serde value (written, read, compared), and that `spec::command` writes back as the
//! equivalent stand-alone command for provenance (a test checks that parsing it gives the same
//! spec). Defaults live once, on the spec's command-line definition (`spec::defaults`). Jobs given
//! a loaded model (`*_with`) return typed results (`HeadsResult`, `AblateResult`, `PatchResult`,
//! `SteerSweepResult`, ...) and load nothing, so the study loads its model once: `study::run`
//! builds each step's spec from its TOML config (`StudyConfig`: a setting that is also a flag
//! takes the flag's default) by struct update and reads the results' fields into a typed
//! `Summary`.
//!
//! Modules: `engine_jobs` (tokenize, generate, cache, inspect, models, bench-forward),
//! `analysis_jobs` (harvest, probe, direction, lens), `patch_jobs` (patch, path-patch, attrib,
//! heads, ablate), `steer_jobs` (steer, rate, steer-sweep, control vectors), `diff_jobs`
//! (crosscoder diffing), `study` (`run`), `step_data` (each study step's typed compact results,
//! what `summary.json` holds under `steps`), `spec`.

pub mod analysis_jobs;
pub mod conversation_jobs;
pub mod diff_jobs;
pub mod engine_jobs;
pub mod patch_jobs;
pub mod spec;
pub mod steer_jobs;
pub mod step_data;
pub mod study;

use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuantArg {
    /// Quantized weights in memory, f32 activations (dequantized chunk by chunk): exact.
    Exact,
    /// candle's quantized kernels (8-bit activations, llama.cpp numerics): fastest.
    Native,
}

/// Options every model-using command takes.
#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelArgs {
    /// A .gguf file, a Hugging Face model directory, a registry short name
    /// (`persona-lens models`: gemma-3-270m, gemma-2-2b-it, ...) or a hub id (org/name).
    #[arg(long, default_value = persona_lens_engine::DEFAULT_MODEL)]
    pub model: String,
    /// Where short names are looked up [env: PERSONA_LENS_MODELS; default: ./models].
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Dense weight precision (default f32, what the golden references use).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Keep GGUF blocks in memory (`exact`: f32 activations; `native`: candle's quantized kernels).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "exact")]
    pub quantized: Option<QuantArg>,
    /// Threads for the math kernels (default: all cores).
    #[arg(long, value_parser = threads)]
    pub threads: Option<usize>,
    /// Machine-readable JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

impl ModelArgs {
    /// A model by name (file, folder, short name or hub id) at the default precision: the one
    /// way a job names a model it loads beside the one its flags give (a diff partner, a fluency
    /// model, the study's model).
    pub fn named(model: &str, models_dir: Option<PathBuf>, threads: Option<usize>) -> Self {
        ModelArgs {
            model: model.to_string(),
            models_dir,
            threads,
            ..spec::defaults()
        }
    }
}

/// Most threads a run may ask for: more than any machine here has, far below what makes the
/// thread pool's start-up hang.
pub const MAX_THREADS: usize = 1024;

/// `--threads`: 1..=MAX_THREADS.
pub fn threads(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))?;
    if n == 0 || n > MAX_THREADS {
        return Err(format!("{n} threads: give 1 to {MAX_THREADS}"));
    }
    Ok(n)
}

/// A count that must be at least 1 (batch sizes, steps).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))?;
    if n == 0 {
        return Err("0: give at least 1".into());
    }
    Ok(n)
}

/// A fraction in [0, 1) (a held-out share).
pub fn fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(0.0..1.0).contains(&v) {
        return Err(format!(
            "{v}: give a fraction from 0 up to (not including) 1"
        ));
    }
    Ok(v)
}

/// An error as one line, as every front end shows it (`error: ` is the front end's): the
/// chain of causes joined by `: `, a cause whose text the line already holds (a wrapper that
/// prints its source) said once, line breaks folded.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = vec![];
    for c in e.chain().map(|c| c.to_string()) {
        if !parts.iter().any(|p| p.contains(&c)) {
            parts.push(c);
        }
    }
    parts.join(": ").replace('\n', " ")
}

/// The flag that fixes a typed library error whose remedy is a flag (the libraries say what to
/// change, the command line how): the command line prints it after the error.
pub fn flag_hint(e: &anyhow::Error) -> Option<String> {
    use persona_lens_diffing::DiffError;
    use persona_lens_engine::EngineError;
    e.chain().find_map(|c| {
        if let Some(EngineError::NoVocabulary) = c.downcast_ref::<EngineError>() {
            return Some("--ids FILE".to_string());
        }
        match c.downcast_ref::<DiffError>() {
            Some(DiffError::NoStore { dir, .. }) => Some(format!(
                "`persona-lens diff harvest --out {}` makes one",
                dir.display()
            )),
            Some(DiffError::NoParts { dir }) => Some(format!(
                "`persona-lens diff harvest --shard I/N --out {}` makes a part",
                dir.display()
            )),
            Some(DiffError::Engine(EngineError::NoVocabulary)) => Some("--ids FILE".to_string()),
            _ => None,
        }
    })
}
