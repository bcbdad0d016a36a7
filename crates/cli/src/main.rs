//! `persona-lens`: a thin command line over the library crates. Each subcommand parses its
//! arguments, calls the library and prints (`--json` for machine-readable output).

mod analysis_cmds;
mod diff_cmds;
mod engine_cmds;
mod patch_cmds;
mod steer_cmds;
mod study;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "persona-lens",
    version,
    about = "Mechanistic interpretability of how chat models model their user"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Token ids and token strings of a text.
    Tokenize(engine_cmds::TokenizeArgs),
    /// Generate a continuation (greedy or sampled, KV cache).
    Generate(engine_cmds::GenerateArgs),
    /// Run prompts and save activations at the chosen hooks (safetensors, named by hook).
    Cache(engine_cmds::CacheArgs),
    /// Architecture, sizes, quantization types, tokenizer facts, hook names.
    Inspect(engine_cmds::InspectArgs),
    /// The model registry: short names, hub ids, facts, and where each loads from here.
    Models(engine_cmds::ModelsArgs),
    /// Benchmark workload: forward with the full residual cache over a prompts file (bench/).
    BenchForward(engine_cmds::BenchForwardArgs),
    /// Harvest activations of the persona dataset at hooks and a position rule (reused later).
    Harvest(analysis_cmds::HarvestArgs),
    /// Linear probes per layer: CV, template hold-out, control task; table, JSON and plot.
    Probe(analysis_cmds::ProbeArgs),
    /// Persona directions per layer (difference of means, probe weights), safetensors + npy.
    Direction(analysis_cmds::DirectionArgs),
    /// Logit lens: one prompt's top-k per layer, or tracked words per persona over the dataset.
    Lens(analysis_cmds::LensArgs),
    /// Activation patching sweeps (resid_pre/mid, attn_out, mlp_out by layer x position; head z
    /// and patterns by layer x head), batched; JSON, npy and heatmaps.
    Patch(patch_cmds::PatchArgs),
    /// Exact path patching: sender heads -> receiver heads' q/k/v inputs (or the logits), every
    /// other head and MLP frozen at the corrupted run.
    PathPatch(patch_cmds::PathPatchArgs),
    /// Attribution patching: every patch's first-order estimate from one forward + backward,
    /// with its agreement with real patching (Pearson r, top-k overlap).
    Attrib(patch_cmds::AttribArgs),
    /// Rank attention heads by z-patching effect over every prompt pair of a topic.
    Heads(patch_cmds::HeadsArgs),
    /// Steered generation: alpha x persona direction at layers, over prompts; patched_outputs.jsonl.
    Steer(steer_cmds::SteerArgs),
    /// Autorater: readability, lexical, fluency and optional LLM-judge scores of steered answers.
    Rate(steer_cmds::RateArgs),
    /// Dose-response: steer over a layer x alpha grid, rate, and plot grade/fluency vs alpha.
    SteerSweep(steer_cmds::SteerSweepArgs),
    /// llama.cpp control vectors: export directions, import one back.
    ControlVector(steer_cmds::ControlVectorArgs),
    /// Ablate heads (zero, mean, resample) vs random heads: persona gap, probes, answer grade.
    Ablate(patch_cmds::AblateArgs),
    /// Crosscoder model diffing (base vs chat): harvest, train, analyze, verify, encode.
    #[command(subcommand)]
    Diff(diff_cmds::DiffCmd),
    /// The whole study in one command (probe, lens, patch, heads, ablate, steer, diff): one
    /// model load, summary.json, report.md and a self-contained report.html.
    Run(study::RunArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum QuantArg {
    /// Quantized weights in memory, f32 activations (dequantized chunk by chunk): exact.
    Exact,
    /// candle's quantized kernels (8-bit activations, llama.cpp numerics): fastest.
    Native,
}

/// Options every model-using command takes.
#[derive(Args, Clone, Debug)]
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line, like every other error: clap's first line names the flag and the problem.
            let text = e.render().to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("error: bad arguments");
            eprintln!("{} (see --help)", first.trim_end());
            return ExitCode::from(2);
        }
    };
    study::interrupt_handler(if matches!(cli.cmd, Cmd::Run(_)) {
        "; re-run with --resume to finish"
    } else {
        ""
    });
    let res = match cli.cmd {
        Cmd::Tokenize(a) => engine_cmds::tokenize(a),
        Cmd::Generate(a) => engine_cmds::generate(a),
        Cmd::Cache(a) => engine_cmds::cache(a),
        Cmd::Inspect(a) => engine_cmds::inspect(a),
        Cmd::Models(a) => engine_cmds::models(a),
        Cmd::BenchForward(a) => engine_cmds::bench_forward(a),
        Cmd::Harvest(a) => analysis_cmds::harvest(a),
        Cmd::Probe(a) => analysis_cmds::probe(a),
        Cmd::Direction(a) => analysis_cmds::direction(a),
        Cmd::Lens(a) => analysis_cmds::lens(a),
        Cmd::Patch(a) => patch_cmds::patch(a),
        Cmd::PathPatch(a) => patch_cmds::path_patch(a),
        Cmd::Attrib(a) => patch_cmds::attrib(a),
        Cmd::Heads(a) => patch_cmds::heads(a),
        Cmd::Ablate(a) => patch_cmds::ablate(a),
        Cmd::Steer(a) => steer_cmds::steer(a),
        Cmd::Rate(a) => steer_cmds::rate(a),
        Cmd::SteerSweep(a) => steer_cmds::steer_sweep(a),
        Cmd::ControlVector(a) => steer_cmds::control_vector(a),
        Cmd::Diff(c) => diff_cmds::run(c),
        Cmd::Run(a) => study::run(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the innermost cause carries the useful message.
            // A cause whose text the line already holds (a wrapper that prints its source) is
            // said once.
            let mut parts: Vec<String> = vec![];
            for c in e.chain().map(|c| c.to_string()) {
                if !parts.iter().any(|p| p.contains(&c)) {
                    parts.push(c);
                }
            }
            let msg = parts.join(": ");
            eprintln!("error: {}", msg.replace('\n', " "));
            ExitCode::from(2)
        }
    }
}
