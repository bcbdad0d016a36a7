//! `persona-lens run`: the seed's `run_all.py` as one command. The model is loaded once; each
//! experiment is the same code as its own subcommand, run on a typed spec (recorded as the
//! equivalent stand-alone command, so every step can be re-run alone), activations are harvested once and reused, and the results are
//! gathered into `summary.json`, `report.md` and a self-contained `report.html`.
//!
//! Layout of `--out DIR`:
//! - `config.resolved.toml`: every option after defaults, config file and flags (re-run with
//!   `--config DIR/config.resolved.toml` to repeat the study exactly);
//! - `run.json`: versions, model hash, seeds, the command of each step, timings;
//! - `<step>/`: the step's own files, and `<step>/step.json` (written last: the step is done);
//! - `summary.json`, `report.md`, `report.html`.
//!
//! `summary.json` holds no timings or paths outside DIR, so the same config and seed give an
//! identical file. Interrupting (SIGINT/SIGTERM) deletes in-flight temp files before exiting;
//! `--resume` then skips every step whose `step.json` matches the current config.

use crate::analysis_jobs::{
    direction_with, run_dataset_lens, run_probe, DirectionArgs, LensArgs, ProbeArgs,
};
use crate::analysis_jobs::{DatasetArgs, HarvestOpts};
use crate::engine_jobs::load_model;
use crate::patch_jobs::{
    ablate_with, heads_with, patch_with, AblateArgs, HeadsArgs, PairArgs, PatchArgs,
};
use crate::steer_jobs::{steer_sweep_with, SteerArgs, SteerSweepArgs};
use crate::step_data::*;
use crate::{spec, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, FromArgMatches};
use persona_lens_analysis::claims::Claim;
use persona_lens_analysis::direction::DirectionKind;
use persona_lens_analysis::steering::NormConvention;
use persona_lens_analysis::write_json;
use persona_lens_analysis::PositionRule;
use persona_lens_engine::Model;
use persona_lens_report::{
    save_bar_chart, save_line_chart, Bar, BarChart, Document, LineChart, Series,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The study's default model: a chat model with its chat template (gemma-3-270m, a base model,
/// is `--model gemma-3-270m` away).
pub const STUDY_MODEL: &str = "smollm2-135m-instruct";

pub const ALL_STEPS: [&str; 7] = ["probe", "lens", "patch", "heads", "ablate", "steer", "diff"];

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunArgs {
    /// Experiments, comma separated: probe, lens, patch, heads, ablate, steer, diff, or all.
    #[arg(long, value_delimiter = ',')]
    pub experiment: Vec<String>,
    /// Model (default: the config's, else smollm2-135m-instruct, a chat model).
    #[arg(long)]
    pub model: Option<String>,
    /// Where short names are looked up [env: PERSONA_LENS_MODELS; default: ./models].
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Topic for the lens, head ranking, ablation and steering prompts (e.g. physics).
    #[arg(long)]
    pub pair_id: Option<String>,
    /// Questions per topic in the probe / direction dataset.
    #[arg(long)]
    pub n_questions_per_pair: Option<usize>,
    /// A dataset file (the crosscoder notes' schema) for the probe and direction steps instead
    /// of the built-in set; its splits are drawn from the file (by pair id).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Evaluate probes on held-out phrasing templates (the default).
    #[arg(long, overrides_with = "no_template_holdout")]
    pub template_holdout: bool,
    #[arg(long)]
    pub no_template_holdout: bool,
    /// Probe residual rows 0..=L only.
    #[arg(long)]
    pub max_layers: Option<usize>,
    /// Accepted for the seed's command line; the model is always loaded once.
    #[arg(long)]
    pub reuse_model: bool,
    /// Output directory (default: the config's, else out/study).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A TOML file with any of the study's options (see `config.resolved.toml` of a run).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seed of probes' folds, ablation baselines, steering, rating and crosscoder training.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Threads for the math kernels (default: all cores).
    #[arg(long, value_parser = crate::threads)]
    pub threads: Option<usize>,
    /// Skip steps already finished in --out with the same configuration.
    #[arg(long)]
    pub resume: bool,
    /// No progress bars or step lines.
    #[arg(long)]
    pub quiet: bool,
    /// Print summary.json on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

// ---------------- configuration ----------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StudyConfig {
    pub experiment: Vec<String>,
    pub model: String,
    pub out: PathBuf,
    pub seed: u64,
    /// Built-in persona pair: child-phd, beginner-expert, layperson-professional, student-professor.
    pub persona_pair: String,
    /// Topic of the lens, head ranking, ablation and steering prompts.
    pub pair_id: String,
    /// Questions per topic for probes and directions (8 topics x 12 persona paraphrases x 2
    /// personas each, plus 4 lexical controls per question).
    pub n_questions_per_pair: usize,
    /// A dataset file for the probe and direction steps (default: the built-in set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<PathBuf>,
    pub template_holdout: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_layers: Option<usize>,
    /// Position rule of the probe and direction activations.
    pub position: PositionRule,
    pub probe: ProbeCfg,
    pub lens: LensCfg,
    pub patch: PatchCfg,
    pub heads: HeadsCfg,
    pub ablate: AblateCfg,
    pub steer: SteerCfg,
    pub diff: DiffCfg,
}

impl StudyConfig {
    /// Settings that are wrong whatever the model, refused before it loads.
    pub fn check(&self) -> Result<()> {
        persona_lens_analysis::probe::ProbeOptions {
            folds: self.probe.folds,
            l2: self.probe.l2,
            ..Default::default()
        }
        .validate()
        .context("[probe]")?;
        for (name, n) in [
            ("[steer] n_prompts", self.steer.n_prompts),
            ("[diff] batch_size", self.diff.batch_size),
            ("[diff] steps", self.diff.steps),
            ("[diff] dict_size", self.diff.dict_size),
        ] {
            if n == 0 {
                bail!("{name} = 0: give at least 1");
            }
        }
        if let Some(a) = self.steer.alphas.iter().find(|a| !a.is_finite()) {
            bail!("[steer] alphas: {a} is not a finite number");
        }
        if let Some(file) = &self.dataset {
            persona_lens_analysis::dataset::load_file(file)?;
        }
        // 0 = every question; one question cannot be split into a ranking and a test half.
        if self.experiment.iter().any(|e| e == "ablate") && self.heads.n_questions_per_pair == 1 {
            bail!("[heads] n_questions_per_pair = 1: heads are ranked on half of the questions and ablated on the other half; give at least 2");
        }
        if !(0.0..1.0).contains(&self.diff.validation_fraction) {
            bail!(
                "[diff] validation_fraction = {}: give a fraction from 0 up to (not including) 1",
                self.diff.validation_fraction
            );
        }
        if self.experiment.iter().any(|e| e == "diff" || e == "all")
            && self.diff.n_questions_per_pair == 1
        {
            bail!("[diff] n_questions_per_pair = 1: latents are ranked on half of the questions and tested on the other half; give at least 2");
        }
        Ok(())
    }

    /// Settings that depend on the model, checked right after it loads and before any step:
    /// layer indices within its depth.
    pub fn check_against(&self, n_layers: usize) -> Result<()> {
        if let Some(&l) = self.steer.layers.iter().find(|&&l| l >= n_layers) {
            bail!(
                "[steer] layers: {l} is out of range; the model has {n_layers} blocks (0..={})",
                n_layers - 1
            );
        }
        if let Some(m) = self.max_layers.filter(|&m| m > n_layers) {
            bail!("max_layers {m} is more than the model's {n_layers} blocks");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeCfg {
    pub folds: usize,
    pub l2: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LensCfg {
    /// Questions per topic (every topic of the persona pair; the probe's harvest is reused when
    /// this equals the study's `n_questions_per_pair`).
    pub n_questions_per_pair: usize,
    /// The effect size (logits of expert-minus-simple readout, expert minus novice persona) a
    /// row must exceed with its 95 % lower bound to count as the decision row.
    pub min_effect: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PatchCfg {
    pub clean: String,
    pub corrupted: String,
    pub answer_a: String,
    pub answer_b: String,
    pub sweeps: Vec<persona_lens_analysis::patching::SweepKind>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HeadsCfg {
    pub n_questions_per_pair: usize,
    pub top: usize,
    pub min_gap: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AblateCfg {
    /// Ablation modes; the first is the tested one (its claim), the others are described.
    pub modes: Vec<persona_lens_analysis::heads::AblationMode>,
    /// Random head sets per mode (the first three also get probes and generated answers).
    pub n_random: usize,
    /// Random head sets for the first mode, whose rank p-value is the claim's (gap only beyond
    /// the first three): 200 let p reach 1/201.
    pub n_random_test: usize,
    pub n_generate: usize,
    pub gen_tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SteerCfg {
    /// Layers (block outputs) of the selection sweep; empty = one third and one half of the depth.
    pub layers: Vec<usize>,
    pub alphas: Vec<f64>,
    /// Novice prompts of the selection sweep (selection split).
    pub n_prompts: usize,
    /// Novice and expert prompts of the evaluation (evaluation split, distinct questions).
    pub n_eval_prompts: usize,
    /// Norm-matched random directions beside the persona direction on the evaluation prompts.
    pub n_random: usize,
    /// The sweep's cell is chosen among those whose answers' perplexity stays within this
    /// factor of the unsteered answers'.
    pub max_perplexity_ratio: f64,
    pub max_new_tokens: usize,
    pub kind: DirectionKind,
    pub norm: NormConvention,
    pub bootstrap: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DiffCfg {
    /// The chat model diffed against the study's model when the study's model is a base model.
    pub chat_model: String,
    /// The base model diffed against the study's model when the study's model is a chat model.
    pub base_model: String,
    pub dict_size: usize,
    pub steps: usize,
    pub batch_size: usize,
    /// `batchtopk` (Minder et al.'s recommendation) or `l1`.
    pub objective: crate::diff_jobs::ObjectiveArg,
    /// BatchTopK's active latents per row.
    pub k: usize,
    pub l1_coeff: f64,
    /// Samples held out of training for FVE, L0 and dead fraction.
    pub validation_fraction: f64,
    /// Persona-dataset prompts in the training corpus (0 = all of the study's dataset).
    pub max_dataset_items: usize,
    /// Questions per persona pair for ranking latents and testing them on held-out questions
    /// (half each): at least 2.
    pub n_questions_per_pair: usize,
    pub top_k: usize,
    pub n_verify: usize,
}

impl Default for StudyConfig {
    fn default() -> Self {
        StudyConfig {
            experiment: vec!["all".into()],
            // The question is how chat models model their user: the chat model by default.
            model: STUDY_MODEL.into(),
            out: "out/study".into(),
            seed: 0,
            persona_pair: "child-phd".into(),
            pair_id: "physics".into(),
            n_questions_per_pair: 5,
            dataset: None,
            template_holdout: true,
            max_layers: None,
            position: spec::defaults::<HarvestOpts>().position,
            probe: ProbeCfg::default(),
            lens: LensCfg::default(),
            patch: PatchCfg::default(),
            heads: HeadsCfg::default(),
            ablate: AblateCfg::default(),
            steer: SteerCfg::default(),
            diff: DiffCfg::default(),
        }
    }
}
// The study's defaults: a setting that is also a command's flag takes the flag's default (one
// source, `spec::defaults`); a setting the study sizes differently from the stand-alone command
// (fewer prompts, random sets, steps: the whole study must run in minutes) says so.
impl Default for ProbeCfg {
    fn default() -> Self {
        let p: ProbeArgs = spec::defaults();
        ProbeCfg {
            folds: p.folds,
            l2: p.l2,
        }
    }
}
impl Default for LensCfg {
    fn default() -> Self {
        LensCfg {
            n_questions_per_pair: 5,
            min_effect: 0.5,
        }
    }
}
impl Default for PatchCfg {
    fn default() -> Self {
        let p: PatchArgs = spec::defaults();
        PatchCfg {
            // Equal token counts, no field word in either persona; the chat model's first answer
            // word: "Imagine" for the child, "The" for the PhD (read off this one pair, so the
            // patch step reports maps, no claim).
            clean: "I am a child. Explain the twin paradox to me.".into(),
            corrupted: "I have a PhD. Explain the twin paradox to me.".into(),
            answer_a: "Imagine".into(),
            answer_b: "The".into(),
            sweeps: p.sweep,
        }
    }
}
impl Default for HeadsCfg {
    fn default() -> Self {
        let h: HeadsArgs = spec::defaults();
        HeadsCfg {
            // The study's own: 3 questions per topic (the command: every question).
            n_questions_per_pair: 3,
            top: h.top,
            min_gap: f64::from(h.min_gap),
        }
    }
}
impl Default for AblateCfg {
    fn default() -> Self {
        let a: AblateArgs = spec::defaults();
        AblateCfg {
            modes: a.mode,
            // The study's own: 20 random sets per mode and 200 for the tested one (the command:
            // 5), so the rank p-value can reach 1/201; fewer and shorter generated answers.
            n_random: 20,
            n_random_test: 200,
            n_generate: 2,
            gen_tokens: 24,
        }
    }
}
impl Default for SteerCfg {
    fn default() -> Self {
        let s: SteerSweepArgs = steer_defaults(&[0]).expect("steer-sweep parses with a layer");
        SteerCfg {
            layers: vec![],
            // The study's own: a 4 x 2 sweep on 4 prompts, shorter answers (the command: alphas
            // 0,1,2,4,8 on 20 prompts of 48 tokens).
            alphas: vec![0.0, 2.0, 4.0, 8.0],
            n_prompts: 4,
            n_eval_prompts: 8,
            n_random: 20,
            max_perplexity_ratio: 2.0,
            max_new_tokens: 32,
            kind: s.steer.kind,
            norm: s.steer.norm,
            bootstrap: s.rate.bootstrap,
        }
    }
}
impl Default for DiffCfg {
    fn default() -> Self {
        use crate::diff_jobs::{AnalyzeArgs, TrainArgs};
        let t: TrainArgs = spec::defaults();
        let a: AnalyzeArgs = spec::defaults();
        DiffCfg {
            chat_model: a.pair.chat_model,
            base_model: a.pair.base_model,
            // The study's own: a small dictionary trained briefly on the study's prompts (the
            // command: 1024 latents, 2000 steps of 256 rows).
            dict_size: 256,
            steps: 400,
            batch_size: 64,
            objective: t.objective,
            k: t.k,
            l1_coeff: t.l1_coeff,
            validation_fraction: t.validation_fraction,
            max_dataset_items: 0,
            // At least 2: latents are ranked on half of the questions and tested on the other.
            n_questions_per_pair: 6,
            top_k: a.top_k,
            n_verify: a.n_verify,
        }
    }
}

impl RunArgs {
    /// Defaults, then the config file, then flags.
    pub fn resolve(&self) -> Result<StudyConfig> {
        let mut c = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read --config {}", p.display()))?;
                toml::from_str::<StudyConfig>(&text).map_err(|e| {
                    anyhow::anyhow!(
                        "--config {}: {} (see config.resolved.toml of a run for every key)",
                        p.display(),
                        e.to_string().lines().collect::<Vec<_>>().join(" ")
                    )
                })?
            }
            None => StudyConfig::default(),
        };
        if !self.experiment.is_empty() {
            c.experiment = self.experiment.clone();
        }
        if let Some(m) = &self.model {
            c.model = m.clone();
        }
        if let Some(o) = &self.out {
            c.out = o.clone();
        }
        if let Some(s) = self.seed {
            c.seed = s;
        }
        if let Some(p) = &self.pair_id {
            c.pair_id = p.clone();
        }
        if let Some(n) = self.n_questions_per_pair {
            c.n_questions_per_pair = n;
        }
        if let Some(d) = &self.dataset {
            c.dataset = Some(d.clone());
        }
        if self.no_template_holdout {
            c.template_holdout = false;
        } else if self.template_holdout {
            c.template_holdout = true;
        }
        if self.max_layers.is_some() {
            c.max_layers = self.max_layers;
        }
        c.experiment = steps_of(&c.experiment)?;
        c.check()?;
        Ok(c)
    }
}

/// The steps named, in the study's order.
fn steps_of(names: &[String]) -> Result<Vec<String>> {
    let mut want = std::collections::BTreeSet::new();
    for n in names.iter().map(|s| s.trim().to_lowercase()) {
        match n.as_str() {
            "all" => want.extend(ALL_STEPS.iter().map(|s| s.to_string())),
            s if ALL_STEPS.contains(&s) => {
                want.insert(s.to_string());
            }
            other => bail!(
                "unknown experiment '{other}'; use probe, lens, patch, heads, ablate, steer, diff or all"
            ),
        }
    }
    if want.is_empty() {
        bail!("no experiment given; use --experiment all (or probe, lens, ...)");
    }
    Ok(ALL_STEPS
        .iter()
        .filter(|s| want.contains(**s))
        .map(|s| s.to_string())
        .collect())
}

// ---------------- results ----------------

/// One headline number with its unit and provenance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Headline {
    pub id: String,
    pub label: String,
    pub value: f64,
    pub unit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci95: Option<(f64, f64)>,
    pub provenance: Value,
}

impl Headline {
    /// The value as the report prints it (the same string in every rendering).
    pub fn shown(&self) -> String {
        fmt_num(self.value)
    }
}

pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if v == v.round() && v.abs() < 1e6 {
        return format!("{v:.0}");
    }
    if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Plot {
    /// PNG path relative to the study folder (an SVG sits beside it).
    pub png: String,
    pub caption: String,
}

/// The answer words the heads step chose (`heads/answers.json`), which the ablate step reuses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnswerChoice {
    pub answer_a: String,
    pub answer_b: String,
    /// Mean novice-minus-expert logit difference of the pair on the selection split (logits).
    pub mean_persona_gap: Option<f64>,
    pub n_pairs: usize,
    pub rule: String,
    pub split: String,
}

/// The study's `summary.json`, typed: the executive summary and the report read its fields, not
/// string keys. Fields are in alphabetical order, the file's key order before it was typed.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Summary {
    /// The heads step's top heads with their hypothesised roles (empty without that step).
    pub circuit: Vec<CircuitHead>,
    pub claims: Vec<Claim>,
    /// The probe step's dataset (absent without that step).
    pub dataset: Option<DatasetFacts>,
    pub executive_summary: String,
    pub headlines: Vec<Headline>,
    pub model: ModelFacts,
    /// Unsupported claims first, then each step's own negative findings.
    pub negative_results: Vec<NegativeResult>,
    pub objective: String,
    pub persona_pair: String,
    pub plots: Vec<Plot>,
    pub schema: String,
    pub seed: u64,
    /// Each step's compact results: the step's typed data (`step_data`) as JSON.
    pub steps: BTreeMap<String, Value>,
    pub steps_run: Vec<String>,
    pub tool: String,
    pub topic: String,
}

/// The model a study ran on.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ModelFacts {
    pub arch: String,
    pub chat_template: bool,
    pub d_model: usize,
    pub format: String,
    /// `chat` or `base`.
    pub kind: String,
    /// What the f32 matrix products ran on: `mkl <version>` or `gemm` (engine::mkl).
    #[serde(default)]
    pub matmul: String,
    pub n_heads: usize,
    pub n_layers: usize,
    pub name: String,
    pub precision: String,
    pub sha256: String,
    /// GGUF tensor types and how many tensors of each.
    pub weight_types: BTreeMap<String, usize>,
}

/// The probe step's dataset (from its `ProbeData`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DatasetFacts {
    pub class_counts: BTreeMap<String, usize>,
    pub hash: String,
    pub n_prompts: usize,
    pub n_templates: usize,
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct NegativeResult {
    pub step: String,
    pub text: String,
}

pub use crate::step_data::CircuitHead;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct StepOut {
    pub step: String,
    pub config_hash: String,
    /// The equivalent stand-alone command.
    pub command: Vec<String>,
    pub headlines: Vec<Headline>,
    /// Negative results and failures, written from this step's numbers.
    pub negatives: Vec<String>,
    /// This step's tested claims (p-values adjusted over the whole run in the summary).
    #[serde(default)]
    pub claims: Vec<Claim>,
    pub plots: Vec<Plot>,
    /// The step's typed data (`step_data::ProbeData`, `LensData`, ...) as JSON.
    pub data: Value,
}

struct Ctx<'a> {
    model: &'a Model,
    cfg: &'a StudyConfig,
    out: &'a Path,
    quiet: bool,
    models_dir: Option<PathBuf>,
    threads: Option<usize>,
}

impl Ctx<'_> {
    fn dir(&self, step: &str) -> PathBuf {
        self.out.join(step)
    }
    /// The model every step runs on (loaded once; the spec names it for provenance).
    fn model_args(&self) -> ModelArgs {
        ModelArgs::named(&self.cfg.model, self.models_dir.clone(), None)
    }
    /// The study's prompts: its dataset file, else the built-in set for its persona pair
    /// (`n` questions per topic), optionally one topic.
    fn dataset(&self, topic: Option<&str>, n: usize) -> DatasetArgs {
        let mut d: DatasetArgs = spec::defaults();
        match &self.cfg.dataset {
            Some(file) => d.dataset = Some(file.clone()),
            None => {
                d.persona_pair = self.cfg.persona_pair.split(',').map(String::from).collect();
                d.n_questions_per_pair = n;
            }
        }
        if let Some(t) = topic {
            d.pair_id = vec![t.to_string()];
        }
        d
    }
    /// The stand-alone command that runs `spec` alone (`persona-lens <sub> ...`), recorded as
    /// the step's provenance. Paths inside the study folder are written relative to it (the
    /// command runs from the study folder), so a copied or moved study that resumes records the
    /// same commands as the original, not the original folder's paths.
    fn command<T: Serialize>(&self, sub: &str, spec: &T) -> Vec<String> {
        let mut v = vec![sub.to_string()];
        v.extend(spec::command(spec).into_iter().map(|arg| {
            match Path::new(&arg).strip_prefix(self.out) {
                Ok(rel) if rel.as_os_str().is_empty() => ".".to_string(),
                Ok(rel) => rel.display().to_string(),
                Err(_) => arg,
            }
        }));
        v
    }
    fn prov(&self, extra: Value) -> Value {
        merged(
            json!({"model": self.cfg.model, "seed": self.cfg.seed}),
            &extra,
        )
    }
}

/// A step's typed data as the JSON value `StepOut` keeps.
fn step_json<T: Serialize>(data: &T) -> Result<Value> {
    serde_json::to_value(data).context("internal: a step's data as JSON")
}

/// `base` with the keys of the object `extra` added (or replaced).
fn merged(mut base: Value, extra: &Value) -> Value {
    if let (Some(o), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    base
}

/// Persona directions from the probe step's activations (steering reads them), with the middle
/// row exported as `persona_direction.npy`. Returns the directions' metadata.
fn persona_directions(c: &Ctx) -> Result<persona_lens_analysis::direction::DirectionMeta> {
    // The probe's prompts exactly (so its stored activations are reused); the direction itself
    // is fitted on the selection split only.
    let da = DirectionArgs {
        model: c.model_args(),
        data: DatasetArgs {
            split_seed: c.cfg.seed,
            lexical_controls: true,
            ..c.dataset(None, c.cfg.n_questions_per_pair)
        },
        h: HarvestOpts {
            position: c.cfg.position,
            out: c.dir("probe"),
            quiet: c.quiet,
            ..spec::defaults()
        },
        layer: Some(c.model.config().n_layers / 2),
        align_probe_index: true,
        ..spec::defaults()
    };
    direction_with(c.model, &da, false)
}

/// A steering spec at `layers` with every other field at its command-line default (the layers
/// are the one setting a steering command requires).
fn steer_defaults<T: Args + FromArgMatches>(layers: &[usize]) -> Result<T> {
    spec::parse(&["--layer".to_string(), join(layers)])
        .map_err(|e| anyhow::anyhow!("internal: steering defaults: {e}"))
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn novice_expert(pair: &str) -> (String, String) {
    match pair.split_once('-') {
        Some((a, b)) => (a.to_string(), b.to_string()),
        None => ("novice".into(), "expert".into()),
    }
}

// ---------------- steps ----------------

fn probe_step(c: &Ctx) -> Result<StepOut> {
    let dir = c.dir("probe");
    let pa = ProbeArgs {
        model: c.model_args(),
        data: DatasetArgs {
            split_seed: c.cfg.seed,
            lexical_controls: true,
            ..c.dataset(None, c.cfg.n_questions_per_pair)
        },
        h: HarvestOpts {
            position: c.cfg.position,
            out: dir.clone(),
            quiet: c.quiet,
            batch_size: 32,
        },
        folds: c.cfg.probe.folds,
        l2: c.cfg.probe.l2,
        seed: c.cfg.seed,
        no_template_holdout: !c.cfg.template_holdout,
        max_layers: c.cfg.max_layers,
        ..spec::defaults()
    };
    let args = c.command("probe", &pa);
    let r = run_probe(c.model, &pa, c.quiet)?;
    let n = c.model.config().n_layers;
    let dmeta = persona_directions(c)?;

    let holdout = |l: &persona_lens_analysis::probe::LayerProbe| {
        l.template_holdout.as_ref().unwrap_or(&l.cv).accuracy
    };
    // The row is chosen on the selection split alone (CV inside it; the earliest of the best,
    // ties are common), so the evaluation split can test it.
    let chooser = |l: &persona_lens_analysis::probe::LayerProbe| {
        l.generalization
            .select_cv
            .as_ref()
            .map(|m| m.accuracy)
            .unwrap_or_else(|| holdout(l))
    };
    let top_acc = r
        .layers
        .iter()
        .map(chooser)
        .fold(f64::NEG_INFINITY, f64::max);
    let best = r
        .layers
        .iter()
        .find(|l| chooser(l) >= top_acc)
        .context("probe produced no layers")?;
    let row = best.resid_index.unwrap_or(0);
    let first90 = r
        .layers
        .iter()
        .find(|l| holdout(l) >= 0.9)
        .and_then(|l| l.resid_index);
    let hook_of = |row: usize| {
        r.layers
            .iter()
            .find(|l| l.resid_index == Some(row))
            .map(|l| l.hook.clone())
            .unwrap_or_default()
    };
    let prov = |row: usize| {
        c.prov(
            json!({"hook": hook_of(row), "resid_row": row, "position": r.position_rule,
            "dataset_hash": r.dataset_hash, "n_prompts": r.n_prompts, "file": "probe/probe.json"}),
        )
    };
    let eval = if c.cfg.template_holdout {
        "held-out-paraphrase"
    } else {
        "cross-validated"
    };
    // The headline accuracy: on the evaluation split (new questions and persona paraphrases)
    // where there is one, else the held-out-paraphrase or CV accuracy.
    let (reported_metrics, reported) = match &best.generalization.split_transfer {
        Some(m) => (
            m,
            "tested on the evaluation split (new questions and paraphrases)",
        ),
        None => (
            best.template_holdout.as_ref().unwrap_or(&best.cv),
            "held out by paraphrase or fold",
        ),
    };
    let mut headlines = vec![Headline {
        id: "probe.best_accuracy".into(),
        label: format!(
            "probe accuracy, {} vs {}, at residual row {row} chosen on the selection split, {reported}",
            r.classes[0],
            r.classes.get(1).cloned().unwrap_or_default()
        ),
        value: reported_metrics.accuracy,
        unit: "fraction correct".into(),
        ci95: Some(
            reported_metrics
                .accuracy_ci95_by_question
                .unwrap_or(reported_metrics.accuracy_ci95),
        ),
        provenance: prov(row),
    }];
    headlines.push(Headline {
        id: "probe.best_row".into(),
        label: "residual row of the best probe (0 = embeddings, i = output of block i-1)".into(),
        value: row as f64,
        unit: "row".into(),
        ci95: None,
        provenance: prov(row),
    });
    if let Some(sel) = best.selectivity {
        headlines.push(Headline {
            id: "probe.selectivity".into(),
            label: format!("selectivity at row {row} (CV accuracy minus shuffled-label control)"),
            value: sel,
            unit: "fraction correct".into(),
            ci95: None,
            provenance: prov(row),
        });
    }
    if let Some(r90) = first90 {
        headlines.push(Headline {
            id: "probe.first_row_90".into(),
            label: format!("first residual row where the {eval} accuracy reaches 0.9"),
            value: r90 as f64,
            unit: "row".into(),
            ci95: None,
            provenance: prov(r90),
        });
    }
    let mut negatives = vec![];
    if first90.is_none() {
        negatives.push(format!(
            "No residual row reaches 0.9 {eval} accuracy (best {} at row {row}): the persona is not linearly decodable at that level from the last prompt token.",
            fmt_num(holdout(best))
        ));
    }
    if c.cfg.template_holdout {
        let gap = best.cv.accuracy - holdout(best);
        if gap > 0.05 {
            negatives.push(format!(
                "At row {row} the probe loses {} accuracy on held-out persona paraphrases ({} cross-validated vs {} held-out): part of what it reads is the wording, not the persona.",
                fmt_num(gap), fmt_num(best.cv.accuracy), fmt_num(holdout(best))
            ));
        }
    }
    if let Some(row0) = r.layers.first() {
        if holdout(row0) >= 0.9 {
            negatives.push(format!(
                "Row 0 (the bare token embeddings, no computation) already separates the personas with accuracy {}: high probe accuracy alone is not evidence of an internal user model; the persona words themselves differ.",
                fmt_num(holdout(row0))
            ));
        }
    }
    let layers: Vec<ProbeRow> = r
        .layers
        .iter()
        .map(|l| ProbeRow {
            control: l.control.as_ref().map(|m| m.accuracy),
            cv: l.cv.accuracy,
            evaluate: l.generalization.split_transfer.as_ref().map(|m| m.accuracy),
            held_out: l.template_holdout.as_ref().map(|m| m.accuracy),
            lexical_controls: l
                .generalization
                .lexical_controls
                .as_ref()
                .map(|m| m.accuracy),
            row: l.resid_index,
            select_cv: l.generalization.select_cv.as_ref().map(|m| m.accuracy),
        })
        .collect();
    let claims = probe_claims(&r, best, c.cfg.seed);
    Ok(StepOut {
        step: "probe".into(),
        command: args,
        headlines,
        negatives,
        claims,
        plots: vec![Plot {
            png: "probe/probe_accuracy.png".into(),
            caption: format!("Probe accuracy by residual row ({} vs {}), {} prompts; dashed: train and shuffled-label control; bands: 95 % Wilson intervals.", r.classes[0], r.classes.get(1).cloned().unwrap_or_default(), r.n_prompts),
        }],
        data: step_json(&ProbeData {
            chance: r.chance_accuracy,
            class_counts: r.class_counts.clone(),
            classes: r.classes.clone(),
            dataset_hash: r.dataset_hash.clone(),
            dataset_source: r.dataset_source.clone(),
            direction: DirectionData {
                file: "probe/persona_direction.npy".into(),
                norms: dmeta.diff_of_means_norm,
                resid_row: n / 2,
            },
            layers,
            n_prompts: r.n_prompts,
            n_templates: r.n_templates,
            position: r.position_rule.clone(),
        })?,
        ..Default::default()
    })
}

/// The probe's claims at the row chosen on the selection split, each tested on the evaluation
/// split's prompts (clustered by question): decodable above chance on new questions and new
/// persona paraphrases; better than the bag-of-tokens probe there; and right on the lexical
/// controls more often than the bag of tokens (reads meaning, not key words).
fn probe_claims(
    r: &persona_lens_analysis::probe::ProbeReport,
    best: &persona_lens_analysis::probe::LayerProbe,
    seed: u64,
) -> Vec<Claim> {
    use persona_lens_analysis::claims::{above_chance, clustered_test, paired_differences};
    let row = best.resid_index.unwrap_or(0);
    let (nov, exp) = (
        r.classes.first().cloned().unwrap_or_default(),
        r.classes.get(1).cloned().unwrap_or_default(),
    );
    let g = &best.generalization;
    let bag = r.bag_of_tokens.as_ref().map(|b| &b.generalization);
    let mut claims = vec![];
    let reps = 2000;
    let analysis = format!(
        "probe (probe/probe.json, residual row {row}, position {})",
        r.position_rule
    );
    if let Some(ev) = &g.split_transfer {
        if let Some(t) = clustered_test(&above_chance(&ev.outcomes, r.chance_accuracy), reps, seed)
        {
            claims.push(Claim::from_test(
                "probe.decodable_on_new_questions",
                format!("A linear probe at residual row {row} (chosen on the selection split) reads {nov} vs {exp} on new questions with new persona paraphrases: accuracy {} against chance {}.", fmt_num(ev.accuracy), fmt_num(r.chance_accuracy)),
                &analysis,
                "probe trained on the selection split, tested on the evaluation split; per-prompt correctness minus chance; 95 % interval by bootstrap over questions; one-sided sign-flip permutation of question sums (2000 draws)",
                "accuracy minus chance (fraction of prompts)",
                &t,
            ));
        }
        if let Some(bev) = bag.and_then(|b| b.split_transfer.as_ref()) {
            if let Some(t) =
                clustered_test(&paired_differences(&ev.outcomes, &bev.outcomes), reps, seed)
            {
                claims.push(Claim::from_test(
                    "probe.beats_bag_of_tokens",
                    format!("At residual row {row} the probe reads the persona better than a bag-of-tokens probe on the same new prompts ({} vs {}): more than string matching.", fmt_num(ev.accuracy), fmt_num(bev.accuracy)),
                    &analysis,
                    "paired per-prompt correctness, residual probe minus bag-of-tokens probe, both trained on the selection split and tested on the evaluation split; bootstrap over questions; sign-flip permutation of question sums",
                    "accuracy difference (fraction of prompts)",
                    &t,
                ));
            }
        }
    }
    if let (Some(lc), Some(blc)) = (
        &g.lexical_controls,
        bag.and_then(|b| b.lexical_controls.as_ref()),
    ) {
        if let Some(t) =
            clustered_test(&paired_differences(&lc.outcomes, &blc.outcomes), reps, seed)
        {
            claims.push(Claim::from_test(
                "probe.reads_meaning_not_key_words",
                format!("On lexical controls (prompts that keep the other persona's key words, e.g. \"I'm 5 years into my PhD\") the probe at row {row} is right more often than the bag of tokens ({} vs {}).", fmt_num(lc.accuracy), fmt_num(blc.accuracy)),
                &analysis,
                "probes trained on every plain prompt, tested on the lexical controls only; paired per-prompt correctness, residual minus bag of tokens; clustered by control phrasing (the phrasings repeat over every question): bootstrap over phrasings, sign-flip permutation of phrasing sums",
                "accuracy difference (fraction of prompts)",
                &t,
            ));
        }
    }
    claims
}

fn lens_step(c: &Ctx) -> Result<StepOut> {
    use persona_lens_analysis::claims::{clustered_test, ClusteredTest};
    use persona_lens_analysis::dataset::Split;
    use persona_lens_analysis::lens::{decision_row, paired_effects, paired_readout_gaps};
    let dir = c.dir("lens");
    // The probe step's activations hold every residual row of these prompts: no new forwards.
    let probe_dir = c.dir("probe");
    let la = LensArgs {
        model: c.model_args(),
        // Every topic: the tracked words are generic, and questions are the clusters of the
        // tests.
        data: DatasetArgs {
            split_seed: c.cfg.seed,
            ..c.dataset(None, c.cfg.lens.n_questions_per_pair)
        },
        // The lens reads one token; a persona-mean probe harvest cannot serve it.
        rule: match c.cfg.position {
            PositionRule::PersonaMean => PositionRule::Last,
            rule => rule,
        },
        out: dir.clone(),
        activations: probe_dir
            .join(persona_lens_analysis::harvest::ACTS_FILE)
            .exists()
            .then_some(probe_dir),
        quiet: c.quiet,
        ..spec::defaults()
    };
    let args = c.command("lens", &la);
    let r = run_dataset_lens(c.model, &la, c.quiet)?;
    let ds = la.data.load()?;
    let (nov, exp) = novice_expert(&c.cfg.persona_pair);
    let reps = 2000;
    let min_effect = c.cfg.lens.min_effect;
    // Paired: per (question, paraphrase), expert persona minus novice persona, per row.
    let sel = paired_readout_gaps(&r, &ds, Some(Split::Select));
    let eval = paired_readout_gaps(&r, &ds, Some(Split::Evaluate));
    let sel_fx = paired_effects(&sel, reps, c.cfg.seed);
    let eval_fx = paired_effects(&eval, reps, c.cfg.seed);
    let rows = eval_fx.len();
    if rows == 0 || eval_fx.iter().any(|t| t.is_none()) {
        bail!(
            "lens: the evaluation split has {} novice/expert pairs over fewer than two questions; raise [lens] n_questions_per_pair",
            eval.len()
        );
    }
    let fx = |i: usize| -> ClusteredTest { eval_fx[i].expect("checked above") };
    let last = rows - 1;
    let decision = decision_row(&sel_fx, min_effect);
    let prov = |row: usize, split: &str| {
        c.prov(
            json!({"hook": format!("resid row {row} -> ln_final -> unembed"), "resid_row": row,
            "position": r.position_rule, "dataset_hash": r.dataset_hash, "split": split,
            "n_pairs": if split == "select" { sel.len() } else { eval.len() },
            "file": "lens/lens.json"}),
        )
    };
    let metric = "mean logit of expert words minus simple words (logit lens)";
    let mut headlines = vec![Headline {
        id: "lens.final_gap".into(),
        label: format!(
            "final-row lens readout ({metric}), {exp} minus {nov} persona, paired by question and paraphrase, evaluation split"
        ),
        value: fx(last).effect,
        unit: "logits".into(),
        ci95: Some(fx(last).ci95),
        provenance: prov(last, "evaluate"),
    }];
    let paired_test = "per (question, paraphrase): the expert prompt's readout minus the novice prompt's, evaluation split; one-sided sign-flip test of question sums; 95 % CI by bootstrap over questions";
    let mut claims = vec![Claim::from_test(
        "lens.persona_moves_final_readout",
        format!(
            "At the last residual row the {exp} persona raises the expert-minus-simple word readout above the {nov} persona's on new questions (paired difference {} logits)",
            fmt_num(fx(last).effect)
        ),
        "lens (lens/lens.json)",
        paired_test,
        "mean paired difference of the readout (logits)",
        &fx(last),
    )];
    let mut negatives = vec![];
    match decision {
        Some(d) => {
            headlines.push(Headline {
                id: "lens.decision_row".into(),
                label: format!("first residual row from which the paired persona effect's 95 % lower bound stays above {} logits (chosen on the selection split)", fmt_num(min_effect)),
                value: d as f64,
                unit: "row".into(),
                ci95: None,
                provenance: prov(d, "select"),
            });
            headlines.push(Headline {
                id: "lens.decision_row_effect".into(),
                label: format!(
                    "paired persona effect on the readout at row {d}, evaluation split"
                ),
                value: fx(d).effect,
                unit: "logits".into(),
                ci95: Some(fx(d).ci95),
                provenance: prov(d, "evaluate"),
            });
            // Is the row chosen on one half already past the effect size on the other?
            let excess: Vec<(usize, f64)> =
                eval.iter().map(|(q, v)| (*q, v[d] - min_effect)).collect();
            if let Some(t) = clustered_test(&excess, reps, c.cfg.seed) {
                claims.push(Claim::from_test(
                    "lens.settled_by_decision_row",
                    format!(
                        "By residual row {d} of {last} (chosen on the selection split) the personas' readouts already differ by more than {} logits on new questions (excess {} logits)",
                        fmt_num(min_effect),
                        fmt_num(t.effect)
                    ),
                    "lens (lens/lens.json)",
                    &format!("paired difference at row {d} minus {} logits, evaluation split; one-sided sign-flip test of question sums", fmt_num(min_effect)),
                    "mean paired difference minus the effect size (logits)",
                    &t,
                ));
            }
        }
        None => negatives.push(format!(
            "On the selection split no residual row's paired persona effect stays above {} logits (95 % lower bound) through the last row (final effect {} logits on the evaluation split): no early decision point on the tracked words.",
            fmt_num(min_effect),
            fmt_num(fx(last).effect)
        )),
    }
    if fx(last).effect < 0.0 {
        negatives.push(format!(
            "At the last row the {exp} persona favours the simple words more than the {nov} persona does (paired gap {} logits): the tracked words move against the hypothesis.",
            fmt_num(fx(last).effect)
        ));
    }
    // The paired effect per row, both splits.
    let series = |fxs: &[Option<ClusteredTest>], name: &str, dashed: bool| Series {
        name: name.into(),
        x: (0..fxs.len()).map(|i| i as f64).collect(),
        y: fxs
            .iter()
            .map(|t| t.map_or(f64::NAN, |t| t.effect))
            .collect(),
        band: Some((
            fxs.iter()
                .map(|t| t.map_or(f64::NAN, |t| t.ci95.0))
                .collect(),
            fxs.iter()
                .map(|t| t.map_or(f64::NAN, |t| t.ci95.1))
                .collect(),
        )),
        dashed,
    };
    let mut chart_series = vec![series(
        &eval_fx,
        &format!("evaluation split ({} pairs)", eval.len()),
        false,
    )];
    if sel_fx.iter().all(|t| t.is_some()) && !sel_fx.is_empty() {
        chart_series.push(series(
            &sel_fx,
            &format!("selection split ({} pairs)", sel.len()),
            true,
        ));
    }
    save_line_chart(
        &LineChart {
            title: format!("Paired persona effect on the logit lens, {}", c.cfg.model),
            x_label: "residual row".into(),
            y_label: format!("{exp} minus {nov} readout (logits)"),
            series: chart_series,
            y_range: None,
            hline: Some((min_effect, format!("effect size {}", fmt_num(min_effect)))),
            caption: format!(
                "{}; {metric}; position {}; paired by question and paraphrase; bands: 95 % CI by bootstrap over questions; split seed {}",
                c.cfg.model, r.position_rule, c.cfg.seed
            ),
        },
        &dir.join("paired_effect"),
    )?;
    Ok(StepOut {
        step: "lens".into(),
        command: args,
        headlines,
        negatives,
        claims,
        plots: vec![
            Plot {
                png: "lens/paired_effect.png".into(),
                caption: format!("Logit lens, paired: {exp} minus {nov} persona's readout (expert words minus simple words) per residual row, evaluation split (solid) and selection split (dashed); bands: 95 % CI by bootstrap over questions; line: the decision row's effect size."),
            },
            Plot {
                png: "lens/logit_diff.png".into(),
                caption: format!("Logit lens: mean logit of expert words minus simple words at the last prompt token, by residual row, per persona ({} prompts, both splits); bands: 95 % CI over prompts.", r.prompts.len()),
            },
        ],
        data: step_json(&LensData {
            decision_row: decision,
            expert_words: r.expert_words.iter().map(|w| w.word.clone()).collect(),
            metric: r.metric.clone(),
            min_effect,
            n_pairs: SplitCounts {
                evaluate: eval.len(),
                select: sel.len(),
            },
            paired_effect_evaluate: eval_fx
                .iter()
                .map(|t| {
                    t.map(|t| RowEffect {
                        ci95: t.ci95,
                        effect: t.effect,
                        p: Some(t.p_value),
                    })
                })
                .collect(),
            paired_effect_select: sel_fx
                .iter()
                .map(|t| {
                    t.map(|t| RowEffect {
                        ci95: t.ci95,
                        effect: t.effect,
                        p: None,
                    })
                })
                .collect(),
            personas: r
                .personas
                .iter()
                .map(|p| LensPersona {
                    logit_diff_mean: p.logit_diff_mean.clone(),
                    n: p.n_prompts,
                    persona: p.persona.clone(),
                })
                .collect(),
            prompts_from_probe_activations: r.prompts_from_cache,
            simple_words: r.simple_words.iter().map(|w| w.word.clone()).collect(),
            warnings: r.warnings.clone(),
        })?,
        ..Default::default()
    })
}

fn patch_step(c: &Ctx) -> Result<StepOut> {
    let dir = c.dir("patch");
    let p = &c.cfg.patch;
    let pa = PatchArgs {
        model: c.model_args(),
        pair: PairArgs {
            clean: Some(p.clean.clone()),
            corrupted: Some(p.corrupted.clone()),
            answer_a: Some(p.answer_a.clone()),
            answer_b: Some(p.answer_b.clone()),
            ..spec::defaults()
        },
        sweep: p.sweeps.clone(),
        out: dir.clone(),
        quiet: c.quiet,
        ..spec::defaults()
    };
    let args = c.command("patch", &pa);
    let (out, _files) = patch_with(c.model, &pa)?;
    write_json(&dir.join("patching.json"), &out)?;
    let (clean, corrupted) = (out.clean_metric as f64, out.corrupted_metric as f64);
    let prov = |hook: &str, extra: Value| {
        let v = c.prov(json!({"hook": hook, "position": "last", "clean": p.clean, "corrupted": p.corrupted,
            "metric": format!("logit[{}] - logit[{}]", p.answer_a, p.answer_b), "file": "patch/patching.json"}));
        merged(v, &extra)
    };
    let mut headlines = vec![Headline {
        id: "patch.clean_minus_corrupted".into(),
        label: format!(
            "logit difference '{}' minus '{}', clean ({}) minus corrupted prompt",
            p.answer_a, p.answer_b, "novice"
        ),
        value: clean - corrupted,
        unit: "logits".into(),
        ci95: None,
        provenance: prov("logits", json!({})),
    }];
    let mut negatives = vec![];
    let mut plots = vec![];
    let mut data = PatchData {
        best_head_z_last: None,
        clean_metric: clean,
        corrupted_metric: corrupted,
        differing_positions: out.differing_positions.clone(),
        resid_pre_last_position: None,
    };
    if (clean - corrupted).abs() < 0.1 {
        negatives.push(format!(
            "The persona swap barely moves the metric (clean {} vs corrupted {} logits): patching effects on this pair are measured against a gap of {} logits and are noisy.",
            fmt_num(clean), fmt_num(corrupted), fmt_num(clean - corrupted)
        ));
    }
    for (name, sw) in &out.sweeps {
        plots.push(Plot {
            png: format!("patch/{name}.png"),
            caption: format!("Activation patching {name}: normalised restoration (1 = clean behaviour, 0 = corrupted) of the logit difference, clean run into corrupted."),
        });
        let norm = &sw.normalized;
        if norm.is_empty() {
            continue;
        }
        let kind = sw.sweep.as_str();
        if kind == "resid_pre" {
            // Last position: from which layer does patching the residual restore most of it?
            let lastcol: Vec<f32> = norm
                .iter()
                .map(|r| *r.last().unwrap_or(&f32::NAN))
                .collect();
            let half = lastcol.iter().position(|&v| v >= 0.5);
            data.resid_pre_last_position = Some(lastcol);
            match half {
                Some(l) => headlines.push(Headline {
                    id: "patch.resid_last_half_layer".into(),
                    label: "first layer whose resid_pre at the last position restores at least half of the clean behaviour".into(),
                    value: l as f64,
                    unit: "layer".into(),
                    ci95: None,
                    provenance: prov("blocks.{layer}.hook_resid_pre", json!({"layer": l})),
                }),
                None => negatives.push("Patching the last position's residual stream never restores half of the clean behaviour at any layer: the persona information reaches the output by another route or the metric is not persona-driven.".into()),
            }
        }
        if kind == "z_last" {
            let mut best = (0usize, 0usize, f64::NEG_INFINITY);
            for (l, row) in norm.iter().enumerate() {
                for (h, &v) in row.iter().enumerate() {
                    if v.is_finite() && v as f64 > best.2 {
                        best = (l, h, v as f64);
                    }
                }
            }
            if best.2.is_finite() {
                headlines.push(Headline {
                    id: "patch.best_head_z_last".into(),
                    label: format!("largest single-head restoration (attn.hook_z at the last position), head L{}H{}", best.0, best.1),
                    value: best.2,
                    unit: "fraction restored".into(),
                    ci95: None,
                    provenance: prov("blocks.{layer}.attn.hook_z", json!({"layer": best.0, "head": best.1})),
                });
                data.best_head_z_last = Some(BestHead {
                    head: best.1,
                    layer: best.0,
                    restored: best.2,
                });
                if best.2 < 0.1 {
                    negatives.push(format!(
                        "No single head's output at the last position restores more than {} of the behaviour: the effect is spread over many heads (no sparse circuit on this pair).",
                        fmt_num(best.2)
                    ));
                }
            }
        }
    }
    Ok(StepOut {
        step: "patch".into(),
        command: args,
        headlines,
        negatives,
        plots,
        data: step_json(&data)?,
        ..Default::default()
    })
}

fn heads_step(c: &Ctx) -> Result<StepOut> {
    let dir = c.dir("heads");
    let h = &c.cfg.heads;
    // Heads are ranked on the selection split; the ablate step tests them on the other.
    let mut ha = HeadsArgs {
        model: c.model_args(),
        data: DatasetArgs {
            split_seed: c.cfg.seed,
            split: Some(persona_lens_analysis::dataset::Split::Select),
            ..c.dataset(Some(&c.cfg.pair_id), h.n_questions_per_pair)
        },
        top: h.top,
        min_gap: h.min_gap as f32,
        out: dir.clone(),
        quiet: c.quiet,
        ..spec::defaults()
    };
    // One answer pair for the topic, chosen on the selection pairs, absent from every prompt;
    // the ablate step reuses it on the evaluation pairs.
    let sel_pairs = persona_lens_analysis::heads::dataset_pairs(&ha.data.load()?);
    let words = |base: &[&str], extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|w| w.to_string()).collect()
    };
    use persona_lens_analysis::patching::{SIMPLE_ANSWERS, TECHNICAL_ANSWERS};
    let (answer_a, answer_b, answer_gap) = persona_lens_analysis::heads::choose_answers(
        c.model,
        &sel_pairs,
        ha.data.chat(c.model),
        &words(SIMPLE_ANSWERS, &["Imagine", "Hey", "Sure", "Wow"]),
        &words(TECHNICAL_ANSWERS, &["The", "In", "technical"]),
    )?;
    std::fs::create_dir_all(&dir)?;
    write_json(
        &dir.join("answers.json"),
        &AnswerChoice {
            answer_a: answer_a.clone(),
            answer_b: answer_b.clone(),
            mean_persona_gap: Some(answer_gap),
            n_pairs: sel_pairs.len(),
            rule: "single-token words absent from every prompt of the selection pairs, maximising the mean novice-minus-expert logit difference".into(),
            split: "select".into(),
        },
    )?;
    ha.answer_a = Some(answer_a.clone());
    ha.answer_b = Some(answer_b.clone());
    let args = c.command("heads", &ha);
    let out = heads_with(c.model, &ha, false)?;
    let ranking = &out.ranking;
    // (layer, head, pooled score, 95 % CI of the mean per-pair ratio)
    let top: Vec<(usize, usize, f64, f64, f64)> = ranking
        .heads
        .iter()
        .take(h.top)
        .map(|x| (x.head.layer, x.head.head, x.pooled, x.ci95.0, x.ci95.1))
        .collect();
    let n_pairs = ranking.n_pairs;
    let roles = persona_lens_analysis::heads::head_roles(
        c.model,
        &c.cfg.persona_pair,
        &c.cfg.pair_id,
        &ranking
            .heads
            .iter()
            .take(h.top)
            .map(|x| x.head)
            .collect::<Vec<_>>(),
    )?;
    let mut headlines = vec![];
    let mut negatives = vec![];
    if let Some(&(l, hh, m, lo, hi)) = top.first() {
        headlines.push(Headline {
            id: "heads.top_score".into(),
            label: format!("pooled z-patching score (sum of effects over sum of gaps) of the top persona-mover head L{l}H{hh} over {n_pairs} selection-split pairs"),
            value: m,
            unit: "fraction restored".into(),
            ci95: None,
            provenance: c.prov(json!({"hook": format!("blocks.{l}.attn.hook_z"), "layer": l, "head": hh,
                "split": "select", "mean_ratio_ci95": [lo, hi], "answers": [answer_a, answer_b],
                "position": "all (suffix-aligned)", "topic": c.cfg.pair_id, "n_pairs": n_pairs, "file": "heads/heads.json"})),
        });
        if lo <= 0.0 {
            negatives.push(format!(
                "Even the top head L{l}H{hh}'s per-pair restoration ratios have a 95 % interval that includes zero ({} to {}): over {n_pairs} pairs no head is a reliable persona mover.",
                fmt_num(lo), fmt_num(hi)
            ));
        }
    }
    if n_pairs == 0 {
        negatives.push("No prompt pair had a large enough persona gap for head ranking.".into());
    }
    let circuit: Vec<CircuitHead> = top
        .iter()
        .zip(roles.iter().map(Some).chain(std::iter::repeat(None)))
        .map(|(&(l, hh, m, lo, hi), r)| CircuitHead {
            head: format!("L{l}H{hh}"),
            mean_ratio_ci95: (lo, hi),
            persona_attention: r.map(|r| r.persona_attention),
            role: r.map_or("(no persona span to inspect)".into(), |r| r.role.clone()),
            score: m,
        })
        .collect();
    Ok(StepOut {
        step: "heads".into(),
        command: args,
        headlines,
        negatives,
        plots: vec![Plot {
            png: "heads/heads.png".into(),
            caption: format!("Persona-mover heads: pooled z-patching score per head (sum of effects over sum of gaps) over {n_pairs} {} selection-split pairs (novice into expert prompt).", c.cfg.pair_id),
        }],
        data: step_json(&HeadsData {
            answers: (answer_a, answer_b),
            answers_mean_gap_select: answer_gap,
            circuit,
            n_pairs,
            n_skipped: ranking.n_skipped,
            roles,
            top: out.top.clone(),
        })?,
        ..Default::default()
    })
}

fn ablate_step(c: &Ctx) -> Result<StepOut> {
    let dir = c.dir("ablate");
    let heads_json = c.dir("heads").join("heads.json");
    if !heads_json.exists() {
        bail!(
            "the ablate step needs {} from the heads step; run --experiment heads,ablate (or all)",
            heads_json.display()
        );
    }
    let a = &c.cfg.ablate;
    // The answer words the heads were ranked with (chosen on the selection split).
    let answers_file = c.dir("heads").join("answers.json");
    let answers: AnswerChoice = serde_json::from_str(
        &std::fs::read_to_string(&answers_file)
            .context("the ablate step needs heads/answers.json; re-run the heads step")?,
    )
    .with_context(|| {
        format!(
            "{} is damaged; re-run the heads step",
            answers_file.display()
        )
    })?;
    let aa = AblateArgs {
        model: c.model_args(),
        data: DatasetArgs {
            split_seed: c.cfg.seed,
            split: Some(persona_lens_analysis::dataset::Split::Evaluate),
            ..c.dataset(Some(&c.cfg.pair_id), c.cfg.heads.n_questions_per_pair)
        },
        from: heads_json,
        mode: a.modes.clone(),
        n_random: a.n_random,
        n_random_primary: Some(a.n_random_test.max(a.n_random)),
        seed: c.cfg.seed,
        n_generate: a.n_generate,
        gen_tokens: a.gen_tokens,
        answer_a: Some(answers.answer_a),
        answer_b: Some(answers.answer_b),
        out: dir.clone(),
        quiet: c.quiet,
        ..spec::defaults()
    };
    let args = c.command("ablate", &aa);
    let out = ablate_with(c.model, &aa, false)?;
    let heads = join(&out.heads);
    let base_gap = out.baseline().gap_mean;
    let mut headlines = vec![Headline {
        id: "ablate.baseline_gap".into(),
        label: "persona gap without ablation: metric(novice) minus metric(expert)".into(),
        value: base_gap,
        unit: "logits".into(),
        ci95: None,
        provenance: c.prov(
            json!({"position": "last", "topic": c.cfg.pair_id, "file": "ablate/ablate.json"}),
        ),
    }];
    let mut negatives = vec![];
    let mut claims = vec![];
    let mut bars = vec![];
    for m in &out.summary {
        let mode = m.mode.name().to_string();
        let Some(top) = m.top_gap_change else {
            negatives.push(format!(
                "{mode}-ablation: no change of the persona gap was measured for the top heads (no pair to measure it on), so the mode is not reported."
            ));
            continue;
        };
        let (rmin, rmax) = (m.random_gap_change_min, m.random_gap_change_max);
        headlines.push(Headline {
            id: format!("ablate.{mode}.top_gap_change"),
            label: format!("change of the persona gap when the top heads ({heads}) are {mode}-ablated"),
            value: top,
            unit: "logits".into(),
            ci95: None,
            provenance: c.prov(json!({"hook": "blocks.{layer}.attn.hook_z", "heads": heads, "mode": mode, "topic": c.cfg.pair_id, "file": "ablate/ablate.json"})),
        });
        headlines.push(Headline {
            id: format!("ablate.{mode}.random_gap_change"),
            label: format!(
                "mean change of the persona gap for random head sets of the same size ({mode})"
            ),
            value: m.random_gap_change_mean,
            unit: "logits".into(),
            ci95: Some(m.random_gap_change_ci95),
            provenance: c
                .prov(json!({"mode": mode, "n_random": a.n_random, "file": "ablate/ablate.json"})),
        });
        bars.push(Bar {
            label: format!("top heads, {mode}"),
            value: top,
            err: None,
            group: 0,
        });
        bars.push(Bar {
            label: format!("random heads, {mode}"),
            value: m.random_gap_change_mean,
            err: None,
            group: 0,
        });
        let random_changes = &m.random_gap_changes;
        // Only the first mode is tested (the others are correlated re-measurements of the
        // same heads, described beside it).
        if let (Some(p), true) = (
            m.rank_p_value,
            top.is_finite() && random_changes.len() >= 2 && a.modes.first() == Some(&m.mode),
        ) {
            let (rm, lo, hi) = persona_lens_analysis::stats::mean_ci95(random_changes);
            claims.push(Claim {
                id: format!("ablate.{mode}.top_heads_beat_random"),
                statement: format!(
                    "{mode}-ablating the top heads ({heads}, ranked on the selection split) closes the persona gap on the evaluation split more than random head sets of the same size: {} vs {} logits on average.",
                    fmt_num(top), fmt_num(rm)
                ),
                analysis: "ablate (ablate/ablate.json)".into(),
                test: format!(
                    "rank of the top heads' gap change among {} random head sets of the same size (never containing a top head); one-sided p = (1 + #sets closing the gap at least as much) / (1 + n); interval: t interval of the random sets' mean, minus the top change",
                    random_changes.len()
                ),
                statistic: "mean random-set gap change minus top-heads gap change (logits)".into(),
                effect: rm - top,
                ci95: (lo - top, hi - top),
                p_value: p,
                p_adjusted: p,
                supported: false,
                n_clusters: out.n_pairs,
                conditions: vec![],
            });
        }
        if top.is_finite() && top >= rmin && top <= rmax {
            negatives.push(format!(
                "{mode}-ablating the top heads ({heads}) changes the persona gap by {} logits, inside the range of random head sets ({} to {}; rank p = {}): by this measure these heads are not set apart from random ones.",
                fmt_num(top), fmt_num(rmin), fmt_num(rmax), m.rank_p_value.map_or("n/a".into(), fmt_p)
            ));
        } else if top.is_finite() && top > 0.0 {
            negatives.push(format!(
                "{mode}-ablating the top heads ({heads}) widens the persona gap ({} logits) instead of closing it: the heads do not carry the persona signal the way the patching score suggests.",
                fmt_num(top)
            ));
        }
    }
    std::fs::create_dir_all(&dir)?;
    save_bar_chart(
        &BarChart {
            title: format!("Persona gap change on ablation, {}", c.cfg.model),
            x_label: "change of the persona gap (logits)".into(),
            bars,
            groups: vec![],
            caption: format!("top heads {heads} vs random head sets (mean of {}); baseline gap {} logits; seed {}", a.n_random, fmt_num(base_gap), c.cfg.seed),
        },
        &dir.join("gap_change"),
    )?;
    Ok(StepOut {
        step: "ablate".into(),
        command: args,
        headlines,
        negatives,
        plots: vec![Plot {
            png: "ablate/gap_change.png".into(),
            caption: "Change of the persona gap when the top heads are ablated, against random head sets of the same size (negative = the gap closes).".into(),
        }],
        claims,
        data: step_json(&AblateData {
            baseline_gap: base_gap,
            grade_gap: out.baseline().grade_gap,
            heads,
            summary: out.summary.clone(),
        })?,
        ..Default::default()
    })
}

fn steer_step(c: &Ctx) -> Result<StepOut> {
    use persona_lens_analysis::claims::clustered_test;
    use persona_lens_analysis::stats::rank_p_value;
    use persona_lens_analysis::steering::{
        load_direction, mean_resid_norm, scale_direction, steer_against_random, SteerPositions,
    };
    let dir = c.dir("steer");
    let directions = c.dir("probe").join("directions.safetensors");
    if !directions.exists() {
        // Steering alone: compute the directions first (the probe step's harvest).
        persona_directions(c)?;
    }
    let st = &c.cfg.steer;
    let n = c.model.config().n_layers;
    let layers = if st.layers.is_empty() {
        let mut v = vec![n / 3, n / 2];
        v.dedup();
        v
    } else {
        st.layers.clone()
    };
    use persona_lens_analysis::dataset::Split;
    let data = |split: Split| DatasetArgs {
        split_seed: c.cfg.seed,
        split: Some(split),
        ..c.dataset(None, c.cfg.n_questions_per_pair)
    };
    // 1. The dose-response sweep on the selection split: it chooses the layer and alpha.
    let sa = {
        let mut sa: SteerSweepArgs = steer_defaults(&layers)?;
        sa.model = c.model_args();
        sa.data = data(Split::Select);
        sa.steer.direction = directions.clone();
        sa.steer.alpha = st.alphas.clone();
        sa.steer.kind = st.kind;
        sa.steer.norm = st.norm;
        sa.gen.n_prompts = st.n_prompts;
        sa.gen.max_new_tokens = st.max_new_tokens;
        sa.gen.sampling.seed = c.cfg.seed;
        sa.rate.bootstrap = st.bootstrap;
        sa.rate.rate_seed = c.cfg.seed;
        sa.out = dir.clone();
        sa.quiet = c.quiet;
        sa
    };
    let args = c.command("steer-sweep", &sa);
    let out = steer_sweep_with(c.model, &sa, false)?;
    let measure = |layer: usize, alpha: f64, key: &str| out.measure(layer, alpha, key);
    let a0 = st.alphas.iter().cloned().fold(f64::INFINITY, f64::min);
    let mut headlines = vec![];
    let mut negatives = vec![];
    // The fluent cell with the largest grade change (selection split).
    let mut best: Option<(usize, f64, f64, f64)> = None; // layer, alpha, grade change, ppl ratio
    let mut least_broken: Option<(usize, f64, f64, f64)> = None;
    for &l in &layers {
        let (Some(g0), Some(p0)) = (
            measure(l, a0, "flesch_kincaid_grade"),
            measure(l, a0, "perplexity"),
        ) else {
            continue;
        };
        for &a in st.alphas.iter().filter(|&&a| a > a0 && a > 0.0) {
            let (Some(g), Some(p)) = (
                measure(l, a, "flesch_kincaid_grade"),
                measure(l, a, "perplexity"),
            ) else {
                continue;
            };
            let cell = (l, a, g.0 - g0.0, p.0 / p0.0);
            if cell.3 <= st.max_perplexity_ratio {
                if best.is_none_or(|b| cell.2 > b.2) {
                    best = Some(cell);
                }
            } else if least_broken.is_none_or(|b| cell.3 < b.3) {
                least_broken = Some(cell);
            }
        }
    }
    let chosen = match (best, least_broken) {
        (Some(b), _) => b,
        (None, Some(b)) => {
            negatives.push(format!(
                "No steering cell of the selection sweep keeps the answers' perplexity within {}x of the unsteered answers'; the least broken one (layer {}, alpha {}, {}x) is evaluated.",
                fmt_num(st.max_perplexity_ratio), b.0, fmt_num(b.1), fmt_num(b.3)
            ));
            b
        }
        (None, None) => bail!(
            "steer: the sweep needs alpha {} and at least one larger alpha with scored answers; check [steer] alphas",
            fmt_num(a0)
        ),
    };
    let (layer, alpha, sel_change, sel_ppl) = chosen;
    let sweep_prov = c.prov(json!({"hook": format!("blocks.{layer}.hook_resid_post"), "layer": layer,
        "alpha": alpha, "split": "select", "n_prompts": st.n_prompts, "file": "steer/steer_sweep.json"}));
    headlines.push(Headline {
        id: "steer.select.grade_change".into(),
        label: format!("Flesch-Kincaid grade change of novice-prompt answers at the chosen cell (layer {layer}, alpha {}), selection split", fmt_num(alpha)),
        value: sel_change,
        unit: "US grade levels".into(),
        ci95: None,
        provenance: merged(sweep_prov.clone(), &json!({"perplexity_ratio": sel_ppl})),
    });

    // 2. The chosen cell on new prompts (evaluation split), beside random directions.
    let ea = {
        let mut ea: SteerArgs = steer_defaults(&[layer])?;
        ea.model = c.model_args();
        ea.data = data(Split::Evaluate);
        ea.gen.n_prompts = st.n_eval_prompts;
        ea.gen.max_new_tokens = st.max_new_tokens;
        ea
    };
    let chat = ea.data.chat(c.model);
    let novice = crate::steer_jobs::steer_prompts(&ea.data, &ea.gen)?;
    let mut expert_gen = ea.gen.clone();
    expert_gen.persona = "expert".into();
    let expert = crate::steer_jobs::steer_prompts(&ea.data, &expert_gen)?;
    let encode = |ps: &[persona_lens_analysis::steering::SteerPrompt]| -> Result<Vec<Vec<u32>>> {
        Ok(ps
            .iter()
            .map(|p| c.model.encode_prompt(&p.text, chat))
            .collect::<std::result::Result<_, _>>()?)
    };
    let (nov_ids, exp_ids) = (encode(&novice)?, encode(&expert)?);
    let d = load_direction(
        &directions,
        Some(persona_lens_analysis::direction::LayerRef::BlockOutput(
            layer,
        )),
        st.kind,
        n,
    )?;
    let mrn = mean_resid_norm(c.model, &nov_ids, d.hook)?;
    let v: Vec<f32> = scale_direction(&d.vector, st.norm, Some(mrn))?
        .iter()
        .map(|x| (*x as f64 * alpha) as f32)
        .collect();
    let opts = crate::steer_jobs::gen_options(c.model, &ea.gen);
    let total = (nov_ids.len() * (2 + st.n_random) + exp_ids.len() * 2) as u64;
    let pb = crate::engine_jobs::progress(total, c.quiet, "evaluation answers");
    let toward_expert = steer_against_random(
        c.model,
        &nov_ids,
        d.hook,
        &v,
        SteerPositions::All,
        st.n_random,
        c.cfg.seed,
        &opts,
        8,
        &|k| pb.inc(k as u64),
    )?;
    let minus: Vec<f32> = v.iter().map(|x| -x).collect();
    let toward_novice = steer_against_random(
        c.model,
        &exp_ids,
        d.hook,
        &minus,
        SteerPositions::All,
        0,
        c.cfg.seed,
        &opts,
        8,
        &|k| pb.inc(k as u64),
    )?;
    pb.finish_and_clear();
    let reps = 2000;
    let eval_prov = c.prov(
        json!({"hook": d.hook.to_string(), "layer": layer, "alpha": alpha,
        "direction": "probe/directions.safetensors", "kind": st.kind, "norm": st.norm,
        "split": "evaluate", "n_prompts": nov_ids.len(), "n_random": st.n_random,
        "max_new_tokens": st.max_new_tokens, "file": "steer/evaluation.json"}),
    );
    let mut claims = vec![];
    let shifts = toward_expert.grade_shifts();
    let randoms = toward_expert.random_mean_shifts();
    let mut sorted = randoms.clone();
    sorted.sort_by(f64::total_cmp);
    let q = |p: f64| -> f64 {
        if sorted.is_empty() {
            f64::NAN
        } else {
            sorted[((sorted.len() - 1) as f64 * p).round() as usize]
        }
    };
    let random_median = q(0.5);
    if let Some(t) = clustered_test(&shifts, reps, c.cfg.seed) {
        headlines.push(Headline {
            id: "steer.eval.grade_change".into(),
            label: format!("Flesch-Kincaid grade change of answers to new novice prompts steered toward {} (layer {layer}, alpha {}), evaluation split", novice_expert(&c.cfg.persona_pair).1, fmt_num(alpha)),
            value: t.effect,
            unit: "US grade levels".into(),
            ci95: Some(t.ci95),
            provenance: eval_prov.clone(),
        });
        claims.push(Claim::from_test(
            "steer.raises_grade_on_new_prompts",
            format!("Steering along the persona direction (layer {layer}, alpha {}, chosen on the selection split) raises the reading grade of answers to new novice prompts (by {} grade levels)", fmt_num(alpha), fmt_num(t.effect)),
            "steer (steer/evaluation.json)",
            "per prompt: steered minus unsteered Flesch-Kincaid grade of greedy answers, evaluation split, one question per prompt; one-sided sign-flip test; 95 % CI by bootstrap over questions",
            "mean grade change (US grade levels)",
            &t,
        ));
        if !randoms.is_empty() {
            let p = rank_p_value(t.effect, &randoms);
            headlines.push(Headline {
                id: "steer.eval.random_grade_change".into(),
                label: format!("median grade change under {} norm-matched random directions (same prompts, layer, norm); interval: their 2.5-97.5 % range", randoms.len()),
                value: random_median,
                unit: "US grade levels".into(),
                ci95: Some((q(0.025), q(0.975))),
                provenance: eval_prov.clone(),
            });
            claims.push(Claim {
                id: "steer.beats_random_directions".into(),
                statement: format!("The persona direction raises the answers' grade more than random directions of the same norm do ({} vs a median {} grade levels over {} random directions)", fmt_num(t.effect), fmt_num(random_median), randoms.len()),
                analysis: "steer (steer/evaluation.json)".into(),
                test: format!("rank of the persona direction's mean grade change among {} norm-matched Gaussian random directions on the same evaluation prompts: p = (1 + #random >= observed) / (1 + n)", randoms.len()),
                statistic: "mean grade change minus the random directions' median (US grade levels); CI: the persona direction's clustered CI minus that median".into(),
                effect: t.effect - random_median,
                ci95: (t.ci95.0 - random_median, t.ci95.1 - random_median),
                p_value: p,
                p_adjusted: p,
                supported: false,
                n_clusters: t.n_clusters,
                conditions: vec![],
            });
        }
    } else {
        negatives.push(format!("Steering could not be evaluated: fewer than two evaluation prompts had gradable answers ({} prompts, {} new tokens).", nov_ids.len(), st.max_new_tokens));
    }
    let lowered: Vec<(usize, f64)> = toward_novice
        .grade_shifts()
        .into_iter()
        .map(|(i, x)| (i, -x))
        .collect();
    if let Some(t) = clustered_test(&lowered, reps, c.cfg.seed) {
        headlines.push(Headline {
            id: "steer.eval.toward_novice_grade_drop".into(),
            label: format!("Flesch-Kincaid grade drop of answers to new expert prompts steered toward {} (minus the same vector), evaluation split", novice_expert(&c.cfg.persona_pair).0),
            value: t.effect,
            unit: "US grade levels".into(),
            ci95: Some(t.ci95),
            provenance: eval_prov.clone(),
        });
        claims.push(Claim::from_test(
            "steer.toward_novice_lowers_grade",
            format!("Steering the other way (minus the same vector) lowers the reading grade of answers to new expert prompts (by {} grade levels)", fmt_num(t.effect)),
            "steer (steer/evaluation.json)",
            "per prompt: unsteered minus steered Flesch-Kincaid grade of greedy answers to expert prompts, evaluation split; one-sided sign-flip test; 95 % CI by bootstrap over questions",
            "mean grade drop (US grade levels)",
            &t,
        ));
    }
    // Directional ablation beside random-direction ablation: the readout gap between the new
    // expert and novice prompts with the persona direction projected out at the chosen layer.
    let word_ids = |ws: &[&str]| -> Result<Vec<u32>> {
        let list: Vec<String> = ws.iter().map(|w| w.to_string()).collect();
        Ok(
            persona_lens_analysis::lens::resolve_words(c.model, &list, false)?
                .0
                .iter()
                .map(|w| w.token_id)
                .collect(),
        )
    };
    let (ew, sw) = (
        word_ids(persona_lens_analysis::lens::DEFAULT_EXPERT_WORDS)?,
        word_ids(persona_lens_analysis::lens::DEFAULT_SIMPLE_WORDS)?,
    );
    let abl = persona_lens_analysis::steering::ablation_against_random(
        c.model,
        &exp_ids,
        &nov_ids,
        d.hook,
        &d.vector,
        st.n_random,
        c.cfg.seed ^ 0xab1a,
        (&ew, &sw),
    )?;
    let question = |id: &str| id.rsplitn(3, '/').nth(2).unwrap_or(id).to_string();
    let mut qidx: std::collections::BTreeMap<String, usize> = Default::default();
    let abl_diffs: Vec<(usize, f64)> = expert
        .iter()
        .chain(&novice)
        .zip(&abl.reductions)
        .map(|(p, r)| {
            let next = qidx.len();
            (*qidx.entry(question(&p.id)).or_insert(next), *r)
        })
        .collect();
    if let (Some(t), false) = (
        clustered_test(&abl_diffs, reps, c.cfg.seed),
        abl.random_means.is_empty(),
    ) {
        let mut rs = abl.random_means.clone();
        rs.sort_by(f64::total_cmp);
        let med = rs[(rs.len() - 1) / 2];
        headlines.push(Headline {
            id: "steer.eval.ablation_gap_reduction".into(),
            label: format!("shrinkage of the expert-minus-novice readout gap ({} logits intact) when the persona direction is projected out at layer {layer}, per prompt, evaluation split", fmt_num(abl.gap_intact)),
            value: t.effect,
            unit: "logits".into(),
            ci95: Some(t.ci95),
            provenance: merged(eval_prov.clone(), &json!({"random_median": med, "metric": "mean logit of expert words minus simple words at the last position"})),
        });
        let p = rank_p_value(t.effect, &abl.random_means);
        claims.push(Claim {
            id: "steer.ablating_direction_shrinks_persona_gap".into(),
            statement: format!("Projecting the persona direction out at layer {layer} shrinks the expert-minus-novice gap of the answer-word readout more than projecting out random directions does ({} vs a median {} logits over {} random directions)", fmt_num(t.effect), fmt_num(med), abl.random_means.len()),
            analysis: "steer (steer/evaluation.json)".into(),
            test: format!("per new prompt (evaluation split): the readout's move toward the other persona when the direction is projected out at every position; rank of its mean among {} random unit directions: p = (1 + #random >= observed) / (1 + n)", abl.random_means.len()),
            statistic: "mean gap reduction minus the random directions' median (logits); CI: clustered bootstrap over questions minus that median".into(),
            effect: t.effect - med,
            ci95: (t.ci95.0 - med, t.ci95.1 - med),
            p_value: p,
            p_adjusted: p,
            supported: false,
            n_clusters: t.n_clusters,
            conditions: vec![],
        });
    }
    let mean_ppl = |a: &[persona_lens_analysis::steering::ScoredAnswer]| {
        let v: Vec<f64> = a.iter().filter_map(|x| x.perplexity).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let ratio = mean_ppl(&toward_expert.steered) / mean_ppl(&toward_expert.unsteered);
    headlines.push(Headline {
        id: "steer.eval.perplexity_ratio".into(),
        label: "mean perplexity of the steered answers over the unsteered answers' (unsteered model), evaluation split".into(),
        value: ratio,
        unit: "ratio".into(),
        ci95: None,
        provenance: eval_prov.clone(),
    });
    if ratio > st.max_perplexity_ratio {
        negatives.push(format!(
            "On the evaluation prompts the steered answers' perplexity is {}x the unsteered answers': the grade change comes with broken text.",
            fmt_num(ratio)
        ));
    }
    persona_lens_analysis::write_json(
        &dir.join("evaluation.json"),
        &json!({"layer": layer, "alpha": alpha, "hook": d.hook.to_string(), "split": "evaluate",
            "novice_prompts": novice.iter().map(|p| &p.id).collect::<Vec<_>>(),
            "expert_prompts": expert.iter().map(|p| &p.id).collect::<Vec<_>>(),
            "toward_expert": toward_expert, "toward_novice": toward_novice,
            "random_mean_shifts": randoms,
            "directional_ablation": {"gap_intact": abl.gap_intact, "reductions": abl.reductions,
                "random_means": abl.random_means}}),
    )?;
    // The persona direction among the random ones.
    let mut bars = vec![Bar {
        label: "persona direction".into(),
        value: shifts.iter().map(|x| x.1).sum::<f64>() / shifts.len().max(1) as f64,
        err: None,
        group: 0,
    }];
    let mut ranked: Vec<(usize, f64)> = randoms.iter().cloned().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    bars.extend(ranked.iter().map(|(i, v)| Bar {
        label: format!("random {}", i + 1),
        value: *v,
        err: None,
        group: 1,
    }));
    save_bar_chart(
        &BarChart {
            title: format!("Grade change: persona direction vs random directions, {}", c.cfg.model),
            x_label: "mean Flesch-Kincaid grade change of answers (US grade levels)".into(),
            bars,
            groups: vec!["persona direction".into(), "norm-matched random".into()],
            caption: format!(
                "{}; {} at alpha {} (norm {}); {} new novice prompts (evaluation split); greedy, {} new tokens; seed {}",
                c.cfg.model, d.hook, fmt_num(alpha), fmt_num(toward_expert.norm), nov_ids.len(), st.max_new_tokens, c.cfg.seed
            ),
        },
        &dir.join("vs_random"),
    )?;
    Ok(StepOut {
        step: "steer".into(),
        command: args,
        headlines,
        negatives,
        claims,
        plots: vec![
            Plot { png: "steer/vs_random.png".into(), caption: "Steering on new prompts: the persona direction's mean grade change of answers beside norm-matched random directions (evaluation split).".into() },
            Plot { png: "steer/dose_response_grade.png".into(), caption: "Selection sweep: Flesch-Kincaid grade of greedy answers to novice prompts against steering alpha, one line per layer (selection split); bands: bootstrap 95 % CI.".into() },
            Plot { png: "steer/dose_response_fluency.png".into(), caption: "Selection sweep: perplexity of the steered answers under the unsteered model against alpha.".into() },
        ],
        data: step_json(&SteerData {
            alphas: st.alphas.clone(),
            cells: out.cells.clone(),
            chosen: ChosenCell {
                alpha,
                layer,
                select_grade_change: sel_change,
                select_perplexity_ratio: sel_ppl,
            },
            evaluation_command: c.command("steer", &ea),
            layers,
        })?,
        ..Default::default()
    })
}

fn diff_step(c: &Ctx) -> Result<StepOut> {
    use persona_lens_diffing::analyze::{analyze as run_analyze, AnalyzeSpec};
    use persona_lens_diffing::harvest::harvest_paired;
    use persona_lens_diffing::paired::{Alignment, PairedStore};
    use persona_lens_diffing::train::train as run_train;
    let dir = c.dir("diff");
    let d = &c.cfg.diff;
    // The study's model is one side. The other is its registry twin (the same model on the other
    // side of chat tuning) when that loads here; otherwise the configured partner, and the run is
    // exploratory.
    let study_is_chat = c.model.is_chat_model();
    let configured = if study_is_chat {
        d.base_model.clone()
    } else {
        d.chat_model.clone()
    };
    let load = |name: &str| load_model(&ModelArgs::named(name, c.models_dir.clone(), c.threads));
    let twin = persona_lens_engine::registry::lookup(&c.model.info.name)
        .or_else(|| persona_lens_engine::registry::lookup(&c.cfg.model))
        .and_then(|e| e.twin.clone());
    let mut partner_note = None;
    let (partner_name, partner) = match twin {
        Some(t) if t != configured => match load(&t) {
            Ok(m) => (t, m),
            Err(e) => {
                partner_note = Some(format!(
                    "The matched partner of {} ({t}, same tokenizer and width) is not on this machine ({}); diffed against {configured} instead.",
                    c.cfg.model,
                    crate::one_line(&e)
                ));
                (configured.clone(), load(&configured)?)
            }
        },
        _ => (configured.clone(), load(&configured)?),
    };
    let (base, chat) = if study_is_chat {
        (&partner, c.model)
    } else {
        (c.model, &partner)
    };
    let (base_name, chat_name) = if study_is_chat {
        (partner_name.as_str(), c.cfg.model.as_str())
    } else {
        (c.cfg.model.as_str(), partner_name.as_str())
    };
    let models = [base, chat];
    let hooks = [
        persona_lens_diffing::harvest::middle_resid_post(base),
        persona_lens_diffing::harvest::middle_resid_post(chat),
    ];
    // A base/chat pair of one model reads the chat model's template ids, paired per token; a
    // pair of different families gets one row per prompt at each model's last token.
    let (template, comparable) = persona_lens_diffing::analyze::auto_rendering(models);
    // The three stand-alone commands this step equals (`diff harvest`, `diff train`, `diff
    // analyze`), run here on the models already loaded.
    let pair = crate::diff_jobs::PairArgs {
        base_model: base_name.to_string(),
        chat_model: chat_name.to_string(),
        models_dir: c.models_dir.clone(),
        threads: c.threads,
        quiet: c.quiet,
        ..spec::defaults()
    };
    let store_dir = dir.join("store");
    let ha = crate::diff_jobs::HarvestArgs {
        pair: pair.clone(),
        persona_pair: vec![c.cfg.persona_pair.clone()],
        // Every question the analysis reads too: its rows then come from this store, and
        // neither model runs on those prompts twice.
        n_questions_per_pair: c.cfg.n_questions_per_pair.max(d.n_questions_per_pair),
        max_dataset_items: d.max_dataset_items,
        // The study's corpus is its prompts alone (sampled text would take minutes).
        self_samples: 0,
        align: if comparable {
            crate::diff_jobs::AlignArg::Tokens
        } else {
            crate::diff_jobs::AlignArg::Last
        },
        seed: c.cfg.seed,
        out: store_dir.clone(),
        ..spec::defaults()
    };
    let cc_dir = dir.join("crosscoder");
    let ta = crate::diff_jobs::TrainArgs {
        store: store_dir.clone(),
        objective: d.objective,
        l1_coeff: d.l1_coeff,
        k: d.k,
        aux_k: (d.dict_size / 4).max(1),
        dead_after: 10 * d.batch_size.max(1000),
        dict_size: d.dict_size,
        batch_size: d.batch_size,
        steps: d.steps,
        warmup_steps: (d.steps / 20).max(1),
        checkpoint_every: d.steps.max(1),
        validation_fraction: d.validation_fraction,
        seed: c.cfg.seed,
        out: cc_dir.clone(),
        threads: c.threads,
        quiet: c.quiet,
        ..spec::defaults()
    };
    let aa = crate::diff_jobs::AnalyzeArgs {
        pair,
        ds: DatasetArgs {
            persona_pair: vec![c.cfg.persona_pair.clone()],
            n_questions_per_pair: d.n_questions_per_pair,
            split_seed: c.cfg.seed,
            ..spec::defaults()
        },
        crosscoder: Some(cc_dir.clone()),
        store: Some(store_dir.clone()),
        top_k: d.top_k,
        n_verify: d.n_verify,
        seed: c.cfg.seed,
        out: dir.join("analysis"),
        ..spec::defaults()
    };
    let mut command = c.command("diff harvest", &ha);
    for (sub, args) in [
        ("diff train", c.command("", &ta)),
        ("diff analyze", c.command("", &aa)),
    ] {
        command.extend(["&&".to_string(), sub.to_string()]);
        command.extend(args.into_iter().skip(1));
    }
    let items = crate::diff_jobs::dataset_corpus(&ha)?;
    // The probe step's stored activations (every residual row at each persona prompt's last
    // token) hold the study model's rows of the persona prompts: those forwards are not run again.
    let probe_dir = c.dir("probe");
    let probe_acts = match probe_dir
        .join(persona_lens_analysis::harvest::ACTS_FILE)
        .exists()
    {
        true => persona_lens_analysis::Harvest::load(&probe_dir).ok(),
        false => None,
    };
    let mut spec = ha.spec(hooks, template, comparable);
    spec.stored[if study_is_chat { 1 } else { 0 }] = probe_acts.as_ref();
    let pb = crate::engine_jobs::progress(items.len() as u64, c.quiet, "samples (both models)");
    let mut meta = harvest_paired(models, &items, &spec, &store_dir, &|n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    drop(probe_acts);
    meta.corpus =
        "study: persona dataset + sycophancy prompts (verification prompts held out)".into();
    persona_lens_engine::io::write_atomic(
        &store_dir.join(persona_lens_diffing::paired::MANIFEST),
        &serde_json::to_vec_pretty(&meta)?,
    )?;
    let store = PairedStore::open(&store_dir)?;
    let tcfg = ta.config();
    let ckpt = cc_dir.join("checkpoint");
    let _ = std::fs::remove_dir_all(&ckpt); // a step is re-run whole
    let pb = crate::engine_jobs::progress(d.steps as u64, c.quiet, "crosscoder steps");
    let trained = run_train(&store, &tcfg, &ckpt, false, None, &|st| {
        pb.set_position(st.step as u64 + 1)
    })?;
    pb.finish_and_clear();
    trained.crosscoder.save(&cc_dir)?;
    let last = trained
        .log
        .last()
        .cloned()
        .context("crosscoder training logged no step")?;
    let ads = aa.ds.load()?;
    let aspec = AnalyzeSpec {
        hooks,
        chat_template: template,
        shared_ids: comparable,
        alignment: Some(Alignment::Last),
        batch_size: aa.pair.batch_size,
        crosscoder: Some((&trained.crosscoder, "diff/crosscoder".into())),
        store: Some(&store),
        top_k: d.top_k,
        n_verify: d.n_verify,
        seed: c.cfg.seed,
    };
    let quiet = c.quiet;
    let sm = run_analyze(models, &ads, &aspec, &aa.out, &|step| {
        if !quiet {
            eprintln!("  … {step}");
        }
    })?;
    let prov = |extra: Value| {
        let v = c.prov(json!({"base_model": base_name, "chat_model": chat_name,
            "hooks": [hooks[0].to_string(), hooks[1].to_string()],
            "position": if comparable { "training: every token of the chat model's rendering; latents: last prompt token" } else { "last" },
            "dict_size": d.dict_size, "steps": d.steps, "file": "diff/analysis/summary.json"}));
        merged(v, &extra)
    };
    let mut headlines = vec![match &trained.validation {
        Some(v) => Headline {
            id: "diff.fve".into(),
            label: format!(
                "crosscoder fraction of variance explained on {} held-out samples ({} rows; L0 {:.1}, dead {:.2})",
                v.samples, v.rows, v.l0, v.dead_fraction
            ),
            value: v.fve,
            unit: "fraction".into(),
            ci95: None,
            provenance: prov(json!({"rows": v.rows, "split": "validation samples"})),
        },
        None => Headline {
            id: "diff.fve".into(),
            label: "crosscoder fraction of variance explained (last training batch: no held-out samples)".into(),
            value: last.fve,
            unit: "fraction".into(),
            ci95: None,
            provenance: prov(json!({"rows": store.meta.rows, "split": "training batch"})),
        },
    }];
    let mut negatives = vec![];
    let rows_per_latent = trained.train_rows as f64 / d.dict_size as f64;
    if rows_per_latent < 20.0 {
        negatives.push(format!(
            "The crosscoder saw {} training rows for {} latents ({:.1} per latent, fewer than 20): too little data for a dictionary this size, so its latents are not reliable units; harvest more text (per-token rows of a matched pair give this cheaply) or shrink [diff] dict_size.",
            trained.train_rows, d.dict_size, rows_per_latent
        ));
    }
    if let Some(top) = sm.top_candidates.first() {
        headlines.push(Headline {
            id: "diff.top_novice_latent_t".into(),
            label: format!(
                "t statistic of the top novice-minus-expert latent #{} on the selection split ({} pairs)",
                top.candidate.feature_idx, top.candidate.n_pairs
            ),
            value: top.candidate.t,
            unit: "t".into(),
            ci95: None,
            provenance: prov(json!({"latent": top.candidate.feature_idx, "split": "select"})),
        });
        if let Some(h) = &top.held_out {
            headlines.push(Headline {
                id: "diff.top_latent_held_out".into(),
                label: format!(
                    "latent #{}'s novice − expert activation on {} held-out pairs (p = {:.3})",
                    top.candidate.feature_idx, h.n_pairs, h.p_value
                ),
                value: h.mean,
                unit: "scaled latent activation".into(),
                ci95: Some(h.ci95),
                provenance: prov(json!({"latent": top.candidate.feature_idx, "split": "evaluate"})),
            });
        }
        if let Some(n) = &sm.top_null {
            if n.p_value >= 0.05 {
                negatives.push(format!(
                    "The top latent's selection-split mean ({:.4}) is no larger than the best of {} latents is by chance (sign flips by question: null 95th percentile {:.4}, p = {:.3}): ranking alone does not single it out.",
                    n.observed, n.n_features, n.null_q95, n.p_value
                ));
            }
        }
        if let Some(v) = sm
            .verification
            .iter()
            .find(|v| v.feature_idx == top.candidate.feature_idx)
        {
            headlines.push(Headline {
                id: "diff.top_latent_verification".into(),
                label: format!(
                    "held-out verification prompts passed by latent #{} (of {}; {})",
                    v.feature_idx,
                    v.checked,
                    if v.verified {
                        "verified"
                    } else {
                        "not verified"
                    }
                ),
                value: v.passed as f64,
                unit: "prompts".into(),
                ci95: None,
                provenance: prov(
                    json!({"latent": v.feature_idx, "rule": v.rule, "p_value": v.p_value}),
                ),
            });
            if !v.verified {
                negatives.push(format!(
                    "The top novice latent #{} does not verify on prompts it was never trained or ranked on: {}/{} ACTIVATE prompts above the NEUTRAL 95th percentile, {}/{} SILENT at or below it, permutation p = {:.3}. It tracks the dataset's persona phrasings, not a general 'user is a novice' feature.",
                    v.feature_idx, v.activate_passed, v.n_activate, v.silent_passed, v.n_silent, v.p_value
                ));
            }
        }
    }
    if let Some(k) = &sm.baselines.per_token_kl {
        let kl_of = |class: &str| {
            k.mean_kl_by_class
                .get(class)
                .map_or("n/a".to_string(), |v| format!("{v:.4}"))
        };
        headlines.push(Headline {
            id: "diff.per_token_kl".into(),
            label: format!(
                "mean per-token KL(chat ‖ base) on {} persona prompts (novice {}, expert {})",
                k.n_samples,
                kl_of("novice"),
                kl_of("expert")
            ),
            value: k.mean_kl_nats,
            unit: "nats".into(),
            ci95: None,
            provenance: prov(json!({"positions": k.n_tokens, "baseline": "per-token KL"})),
        });
    }
    if let Some(pc1) = sm.baselines.pca.as_ref().and_then(|p| p.components.first()) {
        headlines.push(Headline {
            id: "diff.pca_pc1_share".into(),
            label: format!(
                "variance share of the first principal component of chat − base on the persona prompts (mean projection {})",
                pc1.mean_projection_by_class
                    .iter()
                    .map(|(c, v)| format!("{c} {v:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            value: pc1.explained_variance_ratio,
            unit: "fraction".into(),
            ci95: None,
            provenance: prov(json!({"baseline": "PCA of differences", "position": "last prompt token"})),
        });
    }
    if let Some(note) = partner_note {
        negatives.push(note);
    }
    if let Some(why) = &sm.exploratory {
        negatives.push(format!(
            "Exploratory diffing only: {why}. No latent is claimed as a product of chat tuning; diff a base model against its own chat version for that."
        ));
    }
    let mut plots = vec![];
    for p in &sm.plots {
        let rel = format!("diff/analysis/{p}");
        if rel.ends_with(".png") && c.out.join(&rel).exists() {
            plots.push(Plot {
                png: rel,
                caption: format!(
                    "Crosscoder diffing: {}",
                    p.trim_end_matches(".png").replace('_', " ")
                ),
            });
        }
    }
    Ok(StepOut {
        step: "diff".into(),
        command,
        headlines,
        negatives,
        plots,
        data: step_json(&DiffData::from_analysis(
            &sm,
            &store.meta,
            &trained,
            rows_per_latent,
            last,
        ))?,
        claims: sm.claims.clone(),
        ..Default::default()
    })
}

// ---------------- orchestration ----------------

fn sha256_hex(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    format!("{:x}", h.finalize())
}

/// A content hash of the model's weights file (GGUF) or of the checkpoint's config and shard
/// sizes (HF directory): provenance for the summary.
fn model_hash(m: &Model) -> Result<String> {
    let p = PathBuf::from(&m.info.path);
    if p.is_file() {
        let mut h = Sha256::new();
        let mut f = std::fs::File::open(&p)?;
        std::io::copy(&mut f, &mut h)?;
        return Ok(format!("{:x}", h.finalize()));
    }
    let mut h = Sha256::new();
    if let Ok(c) = std::fs::read(p.join("config.json")) {
        h.update(&c);
    }
    let mut files: Vec<_> = std::fs::read_dir(&p)
        .map(|r| r.filter_map(|e| e.ok()).collect())
        .unwrap_or_default();
    files.sort_by_key(|e| e.file_name());
    for e in files {
        if let Ok(md) = e.metadata() {
            h.update(format!("{:?}:{}", e.file_name(), md.len()).as_bytes());
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// SIGINT / SIGTERM for every command: delete the temp files of atomic writes in flight, say so
/// in one line, exit 130. Finished files stay whole (they were renamed into place).
pub fn interrupt_handler(resume_hint: &'static str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(move || {
            let n = persona_lens_engine::io::abort_writes();
            eprintln!("error: interrupted; {n} partial file(s) removed, finished results kept{resume_hint}");
            std::process::exit(130);
        });
    });
}

/// Runs (or resumes) the study and returns its summary (also written to `summary.json`).
pub fn run(a: RunArgs) -> Result<Summary> {
    let cfg = a.resolve()?;
    let out = cfg.out.clone();
    persona_lens_engine::io::check_output_dir(&out)?;
    let t_all = Instant::now();
    let quiet = a.quiet || a.json;
    let model = load_model(&ModelArgs::named(
        &cfg.model,
        a.models_dir.clone(),
        a.threads,
    ))?;
    cfg.check_against(model.config().n_layers)?;
    let mhash = model_hash(&model)?;
    let resolved = toml::to_string_pretty(&cfg)?;
    persona_lens_engine::io::write_atomic(&out.join("config.resolved.toml"), resolved.as_bytes())?;
    // A step's identity leaves out where the study is written: a moved or copied study folder
    // resumes (steps find each other's files relative to the folder, never by absolute path).
    let identity = toml::to_string_pretty(&StudyConfig {
        out: PathBuf::new(),
        ..cfg.clone()
    })?;
    let ctx = Ctx {
        model: &model,
        cfg: &cfg,
        out: &out,
        quiet,
        models_dir: a.models_dir.clone(),
        threads: a.threads,
    };
    let n_steps = cfg.experiment.len();
    let mut results: Vec<StepOut> = vec![];
    let mut timings = serde_json::Map::new();
    for (i, step) in cfg.experiment.iter().enumerate() {
        // A step's identity: the whole resolved config but `out`, and the model's hash (steps
        // read each other's files, so any change re-runs every step).
        let hash = sha256_hex(format!("{identity}\n{mhash}\n{step}").as_bytes());
        let marker = out.join(step).join("step.json");
        if a.resume {
            if let Ok(text) = std::fs::read_to_string(&marker) {
                if let Ok(prev) = serde_json::from_str::<StepOut>(&text) {
                    if prev.config_hash == hash {
                        if !quiet {
                            eprintln!("[{}/{n_steps}] {step}: done earlier, reused", i + 1);
                        }
                        timings.insert(step.clone(), json!("reused"));
                        results.push(prev);
                        continue;
                    }
                }
            }
        }
        if !quiet {
            eprintln!("[{}/{n_steps}] {step} …", i + 1);
        }
        let t = Instant::now();
        let mut r = match step.as_str() {
            "probe" => probe_step(&ctx),
            "lens" => lens_step(&ctx),
            "patch" => patch_step(&ctx),
            "heads" => heads_step(&ctx),
            "ablate" => ablate_step(&ctx),
            "steer" => steer_step(&ctx),
            "diff" => diff_step(&ctx),
            other => bail!("internal: unknown step {other}"),
        }
        .with_context(|| format!("step {step}"))?;
        r.config_hash = hash;
        // Commands are recorded with paths relative to the study folder's parent as given.
        write_json(&marker, &r)?;
        let secs = t.elapsed().as_secs_f64();
        timings.insert(step.clone(), json!(secs));
        if !quiet {
            eprintln!("[{}/{n_steps}] {step} done in {secs:.1} s", i + 1);
        }
        results.push(r);
    }
    let summary = build_summary(&ctx, &mhash, &results)?;
    write_json(&out.join("summary.json"), &summary)?;
    let doc = build_report(&summary);
    persona_lens_engine::io::write_atomic(&out.join("report.md"), doc.to_markdown().as_bytes())?;
    let html = doc.to_html(&out)?;
    persona_lens_engine::io::write_atomic(&out.join("report.html"), html.as_bytes())?;
    let run_info = json!({
        "tool": format!("persona-lens {}", env!("CARGO_PKG_VERSION")),
        "versions": {"persona-lens": env!("CARGO_PKG_VERSION"), "candle": "0.11", "tokenizers": "0.22"},
        "model": {"spec": cfg.model, "path": model.info.path, "sha256": mhash},
        "seed": cfg.seed,
        "config": cfg,
        "config_file": a.config.as_ref().map(|p| p.display().to_string()),
        "resumed": a.resume,
        "threads": a.threads,
        "commands": results.iter().map(|r| json!({"step": r.step, "command": r.command})).collect::<Vec<_>>(),
        "seconds": timings,
        "total_seconds": t_all.elapsed().as_secs_f64(),
    });
    write_json(&out.join("run.json"), &run_info)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(summary);
    }
    print_table(&results);
    println!(
        "study of {} done in {:.1} s: {}/summary.json, report.md, report.html",
        cfg.model,
        t_all.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(summary)
}

fn print_table(results: &[StepOut]) {
    println!("{:<7} {:<78} {:>10}  unit", "step", "result", "value");
    for r in results {
        for h in &r.headlines {
            let mut label = h.label.clone();
            if label.chars().count() > 78 {
                label = label.chars().take(77).collect::<String>() + "…";
            }
            println!("{:<7} {:<78} {:>10}  {}", r.step, label, h.shown(), h.unit);
        }
    }
}

// ---------------- summary and report ----------------

fn build_summary(c: &Ctx, mhash: &str, results: &[StepOut]) -> Result<Summary> {
    let cfgm = c.model.config();
    let mut claims: Vec<Claim> = results.iter().flat_map(|r| r.claims.clone()).collect();
    persona_lens_analysis::claims::adjust(&mut claims);
    // An unsupported claim is a negative result, with its numbers, ahead of the steps' own.
    let negative_results: Vec<NegativeResult> = claims
        .iter()
        .filter(|c| !c.supported)
        .map(|c| NegativeResult {
            step: c.id.split('.').next().unwrap_or("").into(),
            text: format!("Not supported: {}", claim_sentence(c)),
        })
        .chain(results.iter().flat_map(|r| {
            r.negatives.iter().map(move |n| NegativeResult {
                step: r.step.clone(),
                text: n.clone(),
            })
        }))
        .collect();
    let step_data = |step: &str| results.iter().find(|r| r.step == step).map(|r| &r.data);
    let dataset = step_data("probe")
        .map(ProbeData::deserialize)
        .transpose()
        .context("internal: the probe step's data")?
        .map(|p| DatasetFacts {
            class_counts: p.class_counts,
            hash: p.dataset_hash,
            n_prompts: p.n_prompts,
            n_templates: p.n_templates,
            source: p.dataset_source,
        });
    let circuit = step_data("heads")
        .map(HeadsData::deserialize)
        .transpose()
        .context("internal: the heads step's data")?
        .map(|h| h.circuit)
        .unwrap_or_default();
    let (nov, exp) = novice_expert(&c.cfg.persona_pair);
    let chat = c.model.is_chat_model();
    let mut summary = Summary {
        circuit,
        claims,
        dataset,
        executive_summary: String::new(),
        headlines: results.iter().flat_map(|r| r.headlines.clone()).collect(),
        model: ModelFacts {
            arch: cfgm.arch.name().into(),
            chat_template: chat,
            d_model: cfgm.d_model,
            format: c.model.info.format.clone(),
            kind: if chat { "chat" } else { "base" }.into(),
            matmul: persona_lens_engine::mkl::matmul_backend().label(),
            n_heads: cfgm.n_heads,
            n_layers: cfgm.n_layers,
            name: c.cfg.model.clone(),
            precision: c.model.info.precision.clone(),
            sha256: mhash.into(),
            weight_types: c.model.info.tensor_types.clone(),
        },
        negative_results,
        objective: format!("Find out whether {} builds an internal model of its user's expertise ({nov} vs {exp}), where in the network it lives, and whether it settles the complexity of its answer before writing a word.", c.cfg.model),
        persona_pair: c.cfg.persona_pair.clone(),
        plots: results.iter().flat_map(|r| r.plots.clone()).collect(),
        schema: "persona-lens study summary 1".into(),
        seed: c.cfg.seed,
        steps: results
            .iter()
            .map(|r| (r.step.clone(), r.data.clone()))
            .collect(),
        steps_run: results.iter().map(|r| r.step.clone()).collect(),
        tool: format!("persona-lens {}", env!("CARGO_PKG_VERSION")),
        topic: c.cfg.pair_id.clone(),
    };
    summary.executive_summary = executive_summary(&summary);
    Ok(summary)
}

/// A claim as the summary and the report write it: the statement, then what the test found.
pub fn claim_sentence(c: &Claim) -> String {
    let conditions = if c.conditions.is_empty() {
        String::new()
    } else {
        format!(
            "; conditions: {}",
            c.conditions
                .iter()
                .map(|k| format!("{} ({})", k.what, if k.holds { "holds" } else { "fails" }))
                .collect::<Vec<_>>()
                .join("; ")
        )
    };
    format!(
        "{} [{}: effect {} ({}), 95 % CI {} to {}, p = {}, Holm-adjusted p = {}, {} clusters{conditions}]",
        c.statement,
        c.id,
        fmt_num(c.effect),
        c.statistic,
        fmt_num(c.ci95.0),
        fmt_num(c.ci95.1),
        fmt_p(c.p_value),
        fmt_p(c.p_adjusted),
        c.n_clusters
    )
}

/// A claim in the executive summary: the statement and its numbers, without the test's wording
/// (the report's claims table has it), so that several supported claims fit in 300 words.
pub fn claim_brief(c: &Claim) -> String {
    format!(
        "{} ({}: effect {}, 95 % CI {} to {}, Holm-adjusted p = {}).",
        c.statement.trim_end_matches('.'),
        c.id,
        fmt_num(c.effect),
        fmt_num(c.ci95.0),
        fmt_num(c.ci95.1),
        fmt_p(c.p_adjusted)
    )
}

/// A p-value as the report writes it: three decimals, or two significant digits below 0.001
/// (a permutation p is never 0).
pub fn fmt_p(p: f64) -> String {
    if p.is_finite() && p > 0.0 && p < 0.001 {
        format!("{p:.1e}")
    } else {
        fmt_num(p)
    }
}

fn hl<'a>(s: &'a Summary, id: &str) -> Option<&'a Headline> {
    s.headlines.iter().find(|h| h.id == id)
}

/// At most 300 words, from the numbers: the question, the supported claims, the measurements
/// not yet tested as claims (stated as measurements, without interpretation), then what failed
/// (unsupported claims first). As long as the findings, no filler.
pub fn executive_summary(s: &Summary) -> String {
    let model = &s.model.name;
    let (nov, exp) = novice_expert(&s.persona_pair);
    let claims = &s.claims;
    let kind = match s.model.kind.as_str() {
        "chat" => "a chat model, prompts in its chat template",
        "base" => "a base model, raw-text prompts",
        _ => "a model",
    };
    let weights: Vec<String> = s.model.weight_types.keys().cloned().collect();
    let weights = if weights.is_empty() {
        String::new()
    } else {
        format!(
            "; {} weights ({}), computed as {}",
            s.model.format,
            weights.join(", "),
            s.model.precision
        )
    };
    let mut core: Vec<String> = vec![format!(
        "Does {model} ({kind}{weights}) keep a model of who it is talking to ({nov} vs {exp})?"
    )];
    let supported: Vec<String> = claims
        .iter()
        .filter(|c| c.supported)
        .map(claim_brief)
        .collect();
    if supported.is_empty() && !claims.is_empty() {
        core.push(format!(
            "None of the {} tested claims is supported at a family-wise 5 % level (Holm).",
            claims.len()
        ));
    } else if !supported.is_empty() {
        core.push(format!("Supported: {}", supported.join(" ")));
    }
    let mut measured: Vec<String> = vec![];
    if let Some(h) = hl(s, "patch.resid_last_half_layer") {
        measured.push(format!(
            "patching the last position's residual stream restores half of the {nov} behaviour from layer {} on",
            h.shown()
        ));
    }
    if !s.circuit.is_empty() {
        let names: Vec<String> = s
            .circuit
            .iter()
            .take(3)
            .map(|c| format!("{} ({})", c.head, fmt_num(c.score)))
            .collect();
        measured.push(format!(
            "z-patching on the selection split ranks the heads {} first (pooled restoration scores)",
            names.join(", ")
        ));
    }
    for mode in ["zero", "mean", "resample"] {
        if let (Some(t), Some(r)) = (
            hl(s, &format!("ablate.{mode}.top_gap_change")),
            hl(s, &format!("ablate.{mode}.random_gap_change")),
        ) {
            measured.push(format!(
                "{mode}-ablating the top heads changes the persona gap by {} logits against {} for random heads",
                t.shown(),
                r.shown()
            ));
        }
    }
    if let Some(t) = hl(s, "diff.top_novice_latent_t") {
        measured.push(format!(
            "the crosscoder's most novice-specific latent has t = {}",
            t.shown()
        ));
    }
    let mut extra: Vec<String> = vec![];
    if !measured.is_empty() {
        extra.push(format!(
            "Measured but not yet tested as claims: {}.",
            measured.join("; ")
        ));
    }
    let mut failures: Vec<String> = s
        .negative_results
        .iter()
        .take(3)
        .map(|n| n.text.clone())
        .collect();
    let closing = format!(
        "All numbers come from one seeded run ({} prompts per persona class in the probe set, seed {}); the report lists each with its hook, layer, position and file.",
        s.dataset.as_ref().and_then(|d| d.class_counts.values().next()).map_or("?".into(), |v| v.to_string()),
        s.seed
    );
    let words = |v: &[String]| {
        v.iter()
            .map(|x| x.split_whitespace().count())
            .sum::<usize>()
    };
    let mut text: Vec<String> = core.clone();
    if !failures.is_empty() {
        text.push(format!("What failed: {}", failures.join(" ")));
    }
    for e in extra.iter().chain([&closing]) {
        if words(&text) + e.split_whitespace().count() <= 300 {
            text.push(e.clone());
        }
    }
    // Too long even so: drop failures beyond the first, then everything after the claims.
    while words(&text) > 300 && failures.len() > 1 {
        failures.pop();
        let i = core.len();
        text[i] = format!("What failed: {}", failures.join(" "));
    }
    while words(&text) > 300 && text.len() > core.len() {
        text.pop();
    }
    text.join(" ")
}

pub fn build_report(s: &Summary) -> Document {
    let model = &s.model.name;
    let mut d = Document::new(format!("Persona study: {model}"));
    d.h(1, "Executive summary");
    d.p(&s.executive_summary);
    d.h(1, "1. Objective");
    d.p(&s.objective);
    d.h(1, "2. Model and dataset");
    let m = &s.model;
    d.list(vec![
        format!("Model `{model}` ({}, {} layers, d_model {}, {} heads), {} weights computed in {}; sha256 `{}`.",
            m.arch, m.n_layers, m.d_model, m.n_heads, m.format, m.precision, m.sha256),
        format!("Chat template applied: {}.", m.chat_template),
        format!("Persona pair `{}`; topic for lens, heads, ablation and steering: `{}`; seed {}.",
            s.persona_pair, s.topic, s.seed),
        match &s.dataset {
            Some(ds) => format!("Probe dataset {} (hash `{}`): {} prompts, class counts {}, {} persona paraphrases.",
                ds.source, ds.hash, ds.n_prompts, json!(ds.class_counts), ds.n_templates),
            None => "No probe step in this run.".into(),
        },
        format!("Steps run: {}.", s.steps_run.join(", ")),
    ]);
    d.h(1, "3. Key results");
    let rows: Vec<Vec<String>> = s
        .headlines
        .iter()
        .map(|h| {
            let ci = h.ci95.map_or("-".into(), |(lo, hi)| {
                format!("[{}, {}]", fmt_num(lo), fmt_num(hi))
            });
            let mut prov = vec![];
            for k in [
                "hook",
                "layer",
                "resid_row",
                "head",
                "position",
                "topic",
                "file",
            ] {
                if let Some(v) = h.provenance.get(k) {
                    prov.push(format!(
                        "{k} {}",
                        v.as_str().map(String::from).unwrap_or(v.to_string())
                    ));
                }
            }
            vec![
                h.label.clone(),
                h.shown(),
                h.unit.clone(),
                ci,
                prov.join("; "),
            ]
        })
        .collect();
    d.table(
        vec![
            "result".into(),
            "value".into(),
            "unit".into(),
            "95 % CI".into(),
            "provenance".into(),
        ],
        rows,
    );
    let claims = &s.claims;
    if !claims.is_empty() {
        d.p("Tested claims (each selected on the selection split and tested on the evaluation split; p-values Holm-adjusted over every claim of the run; supported when the adjusted p is below 0.05, the effect points the claimed way and every listed condition holds):");
        d.table(
            [
                "claim",
                "test",
                "effect",
                "95 % CI",
                "p",
                "Holm p",
                "supported",
            ]
            .map(String::from)
            .to_vec(),
            claims
                .iter()
                .map(|c| {
                    vec![
                        c.statement.clone(),
                        c.test.clone(),
                        format!("{} ({})", fmt_num(c.effect), c.statistic),
                        format!("[{}, {}]", fmt_num(c.ci95.0), fmt_num(c.ci95.1)),
                        fmt_p(c.p_value),
                        fmt_p(c.p_adjusted),
                        if c.supported { "yes" } else { "no" }.into(),
                    ]
                })
                .collect(),
        );
    }
    let plots: Vec<(String, String)> = s
        .plots
        .iter()
        .map(|p| (p.png.clone(), p.caption.clone()))
        .collect();
    // The logit-difference plot first: it is the study's main figure.
    for (png, cap) in plots.iter().filter(|(p, _)| p.starts_with("lens/")) {
        d.image(png.clone(), "logit difference by layer", cap.clone());
    }
    for (png, cap) in plots
        .iter()
        .filter(|(p, _)| p.starts_with("probe/") || p.starts_with("steer/"))
    {
        d.image(png.clone(), png.clone(), cap.clone());
    }
    d.h(1, "4. Evidence of circuitry");
    let circ = &s.circuit;
    if circ.is_empty() {
        d.p("No head ranking in this run.");
    } else {
        d.p("Heads ranked by the mean normalised z-patching score (how much of the novice behaviour patching the head's output restores), with the hypothesised role read from where the head attends at the last position of a novice prompt:");
        d.table(
            vec![
                "head".into(),
                "score".into(),
                "95 % CI".into(),
                "attention on persona tokens".into(),
                "hypothesised role".into(),
            ],
            circ.iter()
                .map(|c| {
                    vec![
                        c.head.clone(),
                        fmt_num(c.score),
                        format!(
                            "[{}, {}]",
                            fmt_num(c.mean_ratio_ci95.0),
                            fmt_num(c.mean_ratio_ci95.1)
                        ),
                        c.persona_attention
                            .map_or("-".into(), |v| format!("{:.0} %", v * 100.0)),
                        c.role.clone(),
                    ]
                })
                .collect(),
        );
    }
    for (png, cap) in plots.iter().filter(|(p, _)| {
        p.starts_with("patch/") || p.starts_with("heads/") || p.starts_with("ablate/")
    }) {
        d.image(png.clone(), png.clone(), cap.clone());
    }
    d.h(1, "5. Failures and negative results");
    let negs: Vec<String> = s
        .negative_results
        .iter()
        .map(|n| format!("**{}**: {}", n.step, n.text))
        .collect();
    if negs.is_empty() {
        d.p("No step's checks flagged a negative result in this run.");
    } else {
        d.list(negs);
    }
    let diff_plots: Vec<_> = plots
        .iter()
        .filter(|(p, _)| p.starts_with("diff/"))
        .collect();
    if !diff_plots.is_empty() {
        d.h(1, "6. Model diffing (crosscoder)");
        for (png, cap) in diff_plots {
            d.image(png.clone(), png.clone(), cap.clone());
        }
    }
    d.h(1, "Reproduce");
    d.p("Re-run with `persona-lens run --config config.resolved.toml` (the resolved configuration of this run, beside this report). Each step's stand-alone command is in `run.json` and `<step>/step.json` (paths relative to this folder: run it from here).");
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(id: &str, supported: bool, p: f64) -> Claim {
        Claim {
            id: id.into(),
            statement: format!(
                "The study finds {id} on new questions with new persona paraphrases"
            ),
            analysis: "test".into(),
            test: "a clustered one-sided sign-flip test of question sums, a long description"
                .into(),
            statistic: "mean paired difference (logits)".into(),
            effect: 0.5,
            ci95: (0.25, 0.75),
            p_value: p,
            p_adjusted: p * 10.0,
            supported,
            n_clusters: 20,
            conditions: vec![],
        }
    }

    /// Supported claims are stated with their numbers and ids (the test's wording stays in the
    /// report), small p-values are not printed as 0, and five supported claims plus failures
    /// fit in 300 words.
    #[test]
    fn executive_summary_states_each_supported_claim_briefly() {
        let claims: Vec<Claim> = (0..5)
            .map(|i| claim(&format!("step.claim_{i}"), true, 0.0005))
            .chain([claim("step.failed", false, 0.4)])
            .collect();
        let s = Summary {
            model: ModelFacts {
                name: "m".into(),
                kind: "chat".into(),
                format: "gguf".into(),
                precision: "f32".into(),
                weight_types: [("Q4_1".to_string(), 10)].into(),
                ..Default::default()
            },
            persona_pair: "child-phd".into(),
            negative_results: vec![NegativeResult {
                step: "step".into(),
                text: format!("Not supported: {}", claim_sentence(&claims[5])),
            }],
            claims: claims.clone(),
            dataset: Some(DatasetFacts {
                class_counts: [("novice".to_string(), 10)].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let exec = executive_summary(&s);
        let words = exec.split_whitespace().count();
        assert!(words <= 300, "{words} words: {exec}");
        for c in &claims[..5] {
            assert!(exec.contains(&c.id), "{exec}");
        }
        assert!(exec.contains("Holm-adjusted p = 0.005"), "{exec}");
        assert!(!exec.contains("p = 0.000"), "{exec}");
        assert!(
            exec.contains("a chat model") && exec.contains("Q4_1"),
            "{exec}"
        );
        assert_eq!(fmt_p(0.0005), "5.0e-4");
        assert_eq!(fmt_p(0.0476), "0.048");
    }
}
