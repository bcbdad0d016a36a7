//! Steering: `steer` (steered generation runs), `control-vector` (llama.cpp export / import).

use crate::analysis_jobs::DatasetArgs;
use crate::engine_jobs::{load_model, progress, SamplingArgs};
use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use persona_lens_analysis::direction::DirectionKind;
use persona_lens_analysis::steering::{
    check_direction, l2, load_direction, mean_resid_norm, run_grid, scale_direction,
    LoadedDirection, NormConvention, SteerGrid, SteerMode, SteerPositions, SteerPrompt,
    SteerRecord,
};
use persona_lens_engine::{GenerateOptions, Model};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which direction, where, and how strong.
#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SteerSpec {
    /// Direction file: directions.safetensors or persona_direction.npy from `persona-lens
    /// direction`, or a llama.cpp control vector (.gguf).
    #[arg(long, default_value = "out/probe/directions.safetensors")]
    pub direction: PathBuf,
    /// Layers (comma separated), `persona-lens direction`'s convention: L = the output of block
    /// L (`blocks.L.hook_resid_post`); with --align-probe-index, L = HF hidden_states[L].
    #[arg(long, value_delimiter = ',', required = true)]
    pub layer: Vec<usize>,
    #[arg(long)]
    pub align_probe_index: bool,
    /// diff_of_means or probe (directions.safetensors only).
    #[arg(long, default_value = "diff_of_means")]
    pub kind: DirectionKind,
    /// Steering strengths (comma separated; negative = towards the novice persona).
    #[arg(
        long,
        value_delimiter = ',',
        allow_negative_numbers = true,
        default_value = "0,1,2,4,8"
    )]
    pub alpha: Vec<f64>,
    /// Norm convention before alpha: raw (a difference of means as stored: alpha = 1 moves a
    /// prompt by one novice-to-expert mean gap), unit (alpha in residual units) or mean-resid
    /// (alpha = fraction of the mean residual norm at the layer; Gemma's is dominated by a few
    /// huge dimensions, so useful alphas there are small).
    #[arg(long, default_value = "raw")]
    pub norm: NormConvention,
    /// Positions steered: all, prompt or generated.
    #[arg(long, default_value = "all")]
    pub positions: SteerPositions,
    /// add (x + alpha v), ablate (project the direction out; alpha ignored) or patch (the paired
    /// prompt of the other persona's whole activation at the layer, end-aligned, prompt positions
    /// only: the seed's "patch PhD into Child"; dataset prompts only; direction unused).
    #[arg(long, default_value = "add")]
    pub mode: SteerMode,
}

/// Prompts and generation settings.
#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenSpec {
    /// Prompts file: a JSON list of strings or of {"text", "persona", "id", "topic"}, or a
    /// .txt file with one prompt per line. Default: the persona dataset (--persona class).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Dataset class to steer (novice, expert or all).
    #[arg(long, default_value = "novice")]
    pub persona: String,
    /// Number of prompts (distinct questions, round robin over topics).
    #[arg(long, default_value_t = 20)]
    pub n_prompts: usize,
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prompts per batched generation.
    #[arg(long, default_value_t = 8, value_parser = crate::at_least_one)]
    pub batch_size: usize,
}

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SteerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DatasetArgs,
    #[command(flatten)]
    pub steer: SteerSpec,
    #[command(flatten)]
    pub gen: GenSpec,
    /// Output directory: patched_outputs.jsonl and steer.json.
    #[arg(long, default_value = "out/steer")]
    pub out: PathBuf,
    #[arg(long)]
    pub quiet: bool,
}

/// The prompts to steer.
pub fn steer_prompts(data: &DatasetArgs, gen: &GenSpec) -> Result<Vec<SteerPrompt>> {
    if let Some(p) = &gen.prompts {
        let s = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read prompts file {}", p.display()))?;
        let mut out = Vec::new();
        if p.extension().and_then(|e| e.to_str()) == Some("json") {
            let v: serde_json::Value = serde_json::from_str(&s).with_context(|| {
                format!(
                    "{} is not JSON; give a list of strings or objects",
                    p.display()
                )
            })?;
            let Some(items) = v.as_array() else {
                bail!("{} must hold a JSON list of prompts", p.display());
            };
            for (i, it) in items.iter().enumerate() {
                let text = it
                    .as_str()
                    .or_else(|| it["text"].as_str())
                    .or_else(|| it["prompt"].as_str())
                    .with_context(|| {
                        format!(
                            "prompt {i} of {} has no text; use a string or {{\"text\": ...}}",
                            p.display()
                        )
                    })?;
                out.push(SteerPrompt {
                    id: it["id"]
                        .as_str()
                        .map(String::from)
                        .unwrap_or(format!("p{i:03}")),
                    persona: it["persona"].as_str().unwrap_or("unknown").into(),
                    topic: it["topic"].as_str().unwrap_or("").into(),
                    text: text.into(),
                    paired_text: it["paired_text"].as_str().map(String::from),
                });
            }
        } else {
            for (i, l) in s.lines().filter(|l| !l.trim().is_empty()).enumerate() {
                out.push(SteerPrompt {
                    id: format!("p{i:03}"),
                    persona: "unknown".into(),
                    topic: String::new(),
                    text: l.trim().into(),
                    paired_text: None,
                });
            }
        }
        if out.is_empty() {
            bail!("{} holds no prompts", p.display());
        }
        out.truncate(gen.n_prompts.max(1));
        return Ok(out);
    }
    let ds = data.load()?;
    // The other persona's prompt of the same question and template (patch mode's source).
    let mut paired: std::collections::HashMap<String, String> = Default::default();
    for (n, e) in persona_lens_analysis::heads::dataset_pairs(&ds) {
        paired.insert(n.id.clone(), e.text.clone());
        paired.insert(e.id.clone(), n.text.clone());
    }
    let items: Vec<_> = ds
        .items
        .iter()
        .filter(|it| gen.persona == "all" || it.class == gen.persona)
        .collect();
    if items.is_empty() {
        bail!(
            "no dataset prompts of class '{}'; use --persona novice, expert or all",
            gen.persona
        );
    }
    // Distinct questions first (one template each), round robin over topics.
    let first_template = items[0].template_id.clone();
    let mut by_topic: std::collections::BTreeMap<&str, Vec<_>> = Default::default();
    for it in items.iter().filter(|it| it.template_id == first_template) {
        by_topic.entry(it.topic.as_str()).or_default().push(*it);
    }
    let mut out = Vec::new();
    let mut i = 0;
    while out.len() < gen.n_prompts && by_topic.values().any(|v| i < v.len()) {
        for v in by_topic.values() {
            if let Some(it) = v.get(i) {
                if out.len() < gen.n_prompts {
                    out.push(SteerPrompt {
                        id: it.id.clone(),
                        persona: it.class.clone(),
                        topic: it.topic.clone(),
                        text: it.text.clone(),
                        paired_text: paired.get(&it.id).cloned(),
                    });
                }
            }
        }
        i += 1;
    }
    Ok(out)
}

pub fn gen_options(model: &Model, g: &GenSpec) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: g.max_new_tokens,
        sampling: g.sampling.sampling(false),
        stop_tokens: model.tokenizer.eos_ids.clone(),
        use_kv_cache: true,
    }
}

/// Runs the layer x alpha grid over the prompts; records in (layer, alpha, prompt) order.
#[allow(clippy::too_many_arguments)]
pub fn run_steering(
    model: &Model,
    prompts: &[SteerPrompt],
    chat: bool,
    spec: &SteerSpec,
    gen: &GenSpec,
    quiet: bool,
) -> Result<Vec<SteerRecord>> {
    let cfg = model.config();
    let (kind, conv, rule, mode) = (spec.kind, spec.norm, spec.positions, spec.mode);
    let (ablate, patch) = (mode == SteerMode::Ablate, mode == SteerMode::Patch);
    if patch && rule != SteerPositions::Prompt {
        bail!("--mode patch replaces prompt activations only; add --positions prompt");
    }
    if patch && prompts.iter().any(|p| p.paired_text.is_none()) {
        bail!(
            "--mode patch needs dataset prompts with a paired persona prompt (not --prompts FILE)"
        );
    }
    if !patch && !spec.direction.exists() {
        bail!(
            "direction file {} not found; make one with `persona-lens direction` or pass --direction FILE",
            spec.direction.display()
        );
    }
    let opts = gen_options(model, gen);
    let alphas: Vec<f64> = if ablate || patch {
        vec![1.0]
    } else {
        spec.alpha.clone()
    };
    if alphas.iter().any(|a| !a.is_finite()) {
        bail!("--alpha values must be finite numbers");
    }
    let dirs: Vec<(usize, LoadedDirection)> = spec
        .layer
        .iter()
        .map(|&l| {
            // `--layer` with `--align-probe-index` is typed once, here.
            let at =
                persona_lens_analysis::direction::LayerRef::from_flag(l, spec.align_probe_index);
            if patch {
                return Ok((
                    l,
                    LoadedDirection {
                        hook: at.hook(cfg.n_layers)?,
                        row: at.row(),
                        vector: vec![1.0; cfg.d_model],
                        source: "paired prompt activations (patch)".into(),
                    },
                ));
            }
            let d = load_direction(&spec.direction, Some(at), kind, cfg.n_layers)?;
            check_direction(&d.vector, cfg.d_model)?;
            Ok((l, d))
        })
        .collect::<Result<_>>()?;
    let total = (dirs.len() * alphas.len() * prompts.len()) as u64;
    let pb = progress(total, quiet, "steered generations");
    let grid = SteerGrid {
        directions: dirs,
        alphas,
        mode,
        norm: conv,
        positions: rule,
        gen: &opts,
        batch_size: gen.batch_size,
        seed: gen.sampling.seed,
    };
    let records = run_grid(model, prompts, chat, &grid, &|n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    Ok(records)
}

/// Writes records as JSON lines, atomically.
pub fn write_jsonl<T: serde::Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut buf = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut buf, r)?;
        buf.push(b'\n');
    }
    persona_lens_engine::io::write_atomic(path, &buf)?;
    Ok(())
}

/// What `steer` writes to `steer.json` (fields in alphabetical order: the file's key order).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SteerRun {
    pub alphas: Vec<f64>,
    pub chat: bool,
    pub direction: PathBuf,
    pub layers: Vec<usize>,
    pub mode: SteerMode,
    pub model: String,
    pub n_prompts: usize,
    pub norm: NormConvention,
    pub output: PathBuf,
    pub positions: SteerPositions,
    pub records: usize,
    pub seconds: f64,
}

/// The steering grid on a loaded model: its records (also written to
/// `patched_outputs.jsonl`) and the run's summary (`steer.json`).
pub fn steer_with(model: &Model, a: &SteerArgs) -> Result<(Vec<SteerRecord>, SteerRun)> {
    let chat = a.data.chat(model);
    let prompts = steer_prompts(&a.data, &a.gen)?;
    let quiet = a.quiet || a.model.json;
    let t = Instant::now();
    let records = run_steering(model, &prompts, chat, &a.steer, &a.gen, quiet)?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::create_dir_all(&a.out)?;
    let f = a.out.join("patched_outputs.jsonl");
    write_jsonl(&f, &records)?;
    let summary = SteerRun {
        model: model.info.name.clone(),
        chat,
        n_prompts: prompts.len(),
        layers: a.steer.layer.clone(),
        alphas: a.steer.alpha.clone(),
        mode: a.steer.mode,
        norm: a.steer.norm,
        positions: a.steer.positions,
        direction: a.steer.direction.clone(),
        records: records.len(),
        seconds: secs,
        output: f,
    };
    persona_lens_analysis::write_json(&a.out.join("steer.json"), &summary)?;
    Ok((records, summary))
}

pub fn steer(a: SteerArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let (records, summary) = steer_with(&model, &a)?;
    let (f, n_prompts, secs) = (&summary.output, summary.n_prompts, summary.seconds);
    if a.model.json {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    println!(
        "{} steered generations ({} prompts x {} layers x {} alphas) on {} in {secs:.1} s",
        records.len(),
        n_prompts,
        a.steer.layer.len(),
        if a.steer.mode != SteerMode::Add {
            1
        } else {
            a.steer.alpha.len()
        },
        model.info.name
    );
    let mut seen = std::collections::BTreeSet::new();
    for r in &records {
        if seen.insert((r.layer, (r.alpha * 1000.0) as i64)) {
            println!(
                "  layer {:>2} alpha {:>6.2} ({}, |v| {:.2}): {:?}",
                r.layer,
                r.alpha,
                r.norm,
                r.direction_scale * r.alpha.abs(),
                r.text.chars().take(90).collect::<String>()
            );
        }
    }
    println!("wrote {}", f.display());
    Ok(())
}

// ---------------- control-vector ----------------

#[derive(Subcommand)]
pub enum ControlVectorCmd {
    /// Write directions as a llama.cpp control vector (GGUF arch `controlvector`).
    Export(Box<CvExportArgs>),
    /// Read a control vector: its layers and norms, optionally one layer as .npy.
    Import(CvImportArgs),
}

#[derive(Args)]
pub struct ControlVectorArgs {
    #[command(subcommand)]
    pub cmd: ControlVectorCmd,
}

#[derive(Args)]
pub struct CvExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DatasetArgs,
    #[arg(long, default_value = "out/probe/directions.safetensors")]
    pub direction: PathBuf,
    /// Blocks whose output gets the direction (llama.cpp's direction.{L}; L >= 1).
    #[arg(long, value_delimiter = ',', required = true)]
    pub layer: Vec<usize>,
    #[arg(long, default_value = "diff_of_means")]
    pub kind: DirectionKind,
    /// Strength baked into the vector (llama.cpp multiplies by its own scale too).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub alpha: f64,
    /// raw, unit or mean-resid (measured on the dataset prompts).
    #[arg(long, default_value = "mean-resid")]
    pub norm: NormConvention,
    #[arg(long, default_value = "out/steer/control_vector.gguf")]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct CvImportArgs {
    #[arg(long)]
    pub input: PathBuf,
    /// Write this layer's direction as .npy (with a JSON sidecar naming its residual row).
    #[arg(long)]
    pub layer: Option<usize>,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn control_vector(a: ControlVectorArgs) -> Result<()> {
    match a.cmd {
        ControlVectorCmd::Export(a) => {
            let c = cv_export_with(&a)?;
            let conv = a.norm;
            println!(
                "wrote {} (controlvector, model hint {}, layers {:?}, alpha {}, norm {}); read back identical",
                a.out.display(),
                c.model_hint,
                c.layers.keys().collect::<Vec<_>>(),
                a.alpha,
                conv.name()
            );
            Ok(())
        }
        ControlVectorCmd::Import(a) => {
            let c = cv_import_with(&a)?;
            if let Some(out) = cv_layer_out(&a) {
                println!("wrote {}", out.display());
            }
            let norms: Vec<(usize, f64)> = c.layers.iter().map(|(l, v)| (*l, l2(v))).collect();
            if a.json {
                println!(
                    "{}",
                    json!({"model_hint": c.model_hint, "layers": norms.iter().map(|(l, n)| json!({"layer": l, "norm": n, "width": c.layers[l].len()})).collect::<Vec<_>>()})
                );
            } else {
                println!(
                    "{}: control vector for {}, {} layers",
                    a.input.display(),
                    c.model_hint,
                    c.layers.len()
                );
                for (l, n) in norms {
                    println!(
                        "  direction.{l:<3} width {} norm {n:.4}",
                        c.layers[&l].len()
                    );
                }
            }
            Ok(())
        }
    }
}

/// Writes the directions as a llama.cpp control vector at `a.out` (read back and compared);
/// returns it.
pub fn cv_export_with(
    a: &CvExportArgs,
) -> Result<persona_lens_analysis::control_vector::ControlVector> {
    use persona_lens_analysis::control_vector::{self as cv, ControlVector};
    let model = load_model(&a.model)?;
    let cfg = model.config();
    let (kind, conv) = (a.kind, a.norm);
    let chat = a.data.chat(&model);
    let mut layers = std::collections::BTreeMap::new();
    let ids: Vec<Vec<u32>> = if conv == NormConvention::MeanResid {
        a.data
            .load()?
            .items
            .iter()
            .take(64)
            .map(|it| model.encode_prompt(&it.text, chat))
            .collect::<std::result::Result<_, _>>()?
    } else {
        vec![]
    };
    for &l in &a.layer {
        if l == 0 {
            bail!("llama.cpp control vectors cannot steer block 0's output (direction.0 is invalid); use --layer 1 or later");
        }
        let d = load_direction(
            &a.direction,
            Some(persona_lens_analysis::direction::LayerRef::BlockOutput(l)),
            kind,
            cfg.n_layers,
        )?;
        check_direction(&d.vector, cfg.d_model)?;
        let mrn = if ids.is_empty() {
            None
        } else {
            Some(mean_resid_norm(&model, &ids, d.hook)?)
        };
        let v = scale_direction(&d.vector, conv, mrn)?;
        layers.insert(l, v.iter().map(|x| (*x as f64 * a.alpha) as f32).collect());
    }
    let hint = format!("{:?}", cfg.arch).to_lowercase();
    let c = ControlVector {
        model_hint: hint,
        layers,
    };
    if let Some(p) = a.out.parent() {
        std::fs::create_dir_all(p)?;
    }
    cv::write(&a.out, &c)?;
    let back = cv::read(&a.out)?;
    if back != c {
        bail!(
            "control vector {} did not read back identical",
            a.out.display()
        );
    }
    Ok(c)
}

/// Reads a control vector; with `a.layer`, also writes that layer as .npy (+ JSON sidecar).
pub fn cv_import_with(
    a: &CvImportArgs,
) -> Result<persona_lens_analysis::control_vector::ControlVector> {
    use persona_lens_analysis::control_vector as cv;
    let c = cv::read(&a.input)?;
    if let (Some(l), Some(out)) = (a.layer, cv_layer_out(a)) {
        let v = c.layer(l)?;
        if let Some(p) = out.parent() {
            std::fs::create_dir_all(p)?;
        }
        persona_lens_analysis::npy::write(&out, &v, &[v.len()])?;
        persona_lens_analysis::write_json(
            &out.with_extension("json"),
            &json!({"file": out.file_name().map(|f| f.to_string_lossy().to_string()),
                "hook": format!("blocks.{l}.hook_resid_post"), "resid_index": l + 1,
                "layer_arg": l, "source": a.input, "norm": l2(&v)}),
        )?;
    }
    Ok(c)
}

/// Where `control-vector import --layer L` writes that layer.
fn cv_layer_out(a: &CvImportArgs) -> Option<PathBuf> {
    let l = a.layer?;
    Some(
        a.out
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("out/steer/control_vector_layer{l}.npy"))),
    )
}

// ---------------- rate ----------------

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RateOpts {
    /// Model for fluency (perplexity of each answer under the unsteered model); default: the
    /// records' model.
    #[arg(long = "fluency-model")]
    pub fluency_model: Option<String>,
    /// Where the fluency model's short name is looked up [default: PERSONA_LENS_MODELS or ./models].
    #[arg(long)]
    pub fluency_models_dir: Option<PathBuf>,
    /// Skip fluency (no model needed).
    #[arg(long)]
    pub no_fluency: bool,
    /// OpenAI-compatible endpoint for the optional pairwise judge (e.g. http://localhost:8000/v1).
    #[arg(long)]
    pub judge_url: Option<String>,
    #[arg(long, requires = "judge_url")]
    pub judge_model: Option<String>,
    /// Environment variable holding the judge's API key.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub judge_key_env: String,
    /// The persona the judge asks about: "which answer is more targeted to a {persona} user".
    #[arg(long, default_value = "PhD-level expert")]
    pub judge_persona: String,
    #[arg(long, default_value_t = 3)]
    pub judge_retries: usize,
    /// Bootstrap resamples for the 95 % intervals.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Seed of the bootstrap and of the judge's answer order.
    #[arg(long, default_value_t = 0)]
    pub rate_seed: u64,
}

#[derive(Args)]
pub struct RateArgs {
    /// patched_outputs.jsonl from `persona-lens steer`.
    #[arg(long)]
    pub input: PathBuf,
    /// Output directory (default: the input's directory): scores.jsonl, rating_summary.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub opts: RateOpts,
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub quiet: bool,
}

fn read_records(p: &Path) -> Result<Vec<persona_lens_rate::Answer>> {
    let s = std::fs::read_to_string(p).with_context(|| {
        format!(
            "cannot read {}; make it with `persona-lens steer`",
            p.display()
        )
    })?;
    let mut v = Vec::new();
    for (i, l) in s.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let r: serde_json::Value = serde_json::from_str(l)
            .with_context(|| format!("{} line {}: not JSON", p.display(), i + 1))?;
        if r["text"].as_str().is_none() {
            bail!(
                "{} line {}: no 'text' field; rate reads patched_outputs.jsonl from `persona-lens steer`",
                p.display(),
                i + 1
            );
        }
        v.push(serde_json::from_value(r).with_context(|| {
            format!(
                "{} line {}: not a steering record; rate reads patched_outputs.jsonl from `persona-lens steer`",
                p.display(),
                i + 1
            )
        })?);
    }
    if v.is_empty() {
        bail!("{} holds no records", p.display());
    }
    Ok(v)
}

/// Scores every record (resuming from a previous partial run) and summarises per (layer, alpha).
pub fn rate_records(
    records: &[persona_lens_rate::Answer],
    out: &Path,
    o: &RateOpts,
    quiet: bool,
    preloaded: Option<&Model>,
) -> Result<(
    Vec<persona_lens_rate::Scores>,
    Vec<persona_lens_rate::CellSummary>,
)> {
    use persona_lens_rate::judge::{Judge, JudgeConfig};
    use persona_lens_rate::{perplexities, score_record, summarize, Answer, Scores};
    use std::io::Write;
    std::fs::create_dir_all(out)?;
    let final_path = out.join("scores.jsonl");
    let partial = out.join("scores.jsonl.partial");
    let judging = o.judge_url.is_some();
    // Resume: scores already computed (with a verdict when judging) are kept.
    let mut done: std::collections::HashMap<String, Scores> = Default::default();
    for p in [&final_path, &partial] {
        if let Ok(s) = std::fs::read_to_string(p) {
            for l in s.lines() {
                if let Ok(sc) = serde_json::from_str::<Scores>(l) {
                    if !judging || sc.judge_win.is_some() || sc.alpha == Some(0.0) {
                        done.insert(sc.key.clone(), sc);
                    }
                }
            }
        }
    }
    let todo = records
        .iter()
        .filter(|r| !done.contains_key(&r.key()))
        .count();
    let loaded;
    let model: Option<&Model> = if o.no_fluency || todo == 0 {
        None
    } else if let (Some(m), None) = (preloaded, &o.fluency_model) {
        // The steering run's own model: no second copy.
        Some(m)
    } else {
        let name = o
            .fluency_model
            .clone()
            .or_else(|| records[0].model.clone())
            .context("records name no model; give --fluency-model M or --no-fluency")?;
        loaded = load_model(&ModelArgs::named(&name, o.fluency_models_dir.clone(), None))?;
        Some(&loaded)
    };
    let mut judge = match (&o.judge_url, &o.judge_model) {
        (Some(url), Some(m)) => Some(Judge::new(JudgeConfig {
            url: url.clone(),
            model: m.clone(),
            api_key: std::env::var(&o.judge_key_env).ok(),
            retries: o.judge_retries,
            timeout: std::time::Duration::from_secs(60),
            cache: out.join("judge_cache.jsonl"),
            seed: o.rate_seed,
        })?),
        (Some(_), None) => bail!("--judge-url needs --judge-model NAME"),
        _ => None,
    };
    // alpha = 0 answers per (prompt, layer, mode): the judge's baseline.
    let baseline: std::collections::HashMap<String, &Answer> = records
        .iter()
        .filter(|r| r.is_unsteered())
        .map(|r| (r.cell_key(), r))
        .collect();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial)?;
    // The fluency of every answer still to rate, several answers per forward.
    let todo_ids: Vec<(&[u32], &[u32])> = records
        .iter()
        .filter(|r| !done.contains_key(&r.key()))
        .map(|r| (r.prompt_ids.as_slice(), r.generated_ids.as_slice()))
        .collect();
    let mut nll = match model {
        Some(m) => perplexities(m, &todo_ids)?,
        None => vec![None; todo_ids.len()],
    }
    .into_iter();
    let fluency_model = model.map(|m| m.info.name.as_str());
    let pb = progress(todo as u64, quiet, "records rated");
    let mut scores = Vec::with_capacity(records.len());
    for r in records {
        let key = r.key();
        if let Some(s) = done.get(&key) {
            scores.push(s.clone());
            continue;
        }
        let mut s = score_record(r, nll.next().flatten(), fluency_model);
        if let Some(j) = judge.as_mut() {
            if !r.is_unsteered() {
                let b = baseline
                    .get(&r.cell_key())
                    .with_context(|| {
                        format!("no alpha = 0 answer for {key}: the judge compares against it; include alpha 0 in the steer run")
                    })?;
                s.judge_win = Some(j.compare(&o.judge_persona, &r.prompt, &r.text, &b.text)?);
            }
        }
        writeln!(f, "{}", serde_json::to_string(&s)?)?;
        f.flush()?;
        scores.push(s);
        pb.inc(1);
    }
    pb.finish_and_clear();
    write_jsonl(&final_path, &scores)?;
    let _ = std::fs::remove_file(&partial);
    let summary = summarize(&scores, o.bootstrap, o.rate_seed);
    persona_lens_analysis::write_json(
        &out.join("rating_summary.json"),
        &json!({
            "input_records": records.len(),
            "fluency_model": model.map(|m| m.info.name.clone()),
            "judge": o.judge_url.as_ref().map(|u| json!({"url": u, "model": o.judge_model, "persona": o.judge_persona})),
            "bootstrap": o.bootstrap, "seed": o.rate_seed,
            "units": {"flesch_reading_ease": "score (higher = easier)", "flesch_kincaid_grade": "US grade",
                      "gunning_fog": "US grade", "smog": "US grade", "coleman_liau": "US grade", "ari": "US grade",
                      "new_dale_chall": "score (≈ grade band)", "perplexity": "exp(nats/token) under the unsteered model",
                      "technical_share": "fraction of words", "repetition_rate": "fraction of repeated word trigrams",
                      "judge_win": "fraction of comparisons won against alpha = 0"},
            "cells": summary,
        }),
    )?;
    Ok((scores, summary))
}

fn print_summary(summary: &[persona_lens_rate::CellSummary]) {
    println!(
        "{:>5} {:>7} {:>4} {:>16} {:>16} {:>14} {:>10}",
        "layer", "alpha", "n", "FK grade [95%]", "Dale-Chall", "perplexity", "judge"
    );
    let cell = |c: &persona_lens_rate::CellSummary, k: &str| -> String {
        c.measures
            .get(k)
            .map(|(m, lo, hi, _)| format!("{m:.2} [{lo:.1},{hi:.1}]"))
            .unwrap_or_else(|| "-".into())
    };
    for c in summary {
        println!(
            "{:>5} {:>7} {:>4} {:>16} {:>16} {:>14} {:>10}",
            c.layer,
            c.alpha.map_or("-".to_string(), |a| format!("{a:.2}")),
            c.n,
            cell(c, "flesch_kincaid_grade"),
            cell(c, "new_dale_chall"),
            c.measures
                .get("perplexity")
                .map(|(m, _, _, _)| format!("{m:.1}"))
                .unwrap_or_else(|| "-".into()),
            c.measures
                .get("judge_win")
                .map(|(m, _, _, _)| format!("{m:.2}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
}

/// `rate`'s result: one score per record and the per-(layer, alpha) summary with bootstrap
/// intervals (also written as scores.jsonl and rating_summary.json).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RateResult {
    pub scores: Vec<persona_lens_rate::Scores>,
    pub cells: Vec<persona_lens_rate::CellSummary>,
}

fn rate_out(a: &RateArgs) -> PathBuf {
    a.out.clone().unwrap_or_else(|| {
        a.input
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    })
}

/// Rates the records of `a.input` into `rate_out(a)` (resuming a partial run).
pub fn rate_with(a: &RateArgs) -> Result<RateResult> {
    let records = read_records(&a.input)?;
    let quiet = a.quiet || a.json;
    let (scores, cells) = rate_records(&records, &rate_out(a), &a.opts, quiet, None)?;
    Ok(RateResult { scores, cells })
}

pub fn rate(a: RateArgs) -> Result<()> {
    let out = rate_out(&a);
    let RateResult {
        scores,
        cells: summary,
    } = rate_with(&a)?;
    if a.json {
        println!("{}", json!({"records": scores.len(), "cells": summary}));
        return Ok(());
    }
    println!("rated {} records from {}", scores.len(), a.input.display());
    print_summary(&summary);
    println!(
        "wrote {} and {}",
        out.join("scores.jsonl").display(),
        out.join("rating_summary.json").display()
    );
    Ok(())
}

// ---------------- steer-sweep ----------------

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SteerSweepArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DatasetArgs,
    #[command(flatten)]
    pub steer: SteerSpec,
    #[command(flatten)]
    pub gen: GenSpec,
    #[command(flatten)]
    pub rate: RateOpts,
    /// Output directory: patched_outputs.jsonl, scores.jsonl, rating_summary.json, plots.
    #[arg(long, default_value = "out/steer_sweep")]
    pub out: PathBuf,
    #[arg(long)]
    pub quiet: bool,
}

/// Dose-response plots: a measure against alpha, one line per layer, 95 % bootstrap bands.
pub fn dose_response_plots(
    summary: &[persona_lens_rate::CellSummary],
    model: &str,
    caption: &str,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    use persona_lens_report::{save_line_chart, LineChart, Series};
    let mut files = Vec::new();
    let mut layers: Vec<i64> = summary.iter().map(|c| c.layer).collect();
    layers.sort();
    layers.dedup();
    for (key, label, file) in [
        (
            "flesch_kincaid_grade",
            "Flesch-Kincaid grade (US grade)",
            "dose_response_grade",
        ),
        (
            "perplexity",
            "perplexity under the unsteered model",
            "dose_response_fluency",
        ),
        (
            "technical_share",
            "technical-word share",
            "dose_response_technical",
        ),
    ] {
        let series: Vec<Series> = layers
            .iter()
            .filter_map(|&l| {
                let mut pts: Vec<(f64, (f64, f64, f64, usize))> = summary
                    .iter()
                    .filter(|c| c.layer == l)
                    .filter_map(|c| Some((c.alpha?, *c.measures.get(key)?)))
                    .collect();
                if pts.is_empty() {
                    return None;
                }
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                Some(Series {
                    name: format!("layer {l}"),
                    x: pts.iter().map(|p| p.0).collect(),
                    y: pts.iter().map(|p| p.1 .0).collect(),
                    band: Some((
                        pts.iter().map(|p| p.1 .1).collect(),
                        pts.iter().map(|p| p.1 .2).collect(),
                    )),
                    dashed: false,
                })
            })
            .collect();
        if series.is_empty() {
            continue;
        }
        let chart = LineChart {
            title: format!("{label} vs steering alpha, {model}"),
            x_label: "alpha".into(),
            y_label: label.into(),
            series,
            y_range: None,
            hline: None,
            caption: caption.into(),
        };
        files.extend(save_line_chart(&chart, &out.join(file))?);
    }
    Ok(files)
}

pub fn steer_sweep(a: SteerSweepArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    steer_sweep_with(&model, &a, true).map(|_| ())
}

/// What `steer-sweep` writes to `steer_sweep.json` (fields in alphabetical order: the file's).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SteerSweepResult {
    pub alphas: Vec<f64>,
    pub caption: String,
    /// Per (layer, alpha): every measure's mean and bootstrap 95 % interval.
    pub cells: Vec<persona_lens_rate::CellSummary>,
    pub chat: bool,
    pub layers: Vec<usize>,
    pub model: String,
    pub n_prompts: usize,
    pub seconds: f64,
}

impl SteerSweepResult {
    /// A measure's (mean, CI low, CI high) in the cell at `layer` and `alpha`.
    pub fn measure(&self, layer: usize, alpha: f64, name: &str) -> Option<(f64, f64, f64)> {
        self.cells
            .iter()
            .find(|c| c.layer == layer as i64 && c.alpha.is_some_and(|a| (a - alpha).abs() < 1e-9))
            .and_then(|c| c.measures.get(name))
            .map(|&(m, lo, hi, _)| (m, lo, hi))
    }
}

/// The dose-response sweep on a loaded model (which also scores fluency); writes its files and
/// prints unless `print` is false.
pub fn steer_sweep_with(
    model: &Model,
    a: &SteerSweepArgs,
    print: bool,
) -> Result<SteerSweepResult> {
    let chat = a.data.chat(model);
    let prompts = steer_prompts(&a.data, &a.gen)?;
    let quiet = a.quiet || a.model.json;
    let t = Instant::now();
    let records = run_steering(model, &prompts, chat, &a.steer, &a.gen, quiet)?;
    std::fs::create_dir_all(&a.out)?;
    write_jsonl(&a.out.join("patched_outputs.jsonl"), &records)?;
    let answers: Vec<persona_lens_rate::Answer> = records.iter().map(|r| r.answer()).collect();
    let (_, summary) = rate_records(&answers, &a.out, &a.rate, quiet, Some(model))?;
    let caption = format!(
        "{}; direction {} ({}, norm {}); positions {}; {} prompts ({}), greedy={}, seed {}, {} new tokens; chat template {chat}; bands: bootstrap 95 % CI",
        model.info.name,
        a.steer
            .direction
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default(),
        a.steer.kind,
        a.steer.norm,
        a.steer.positions,
        prompts.len(),
        a.gen.persona,
        a.gen.sampling.temperature.is_none(),
        a.gen.sampling.seed,
        a.gen.max_new_tokens
    );
    let files = dose_response_plots(&summary, &model.info.name, &caption, &a.out)?;
    let result = SteerSweepResult {
        alphas: a.steer.alpha.clone(),
        caption,
        cells: summary,
        chat,
        layers: a.steer.layer.clone(),
        model: model.info.name.clone(),
        n_prompts: prompts.len(),
        seconds: t.elapsed().as_secs_f64(),
    };
    let summary = &result.cells;
    persona_lens_analysis::write_json(&a.out.join("steer_sweep.json"), &result)?;
    if !print {
        return Ok(result);
    }
    if a.model.json {
        println!("{}", json!({"cells": summary}));
        return Ok(result);
    }
    println!(
        "steer-sweep on {}: {} records in {:.1} s",
        model.info.name,
        records.len(),
        t.elapsed().as_secs_f64()
    );
    print_summary(summary);
    for f in files {
        println!("  {}", f.display());
    }
    Ok(result)
}
