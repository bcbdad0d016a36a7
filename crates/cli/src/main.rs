//! `persona-lens`: a thin command line over the library crates. Each subcommand's arguments are
//! a typed spec of `persona-lens-study` (the same struct the study and the tests build); this
//! binary only parses, dispatches and turns an error into one line.

use clap::{Parser, Subcommand};
use persona_lens_study::{
    analysis_jobs, conversation_jobs, diff_jobs, engine_jobs, patch_jobs, steer_jobs, study,
};
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
    Tokenize(engine_jobs::TokenizeArgs),
    /// Generate a continuation (greedy or sampled, KV cache).
    Generate(engine_jobs::GenerateArgs),
    /// Run prompts and save activations at the chosen hooks (safetensors, named by hook).
    Cache(engine_jobs::CacheArgs),
    /// Architecture, sizes, quantization types, tokenizer facts, hook names.
    Inspect(engine_jobs::InspectArgs),
    /// The model registry: short names, hub ids, facts, and where each loads from here.
    Models(engine_jobs::ModelsArgs),
    /// Benchmark workload: forward with the full residual cache over a prompts file (bench/).
    BenchForward(engine_jobs::BenchForwardArgs),
    /// Harvest activations of the persona dataset at hooks and a position rule (reused later).
    Harvest(analysis_jobs::HarvestArgs),
    /// Linear probes per layer: CV, template hold-out, control task; table, JSON and plot.
    Probe(analysis_jobs::ProbeArgs),
    /// Persona directions per layer (difference of means, probe weights), safetensors + npy.
    Direction(analysis_jobs::DirectionArgs),
    /// Multi-turn: saved probes' read-outs at every token of each conversation, and belief
    /// revision after a contradicting cue (tokens to cross over, rows that carry the update).
    Conversation(conversation_jobs::ConversationArgs),
    /// Logit lens: one prompt's top-k per layer, or tracked words per persona over the dataset.
    Lens(analysis_jobs::LensArgs),
    /// Activation patching sweeps (resid_pre/mid, attn_out, mlp_out by layer x position; head z
    /// and patterns by layer x head), batched; JSON, npy and heatmaps.
    Patch(patch_jobs::PatchArgs),
    /// Exact path patching: sender heads -> receiver heads' q/k/v inputs (or the logits), every
    /// other head and MLP frozen at the corrupted run.
    PathPatch(patch_jobs::PathPatchArgs),
    /// Attribution patching: every patch's first-order estimate from one forward + backward,
    /// with its agreement with real patching (Pearson r, top-k overlap).
    Attrib(patch_jobs::AttribArgs),
    /// Rank attention heads by z-patching effect over every prompt pair of a topic.
    Heads(patch_jobs::HeadsArgs),
    /// Steered generation: alpha x persona direction at layers, over prompts; patched_outputs.jsonl.
    Steer(steer_jobs::SteerArgs),
    /// Autorater: readability, lexical, fluency and optional LLM-judge scores of steered answers.
    Rate(steer_jobs::RateArgs),
    /// Dose-response: steer over a layer x alpha grid, rate, and plot grade/fluency vs alpha.
    SteerSweep(steer_jobs::SteerSweepArgs),
    /// llama.cpp control vectors: export directions, import one back.
    ControlVector(steer_jobs::ControlVectorArgs),
    /// Ablate heads (zero, mean, resample) vs random heads: persona gap, probes, answer grade.
    Ablate(patch_jobs::AblateArgs),
    /// Crosscoder model diffing (base vs chat): harvest, train, analyze, verify, encode.
    #[command(subcommand)]
    Diff(diff_jobs::DiffCmd),
    /// The whole study in one command (probe, lens, patch, heads, ablate, steer, diff): one
    /// model load, summary.json, report.md and a self-contained report.html.
    Run(study::RunArgs),
    /// The live user-model dashboard: chat in the browser with probe read-outs at every token,
    /// persona-direction sliders, grade and perplexity beside each answer (127.0.0.1 by default).
    Serve(persona_lens_serve::ServeArgs),
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
            eprintln!("{} (see --help)", persona_lens_study::spec::error_line(&e));
            return ExitCode::from(2);
        }
    };
    // `diff train` alternates MKL's products with candle's elementwise ops, and MKL's OpenMP
    // threads spinning between products take the cores those ops need: passive waiting is 1.10x
    // rows/s (bench/README.md). libgomp reads this when MKL loads; set here, while the process
    // has one thread (setting the environment beside other threads is unsound), and only where
    // the user has not chosen. Forwards gain from the spin, so no other command asks.
    if matches!(cli.cmd, Cmd::Diff(diff_jobs::DiffCmd::Train(_)))
        && std::env::var_os("OMP_WAIT_POLICY").is_none()
    {
        std::env::set_var("OMP_WAIT_POLICY", "passive");
    }
    // The server stops on Ctrl-C itself (graceful shutdown); every other command gets the
    // handler that interrupts the models and removes half-written files.
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        study::interrupt_handler(if matches!(cli.cmd, Cmd::Run(_)) {
            "; re-run with --resume to finish"
        } else {
            ""
        });
    }
    let res = match cli.cmd {
        Cmd::Tokenize(a) => engine_jobs::tokenize(a),
        Cmd::Generate(a) => engine_jobs::generate(a),
        Cmd::Cache(a) => engine_jobs::cache(a),
        Cmd::Inspect(a) => engine_jobs::inspect(a),
        Cmd::Models(a) => engine_jobs::models(a),
        Cmd::BenchForward(a) => engine_jobs::bench_forward(a),
        Cmd::Harvest(a) => analysis_jobs::harvest(a),
        Cmd::Probe(a) => analysis_jobs::probe(a),
        Cmd::Direction(a) => analysis_jobs::direction(a),
        Cmd::Lens(a) => analysis_jobs::lens(a),
        Cmd::Conversation(a) => conversation_jobs::conversation(a),
        Cmd::Patch(a) => patch_jobs::patch(a),
        Cmd::PathPatch(a) => patch_jobs::path_patch(a),
        Cmd::Attrib(a) => patch_jobs::attrib(a),
        Cmd::Heads(a) => patch_jobs::heads(a),
        Cmd::Ablate(a) => patch_jobs::ablate(a),
        Cmd::Steer(a) => steer_jobs::steer(a),
        Cmd::Rate(a) => steer_jobs::rate(a),
        Cmd::SteerSweep(a) => steer_jobs::steer_sweep(a),
        Cmd::ControlVector(a) => steer_jobs::control_vector(a),
        Cmd::Diff(c) => diff_jobs::run(c),
        Cmd::Run(a) => study::run(a).map(|_| ()),
        Cmd::Serve(a) => persona_lens_serve::serve(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the innermost cause carries the useful message.
            let hint = persona_lens_study::flag_hint(&e)
                .map(|f| format!(" ({f})"))
                .unwrap_or_default();
            eprintln!("error: {}{hint}", persona_lens_study::one_line(&e));
            ExitCode::from(2)
        }
    }
}
