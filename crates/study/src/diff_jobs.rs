//! `persona-lens diff ...`: crosscoder model diffing (base vs chat).

use crate::analysis_jobs::DatasetArgs;
use crate::engine_jobs::{load_model, progress};
use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand, ValueEnum};
use persona_lens_diffing::analyze::{analyze as run_analyze, rows_of, AnalyzeSpec};
use persona_lens_diffing::corpus;
use persona_lens_diffing::harvest::{
    harvest_paired, harvest_paired_part, middle_resid_post, CorpusItem, PairedHarvestSpec,
};
use persona_lens_diffing::paired::{Alignment, PairedStore};
use persona_lens_diffing::persona::verify as verify_rows;
use persona_lens_diffing::shards::ShardSpec;
use persona_lens_diffing::train::{train as run_train, Objective, TrainConfig};
use persona_lens_diffing::{load_dictionary, CrossCoder, Dictionary};
use persona_lens_engine::{HookName, Model};
use persona_lens_report::{save_bar_chart, save_line_chart, Bar, BarChart, LineChart, Series};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum DiffCmd {
    /// Run both models on a corpus and store paired activations (shards) at a hook.
    Harvest(HarvestArgs),
    /// Join the finished parts of a harvest made with --shard I/N into `paired.json`.
    Manifest(ManifestArgs),
    /// Train an L1 or BatchTopK crosscoder on a paired store (checkpoints, --resume).
    Train(TrainArgs),
    /// Δ_norm classes, Latent Scaling, novice-vs-expert latents, verification, sycophancy,
    /// max-activating examples; summary.json, plots, report.md. Without --crosscoder: the
    /// notebook's direct activation comparison.
    Analyze(AnalyzeArgs),
    /// Verification prompts (ACTIVATE / SILENT / NEUTRAL) for chosen latents: table and bar plot.
    Verify(VerifyArgs),
    /// Encode tensor `x` (batch, n_models, d) with any supported crosscoder/SAE layout.
    Encode(EncodeArgs),
}

pub fn run(c: DiffCmd) -> Result<()> {
    match c {
        DiffCmd::Harvest(a) => harvest(a),
        DiffCmd::Manifest(a) => manifest(a),
        DiffCmd::Train(a) => train(a),
        DiffCmd::Analyze(a) => analyze(a),
        DiffCmd::Verify(a) => verify(a),
        DiffCmd::Encode(a) => encode(a),
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateArg {
    /// A base/chat pair of one model (same tokenizer and width): both read the chat model's
    /// template ids, paired per token. Otherwise the chat template for an instruction-tuned
    /// model, raw text for a base model.
    Auto,
    /// Both read the chat model's ids through its template (needs one tokenizer).
    Shared,
    /// Raw text for both (needed for per-token pairing of a base/chat pair).
    None,
    /// The chat template for both.
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlignArg {
    Auto,
    Tokens,
    Last,
}

/// The two models being diffed.
#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PairArgs {
    /// Base model (index 0).
    #[arg(long, default_value = "gemma-3-270m")]
    pub base_model: String,
    /// Chat model (index 1).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub chat_model: String,
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Base model hook (default: the middle layer's resid_post).
    #[arg(long)]
    pub base_hook: Option<String>,
    /// Chat model hook (default: the middle layer's resid_post).
    #[arg(long)]
    pub chat_hook: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    pub template: TemplateArg,
    #[arg(long, default_value_t = 16, value_parser = crate::at_least_one)]
    pub batch_size: usize,
    #[arg(long, value_parser = crate::threads)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub quiet: bool,
}

pub struct Pair {
    pub models: [Model; 2],
    pub hooks: [HookName; 2],
    pub template: [bool; 2],
    /// Both models read the chat model's token ids (a base/chat pair of one model).
    pub shared_ids: bool,
}

impl PairArgs {
    pub fn load(&self) -> Result<Pair> {
        let load = |name: &str| -> Result<Model> {
            load_model(&ModelArgs::named(
                name,
                self.models_dir.clone(),
                self.threads,
            ))
        };
        let models = [load(&self.base_model)?, load(&self.chat_model)?];
        let hook = |m: &Model, h: &Option<String>| -> Result<HookName> {
            Ok(match h {
                Some(s) => HookName::parse(s, m.config().n_layers)?,
                None => middle_resid_post(m),
            })
        };
        let hooks = [
            hook(&models[0], &self.base_hook)?,
            hook(&models[1], &self.chat_hook)?,
        ];
        let (template, shared_ids) = match self.template {
            TemplateArg::None => ([false, false], false),
            TemplateArg::Both => ([true, true], false),
            TemplateArg::Shared => ([true, true], true),
            TemplateArg::Auto => {
                persona_lens_diffing::analyze::auto_rendering([&models[0], &models[1]])
            }
        };
        Ok(Pair {
            models,
            hooks,
            template,
            shared_ids,
        })
    }
}

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HarvestArgs {
    #[command(flatten)]
    pub pair: PairArgs,
    /// Corpus files (text lines, .json list, .jsonl with "text"); default: the built-in corpus
    /// (persona dataset, verification and sycophancy prompts, text sampled from both models).
    #[arg(long)]
    pub corpus: Vec<PathBuf>,
    /// Also add the built-in corpus when --corpus is given.
    #[arg(long)]
    pub with_default_corpus: bool,
    /// Persona pairs of the default corpus's dataset prompts (empty = every expertise pair).
    #[arg(long, value_delimiter = ',')]
    pub persona_pair: Vec<String>,
    /// Questions per topic of the default corpus's dataset prompts (0 = all).
    #[arg(long, default_value_t = 0)]
    pub n_questions_per_pair: usize,
    /// Persona dataset prompts in the default corpus (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_dataset_items: usize,
    /// Samples generated by each model for the default corpus.
    #[arg(long, default_value_t = 32)]
    pub self_samples: usize,
    #[arg(long, default_value_t = 48)]
    pub self_sample_tokens: usize,
    #[arg(long, value_enum, default_value = "auto")]
    pub align: AlignArg,
    /// Rows per shard file.
    #[arg(long, default_value_t = 50_000)]
    pub shard_rows: usize,
    /// Harvest only part I of N (0-based) into --out, e.g. `--shard 0/4`, one per worker; the
    /// parts of N workers together equal the unsharded store bitwise. `paired.json` is written
    /// when the last part finishes (or by `diff manifest`).
    #[arg(long)]
    #[serde(with = "shard_text")]
    pub shard: Option<persona_lens_diffing::shards::ShardSpec>,
    /// Skip the work already on disk: a finished part (its JSON there and its files' hashes
    /// intact), or an unsharded store whose `paired.json` is there.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "out/diff/store")]
    pub out: PathBuf,
}

/// `--shard` in a spec file as it is written on the command line (`I/N`).
mod shard_text {
    use persona_lens_diffing::shards::ShardSpec;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<ShardSpec>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => s.collect_str(x),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ShardSpec>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| t.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The default corpus's persona dataset prompts (with a neutral prompt per question; no
/// lexical controls), `a.max_dataset_items` at most.
pub fn dataset_corpus(a: &HarvestArgs) -> Result<Vec<CorpusItem>> {
    let ds = persona_lens_analysis::dataset::generate(&persona_lens_analysis::GenOptions {
        persona_pairs: a.persona_pair.clone(),
        n_questions_per_pair: a.n_questions_per_pair,
        include_neutral: true,
        include_lexical_controls: false,
        ..Default::default()
    })?;
    Ok(corpus::prompt_corpus(&ds, a.max_dataset_items))
}

impl HarvestArgs {
    /// The harvest's settings for a pair whose hooks and renderings are resolved.
    pub fn spec(
        &self,
        hooks: [HookName; 2],
        chat_template: [bool; 2],
        shared_ids: bool,
    ) -> PairedHarvestSpec<'static> {
        PairedHarvestSpec {
            shared_ids,
            hooks,
            chat_template,
            alignment: match self.align {
                AlignArg::Auto => None,
                AlignArg::Tokens => Some(Alignment::Tokens),
                AlignArg::Last => Some(Alignment::Last),
            },
            batch_size: self.pair.batch_size,
            shard_rows: self.shard_rows,
            setup: [None, None],
            stored: [None, None],
        }
    }
}

fn default_corpus(
    models: &[Model; 2],
    template: [bool; 2],
    a: &HarvestArgs,
) -> Result<Vec<CorpusItem>> {
    let mut items = dataset_corpus(a)?;
    for (m, &chat) in models.iter().zip(&template) {
        if a.self_samples > 0 {
            items.extend(corpus::self_sampled(
                m,
                a.self_samples,
                a.self_sample_tokens,
                a.seed,
                chat,
            )?);
        }
    }
    Ok(items)
}

pub fn harvest(a: HarvestArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let out = harvest_with(&a)?;
    let secs = t0.elapsed().as_secs_f64();
    match &out {
        Harvested::Store(meta) => println!(
            "{} rows ({:?} alignment, d = {} padded from {:?}) from {} samples in {} shards, {secs:.1} s -> {}",
            meta.rows,
            meta.alignment,
            meta.d,
            meta.dims,
            meta.samples.len(),
            meta.shards.len(),
            a.out.display()
        ),
        Harvested::Part { part, skipped, manifest } => {
            println!(
                "part {}/{}: samples {}..{}, {} rows in {} files{}, {secs:.1} s -> {}",
                part.part.index,
                part.part.count,
                part.part.first_sample,
                part.part.first_sample + part.part.n_samples,
                part.part.rows,
                part.part.files.len(),
                if *skipped { " (finished before: skipped)" } else { "" },
                a.out.display()
            );
            match manifest {
                Some(m) => println!(
                    "all {} parts finished: {} rows -> {}",
                    part.part.count,
                    m.rows,
                    a.out.join(persona_lens_diffing::paired::MANIFEST).display()
                ),
                None => println!("other parts are not finished yet; `persona-lens diff manifest --store {}` lists them", a.out.display()),
            }
        }
    }
    Ok(())
}

/// What a harvest wrote.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Harvested {
    /// The whole store (`paired.json`).
    Store(Box<persona_lens_diffing::paired::PairedMeta>),
    /// One part; `manifest` once every part is finished (this one was the last).
    Part {
        part: Box<persona_lens_diffing::shards::PartManifest>,
        skipped: bool,
        manifest: Option<Box<persona_lens_diffing::paired::PairedMeta>>,
    },
}

/// The pair loaded and the corpus built once: what a worker keeps between the parts it harvests.
pub struct PairHarvester {
    pair: Pair,
    items: Vec<CorpusItem>,
    corpus_label: String,
    args: HarvestArgs,
}

impl PairHarvester {
    pub fn new(a: &HarvestArgs) -> Result<Self> {
        let pair = a.pair.load()?;
        let mut items = vec![];
        for f in &a.corpus {
            items.extend(corpus::from_file(f)?);
        }
        if a.corpus.is_empty() || a.with_default_corpus {
            items.extend(default_corpus(&pair.models, pair.template, a)?);
        }
        let corpus_label = if a.corpus.is_empty() {
            "builtin".into()
        } else {
            a.corpus
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        Ok(Self {
            pair,
            items,
            corpus_label,
            args: a.clone(),
        })
    }

    pub fn n_samples(&self) -> usize {
        self.items.len()
    }

    fn spec(&self) -> PairedHarvestSpec<'static> {
        self.args
            .spec(self.pair.hooks, self.pair.template, self.pair.shared_ids)
    }

    fn models(&self) -> [&Model; 2] {
        [&self.pair.models[0], &self.pair.models[1]]
    }

    /// The whole store into `out`.
    pub fn store(&self, out: &Path) -> Result<persona_lens_diffing::paired::PairedMeta> {
        let pb = progress(self.items.len() as u64, self.args.pair.quiet, "samples");
        let mut meta = harvest_paired(self.models(), &self.items, &self.spec(), out, &|n| {
            pb.inc(n as u64)
        })?;
        pb.finish_and_clear();
        meta.corpus = self.corpus_label.clone();
        let bytes = serde_json::to_vec_pretty(&meta)?;
        persona_lens_engine::io::write_atomic(
            &out.join(persona_lens_diffing::paired::MANIFEST),
            &bytes,
        )?;
        Ok(meta)
    }

    /// Part `shard` into `out` (skipped when `resume` finds it finished); writes `paired.json`
    /// when every part is finished.
    pub fn part(&self, shard: ShardSpec, out: &Path, resume: bool) -> Result<Harvested> {
        let sha = persona_lens_diffing::shards::corpus_sha256(&self.items);
        let done = if resume {
            persona_lens_diffing::shards::finished_part(out, shard, &sha)?
        } else {
            None
        };
        let skipped = done.is_some();
        let part = match done {
            Some(p) => p,
            None => {
                let range = shard.sample_range(self.items.len(), self.args.pair.batch_size);
                let pb = progress(range.len() as u64, self.args.pair.quiet, "samples");
                let p = harvest_paired_part(
                    self.models(),
                    &self.items,
                    &self.spec(),
                    shard,
                    &self.corpus_label,
                    out,
                    &|n| pb.inc(n as u64),
                )?;
                pb.finish_and_clear();
                p
            }
        };
        // Every worker that sees all parts finished writes the same manifest (atomically), so
        // whichever finishes last, the store is complete.
        let joined = persona_lens_diffing::shards::join_parts(out)?;
        let complete = joined
            .sharding
            .as_ref()
            .is_some_and(|s| s.missing.is_empty());
        let manifest = if complete {
            persona_lens_diffing::shards::save_manifest(out, &joined)?;
            Some(Box::new(joined))
        } else {
            None
        };
        Ok(Harvested::Part {
            part: Box::new(part),
            skipped,
            manifest,
        })
    }
}

/// Harvests the pair over the corpus into `a.out` (the whole store, or part `--shard I/N`).
pub fn harvest_with(a: &HarvestArgs) -> Result<Harvested> {
    if a.resume && a.shard.is_none() {
        if let Ok(s) = PairedStore::open(&a.out) {
            if s.meta.sharding.is_none() {
                return Ok(Harvested::Store(Box::new(s.meta)));
            }
        }
    }
    let h = PairHarvester::new(a)?;
    match a.shard {
        None => Ok(Harvested::Store(Box::new(h.store(&a.out)?))),
        Some(shard) => h.part(shard, &a.out, a.resume),
    }
}

#[derive(Args, Clone, Debug)]
pub struct ManifestArgs {
    /// The store folder the parts were harvested into.
    #[arg(long, default_value = "out/diff/store")]
    pub store: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// `diff manifest`: joins the finished parts into `paired.json` (also a partial store, with the
/// missing parts listed, which training can start from and `--resume` on as parts arrive).
pub fn manifest_with(a: &ManifestArgs) -> Result<persona_lens_diffing::paired::PairedMeta> {
    Ok(persona_lens_diffing::shards::write_manifest(&a.store)?)
}

pub fn manifest(a: ManifestArgs) -> Result<()> {
    let m = manifest_with(&a)?;
    let s = m.sharding.as_ref().expect("a joined store has parts");
    if a.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    println!(
        "{} of {} parts, {} rows from {} samples -> {}{}",
        s.parts.len(),
        s.count,
        m.rows,
        m.samples.len(),
        a.store
            .join(persona_lens_diffing::paired::MANIFEST)
            .display(),
        if s.missing.is_empty() {
            String::new()
        } else {
            format!(" (partial: parts {:?} not finished)", s.missing)
        }
    );
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveArg {
    L1,
    Batchtopk,
}

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainArgs {
    /// A paired store from `diff harvest`.
    #[arg(long, default_value = "out/diff/store")]
    pub store: PathBuf,
    /// BatchTopK by default (Minder et al.'s recommendation: L1 crosscoders invent chat-only
    /// latents); L1 stays available.
    #[arg(long, value_enum, default_value = "batchtopk")]
    pub objective: ObjectiveArg,
    #[arg(long, default_value_t = 0.02)]
    pub l1_coeff: f64,
    #[arg(long, default_value_t = 32)]
    pub k: usize,
    #[arg(long, default_value_t = 256)]
    pub aux_k: usize,
    #[arg(long, default_value_t = 1.0 / 32.0)]
    pub aux_alpha: f64,
    /// Examples without activation after which a latent counts as dead.
    #[arg(long, default_value_t = 100_000)]
    pub dead_after: usize,
    #[arg(long, default_value_t = 1024)]
    pub dict_size: usize,
    #[arg(long, default_value_t = 256, value_parser = crate::at_least_one)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 200)]
    pub checkpoint_every: usize,
    #[arg(long, default_value_t = 0.1)]
    pub dec_init_norm: f64,
    /// Fraction of the store's samples held out of training (whole samples); FVE, L0 and dead
    /// fraction are reported on them.
    #[arg(long, default_value_t = 0.1, value_parser = crate::fraction)]
    pub validation_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from the checkpoint in --out (same settings and data, or a store harvested in
    /// parts that has gained parts since).
    #[arg(long)]
    pub resume: bool,
    /// Store rows in memory at a time; the batch order depends on it (and on the seed), not on
    /// how the store is split into files.
    #[arg(long, default_value_t = persona_lens_diffing::train::DEFAULT_CHUNK_ROWS, value_parser = crate::at_least_one)]
    pub chunk_rows: usize,
    #[arg(long, default_value = "out/diff/crosscoder")]
    pub out: PathBuf,
    #[arg(long, value_parser = crate::threads)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// The training settings these flags give.
    pub fn config(&self) -> TrainConfig {
        TrainConfig {
            objective: match self.objective {
                ObjectiveArg::L1 => Objective::L1 {
                    l1_coeff: self.l1_coeff,
                },
                ObjectiveArg::Batchtopk => Objective::BatchTopK {
                    k: self.k,
                    aux_k: self.aux_k,
                    aux_alpha: self.aux_alpha,
                    dead_after: self.dead_after,
                },
            },
            dict_size: self.dict_size,
            batch_size: self.batch_size,
            steps: self.steps,
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            normaliser_rows: 100_000,
            target_rms: 1.0,
            dec_init_norm: self.dec_init_norm,
            validation_fraction: self.validation_fraction,
            chunk_rows: self.chunk_rows,
        }
    }
}

/// What `diff train` reports (`train_log.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainReport {
    pub config: TrainConfig,
    pub store: String,
    pub models: Vec<String>,
    pub hooks: Vec<String>,
    pub rows: usize,
    pub resumed_from: usize,
    /// Rows of the store at the checkpoint, when the store (harvested in parts) grew since.
    #[serde(default)]
    pub store_grew_from: Option<usize>,
    /// Wall time of this run (s).
    pub seconds_this_run: f64,
    /// Training rows per second in this run.
    pub rows_per_second: f64,
    pub log: Vec<persona_lens_diffing::train::StepLog>,
    /// Rows training drew from, and per latent (at least 20 for a dictionary this size).
    pub train_rows: usize,
    pub rows_per_latent: f64,
    /// The final crosscoder on the held-out samples.
    pub validation: Option<persona_lens_diffing::train::Validation>,
}

pub fn train(a: TrainArgs) -> Result<()> {
    let r = train_with(&a)?;
    let last = r.log.last().context("no steps")?;
    println!(
        "trained {} steps ({} this run, {:.0} rows/s) on {} rows ({:.1} per latent): last batch loss {:.4}, FVE {:.3}, L0 {:.1}, dead {:.2} -> {}",
        r.config.steps,
        r.config.steps - r.resumed_from,
        r.rows_per_second,
        r.train_rows,
        r.rows_per_latent,
        last.loss,
        last.fve,
        last.l0,
        last.dead_fraction,
        a.out.display()
    );
    match &r.validation {
        Some(v) => println!(
            "validation ({} held-out samples, {} rows): FVE {:.3}, L0 {:.1}, dead {:.2}",
            v.samples, v.rows, v.fve, v.l0, v.dead_fraction
        ),
        None => println!("validation: none (no held-out samples)"),
    }
    Ok(())
}

/// Trains a crosscoder on `a.store` into `a.out` (weights, checkpoint, `train_log.json`, plot).
pub fn train_with(a: &TrainArgs) -> Result<TrainReport> {
    if let Some(t) = a.threads {
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let store = PairedStore::open(&a.store)?;
    let cfg = a.config();
    let ckpt = a.out.join("checkpoint");
    if !a.resume && ckpt.join("checkpoint.json").exists() {
        bail!(
            "{} holds a checkpoint; pass --resume to continue it or choose another --out",
            ckpt.display()
        );
    }
    let pb = progress(a.steps as u64, a.quiet, "steps");
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let out = run_train(&store, &cfg, &ckpt, a.resume, None, &|s| {
        pb.set_position(s.step as u64 + 1);
        pb.set_message(format!(
            "loss {:.4} FVE {:.3} L0 {:.1} dead {:.2}",
            s.loss, s.fve, s.l0, s.dead_fraction
        ));
    })?;
    pb.finish_and_clear();
    let cc = out.crosscoder;
    cc.save(&a.out)?;
    let report = TrainReport {
        config: cfg.clone(),
        store: a.store.display().to_string(),
        models: store.meta.models.clone(),
        hooks: store.meta.hooks.clone(),
        rows: store.meta.rows,
        resumed_from: out.resumed_from,
        store_grew_from: out.store_grew_from,
        seconds_this_run: out.seconds,
        rows_per_second: ((cfg.steps - out.resumed_from) * cfg.batch_size) as f64
            / out.seconds.max(1e-9),
        log: out.log.clone(),
        train_rows: out.train_rows,
        rows_per_latent: out.train_rows as f64 / cfg.dict_size as f64,
        validation: out.validation.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&report)?;
    persona_lens_engine::io::write_atomic(&a.out.join("train_log.json"), &bytes)?;
    let series = |name: &str, f: &dyn Fn(&persona_lens_diffing::train::StepLog) -> f64| Series {
        name: name.into(),
        x: out.log.iter().map(|s| s.step as f64).collect(),
        y: out.log.iter().map(f).collect(),
        ..Default::default()
    };
    save_line_chart(
        &LineChart {
            title: "Crosscoder training".into(),
            x_label: "step".into(),
            y_label: "value".into(),
            series: vec![
                series("loss", &|s| s.loss),
                series("MSE (normalised units)", &|s| s.mse),
                series("FVE", &|s| s.fve),
            ],
            caption: format!(
                "{} | {} | F = {} | batch {} | seed {}",
                store.meta.models.join(" vs "),
                store.meta.hooks.join(" / "),
                cfg.dict_size,
                cfg.batch_size,
                cfg.seed
            ),
            ..Default::default()
        },
        &a.out.join("training"),
    )?;
    Ok(report)
}

fn load_crosscoder(p: &Path) -> Result<CrossCoder> {
    match load_dictionary(p)? {
        Dictionary::CrossCoder(c) => Ok(*c),
        Dictionary::Sae(_) => bail!(
            "{} is a single-model SAE; model diffing needs a crosscoder",
            p.display()
        ),
    }
}

fn check_width(cc: &CrossCoder, p: &Pair) -> Result<()> {
    let d = p.models[0]
        .config()
        .d_model
        .max(p.models[1].config().d_model);
    if cc.n_models() != 2 || cc.activation_dim() != d {
        bail!(
            "crosscoder shape (n_models {}, d {}) does not match models {} (d {}) and {} (d {}): it expects width {}; use the models and hooks it was trained on",
            cc.n_models(),
            cc.activation_dim(),
            p.models[0].info.name,
            p.models[0].config().d_model,
            p.models[1].info.name,
            p.models[1].config().d_model,
            cc.activation_dim()
        );
    }
    Ok(())
}

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AnalyzeArgs {
    #[command(flatten)]
    pub pair: PairArgs,
    #[command(flatten)]
    pub ds: DatasetArgs,
    /// Crosscoder folder or weights file; without it, the direct activation comparison.
    #[arg(long)]
    pub crosscoder: Option<PathBuf>,
    /// The paired store it was trained on (Latent Scaling, max-activating examples).
    #[arg(long)]
    pub store: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    #[arg(long, default_value_t = 3)]
    pub n_verify: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "out/diff/analysis")]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn analyze(a: AnalyzeArgs) -> Result<()> {
    let s = analyze_with(&a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    print!("{}", persona_lens_diffing::analyze::report_md(&s));
    println!("\nwrote {}", a.out.display());
    Ok(())
}

/// Runs the analysis into `a.out` (summary.json, plots, report.md); returns the summary.
pub fn analyze_with(a: &AnalyzeArgs) -> Result<persona_lens_diffing::analyze::Summary> {
    let ds = a.ds.load()?;
    persona_lens_diffing::analyze::check_splits(&ds, a.seed)?;
    let p = a.pair.load()?;
    let cc = match &a.crosscoder {
        Some(c) => {
            let cc = load_crosscoder(c)?;
            check_width(&cc, &p)?;
            Some(cc)
        }
        None => None,
    };
    let store = match &a.store {
        Some(s) => Some(PairedStore::open(s)?),
        None => None,
    };
    let spec = AnalyzeSpec {
        shared_ids: p.shared_ids,
        hooks: p.hooks,
        chat_template: p.template,
        alignment: Some(Alignment::Last),
        batch_size: a.pair.batch_size,
        crosscoder: cc.as_ref().map(|c| {
            (
                c,
                a.crosscoder
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            )
        }),
        store: store.as_ref(),
        top_k: a.top_k,
        n_verify: a.n_verify,
        seed: a.seed,
    };
    let quiet = a.pair.quiet || a.json;
    Ok(run_analyze(
        [&p.models[0], &p.models[1]],
        &ds,
        &spec,
        &a.out,
        &|step| {
            if !quiet {
                eprintln!("… {step}");
            }
        },
    )?)
}

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub pair: PairArgs,
    #[arg(long)]
    pub crosscoder: PathBuf,
    /// Latents to verify (comma separated).
    #[arg(long, value_delimiter = ',', required = true)]
    pub latent: Vec<usize>,
    /// Prompts: JSON list of {"expected": "ACTIVATE|SILENT|NEUTRAL", "prompt": "..."} or lines
    /// "EXPECTED<TAB>prompt"; default: the notebook's list plus persona-lens's own.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Seed of the verification's label permutations.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "out/diff/verify")]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
}

fn read_prompts(p: &Path) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    let rows: Vec<(String, String)> =
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            let arr = v
                .as_array()
                .context("expected a JSON list of {expected, prompt}")?;
            arr.iter()
                .map(|o| -> Result<(String, String)> {
                    Ok((
                        o.get("expected")
                            .and_then(|e| e.as_str())
                            .context("item without \"expected\"")?
                            .to_uppercase(),
                        o.get("prompt")
                            .and_then(|e| e.as_str())
                            .context("item without \"prompt\"")?
                            .to_string(),
                    ))
                })
                .collect::<Result<_>>()?
        } else {
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| -> Result<(String, String)> {
                    let (e, q) = l
                        .split_once('\t')
                        .with_context(|| format!("line without a tab: {l}"))?;
                    Ok((e.trim().to_uppercase(), q.trim().to_string()))
                })
                .collect::<Result<_>>()?
        };
    for (e, _) in &rows {
        if !matches!(e.as_str(), "ACTIVATE" | "SILENT" | "NEUTRAL") {
            bail!(
                "{}: expected must be ACTIVATE, SILENT or NEUTRAL, got '{e}'",
                p.display()
            );
        }
    }
    Ok(rows)
}

pub fn verify(a: VerifyArgs) -> Result<()> {
    let results = verify_with(&a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    for r in &results {
        println!(
            "latent {}: {} ({}/{} pass, permutation p = {:.4}; {})",
            r.feature_idx,
            if r.verified {
                "verified"
            } else {
                "not verified"
            },
            r.passed,
            r.checked,
            r.p_value,
            r.rule
        );
        for row in &r.rows {
            println!(
                "  {} [{:8}] {:+.4} | {}",
                match row.pass {
                    Some(true) => "✓",
                    Some(false) => "✗",
                    None => " ",
                },
                row.expected,
                row.activation,
                row.prompt
            );
        }
    }
    Ok(())
}

/// Verifies the chosen latents on the prompts; writes `verification.json` and one bar plot per
/// latent into `a.out` and returns the results.
pub fn verify_with(a: &VerifyArgs) -> Result<Vec<persona_lens_diffing::persona::Verification>> {
    let p = a.pair.load()?;
    let cc = load_crosscoder(&a.crosscoder)?;
    check_width(&cc, &p)?;
    if let Some(&bad) = a.latent.iter().find(|&&l| l >= cc.dict_size()) {
        bail!(
            "latent {bad} is out of range: the crosscoder has {} latents",
            cc.dict_size()
        );
    }
    let prompts = match &a.prompts {
        Some(f) => read_prompts(f)?,
        None => corpus::verification_prompts()
            .iter()
            .map(|(e, q)| (e.to_string(), q.to_string()))
            .collect(),
    };
    let items: Vec<CorpusItem> = prompts
        .iter()
        .enumerate()
        .map(|(i, (e, q))| CorpusItem {
            id: format!("verify/{i}/{e}"),
            source: "verification".into(),
            text: q.clone(),
        })
        .collect();
    let spec = AnalyzeSpec {
        shared_ids: p.shared_ids,
        hooks: p.hooks,
        chat_template: p.template,
        alignment: Some(Alignment::Last),
        batch_size: a.pair.batch_size,
        crosscoder: None,
        store: None,
        top_k: 10,
        n_verify: 0,
        seed: 0,
    };
    let x = rows_of(
        [&p.models[0], &p.models[1]],
        &items,
        &spec,
        &a.out.join(".tmp_rows"),
    )?;
    let acts = cc.get_activations(&x, true)?;
    let mut results = vec![];
    for &l in &a.latent {
        let v: Vec<f32> = acts.narrow(1, l, 1)?.squeeze(1)?.to_vec1()?;
        let v: Vec<f64> = v.into_iter().map(f64::from).collect();
        let r = verify_rows(l, &prompts, &v, a.seed);
        save_bar_chart(
            &BarChart {
                title: format!(
                    "Verification: latent #{l} ({}/{} pass, {})",
                    r.passed,
                    r.checked,
                    if r.verified {
                        "verified"
                    } else {
                        "not verified"
                    }
                ),
                x_label: format!("latent #{l} activation (scaled)"),
                bars: r
                    .rows
                    .iter()
                    .map(|row| Bar {
                        label: row.prompt.chars().take(55).collect(),
                        value: row.activation,
                        err: None,
                        group: match row.expected.as_str() {
                            "ACTIVATE" => 2,
                            "SILENT" => 1,
                            _ => 7,
                        },
                    })
                    .collect(),
                groups: vec![],
                caption: format!(
                    "{} vs {} | {} / {} | last token | green ACTIVATE, red SILENT, grey NEUTRAL",
                    p.models[0].info.name, p.models[1].info.name, p.hooks[0], p.hooks[1]
                ),
            },
            &a.out.join(format!("verification_{l}")),
        )?;
        results.push(r);
    }
    let bytes = serde_json::to_vec_pretty(&results)?;
    persona_lens_engine::io::write_atomic(&a.out.join("verification.json"), &bytes)?;
    Ok(results)
}

#[derive(Args)]
pub struct EncodeArgs {
    /// Crosscoder or SAE: a folder or weights file of any supported layout.
    #[arg(long)]
    pub crosscoder: PathBuf,
    /// safetensors file with tensor `x` (batch, n_models, d) (SAEs: (batch, d)).
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// BatchTopK: the learned threshold (true, inference) or batch top-k (false).
    #[arg(long, default_value = "true", action = clap::ArgAction::Set)]
    pub use_threshold: bool,
}

pub fn encode(a: EncodeArgs) -> Result<()> {
    let dict = load_dictionary(&a.crosscoder)?;
    let mut t = candle_core::safetensors::load(&a.input, &Device::Cpu).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {}: {} (expected a safetensors file with tensor 'x')",
            a.input.display(),
            e.to_string().lines().next().unwrap_or("")
        )
    })?;
    let x = t
        .remove("x")
        .with_context(|| format!("{} has no tensor named 'x'", a.input.display()))?;
    let e = encode_tensor(
        &dict,
        &x,
        a.use_threshold,
        &format!("tensor 'x' of {}", a.input.display()),
    )?;
    let mut md = HashMap::new();
    md.insert("dictionary".to_string(), dict.describe());
    md.insert("source".to_string(), a.crosscoder.display().to_string());
    md.insert("use_threshold".to_string(), a.use_threshold.to_string());
    persona_lens_engine::io::save_safetensors(
        &[
            ("features".to_string(), e.features.contiguous()?),
            (
                "scaled_features".to_string(),
                e.scaled_features.contiguous()?,
            ),
            ("reconstruction".to_string(), e.reconstruction.contiguous()?),
        ],
        md,
        &a.out,
    )?;
    println!(
        "{} -> {} ({})",
        a.input.display(),
        a.out.display(),
        dict.describe()
    );
    Ok(())
}

/// A dictionary's codes for a batch of activations.
pub struct Encoded {
    /// (batch, dict_size): the latent activations as the dictionary defines them.
    pub features: Tensor,
    /// Features times the decoder norms (crosscoders); the features themselves for SAEs.
    pub scaled_features: Tensor,
    /// The dictionary's reconstruction of `x`, same shape as `x`.
    pub reconstruction: Tensor,
}

/// Encodes `x` ((batch, n_models, d) for crosscoders, (batch, d) for SAEs) with `dict`;
/// `what` names `x` in errors.
pub fn encode_tensor(
    dict: &Dictionary,
    x: &Tensor,
    use_threshold: bool,
    what: &str,
) -> Result<Encoded> {
    let x = x.to_dtype(DType::F32)?;
    // ReLU / top-k turn NaN pre-activations into zeros: refuse them instead of encoding them.
    persona_lens_engine::layers::check_finite(&x, what, || {
        "activations to encode must be finite".into()
    })?;
    let (features, scaled_features, reconstruction) = match dict {
        Dictionary::CrossCoder(cc) => {
            let f = cc.encode(&x, use_threshold)?;
            let s = f.broadcast_mul(&cc.feature_scale()?)?;
            // `forward` always uses the threshold, as Python's does
            let r = cc.forward(&x)?;
            (f, s, r)
        }
        Dictionary::Sae(s) => {
            let f = s.encode(&x)?;
            let r = s.decode(&f)?;
            (f.clone(), f, r)
        }
    };
    Ok(Encoded {
        features,
        scaled_features,
        reconstruction,
    })
}
