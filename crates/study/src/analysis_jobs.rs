//! Dataset analyses: harvest, probe, direction, lens.

use crate::engine_jobs::{load_model, progress};
use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use persona_lens_analysis::dataset::{self, GenOptions, PersonaDataset};
use persona_lens_analysis::direction::{self, DirectionKind, LayerRef};
use persona_lens_analysis::harvest::{Harvest, HarvestSpec, PositionRule};
use persona_lens_analysis::lens::{self, DEFAULT_EXPERT_WORDS, DEFAULT_SIMPLE_WORDS};
use persona_lens_analysis::probe::{self, ProbeOptions};
use persona_lens_analysis::{npy, resid_rows, write_json};
use persona_lens_engine::{HookName, Model};
use persona_lens_report::{save_line_chart, LineChart, Series};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Which prompts: the built-in generator (default) or a user file.
#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetArgs {
    /// A dataset JSON in the crosscoder notes' schema (`prompt_pairs.expertise_level[]`, ...).
    /// Default: the built-in persona dataset.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Built-in persona pairs (comma separated): child-phd, beginner-expert,
    /// layperson-professional, student-professor.
    #[arg(long, value_delimiter = ',', default_value = "child-phd")]
    pub persona_pair: Vec<String>,
    /// Topics of the built-in set or pair ids of a file (e.g. physics), comma separated; default all.
    #[arg(long, value_delimiter = ',')]
    pub pair_id: Vec<String>,
    /// Questions per topic (0 = all 10).
    #[arg(long, default_value_t = 0)]
    pub n_questions_per_pair: usize,
    /// Persona paraphrase indices of the built-in set (default: all).
    #[arg(long, value_delimiter = ',')]
    pub templates: Vec<usize>,
    /// Add the built-in lexical controls (prompts that keep the other class's key tokens, e.g.
    /// "I'm 5 years into my PhD"): probes are tested on them, never trained.
    #[arg(long)]
    pub lexical_controls: bool,
    /// Seed of the selection / evaluation split (questions and persona paraphrases halved).
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Keep only one half: select or evaluate (default: both, marked).
    #[arg(long)]
    pub split: Option<dataset::Split>,
    /// Render prompts with the chat template (default: only for instruction-tuned models).
    #[arg(long, conflicts_with = "no_chat")]
    pub chat: bool,
    /// Never use the chat template.
    #[arg(long)]
    pub no_chat: bool,
}

impl DatasetArgs {
    pub fn load(&self) -> Result<PersonaDataset> {
        let ds = match &self.dataset {
            Some(p) => dataset::load_file(p)?,
            None => dataset::generate(&GenOptions {
                persona_pairs: self.persona_pair.clone(),
                topics: vec![],
                n_questions_per_pair: self.n_questions_per_pair,
                templates: self.templates.clone(),
                include_neutral: false,
                include_lexical_controls: self.lexical_controls,
            })?,
        };
        let mut ds = dataset::select_pairs(ds, &self.pair_id)?;
        ds.assign_splits(self.split_seed);
        Ok(match self.split {
            Some(s) => ds.in_split(s),
            None => ds,
        })
    }
    pub fn chat(&self, m: &Model) -> bool {
        if self.chat {
            return true;
        }
        !self.no_chat && m.is_chat_model()
    }
}

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HarvestOpts {
    /// Position rule: last, question_last_token or persona_mean.
    #[arg(long, default_value = "last")]
    pub position: persona_lens_analysis::PositionRule,
    /// Prompts per forward call.
    #[arg(long, default_value_t = 16, value_parser = crate::at_least_one)]
    pub batch_size: usize,
    /// Output directory (activations are stored and reused here).
    #[arg(long, default_value = "out/probe")]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

fn harvest_into(
    model: &Model,
    ds: &PersonaDataset,
    hooks: Vec<HookName>,
    chat: bool,
    h: &HarvestOpts,
    quiet: bool,
) -> Result<Harvest> {
    let spec = HarvestSpec {
        hooks,
        rule: h.position,
        chat,
        batch_size: h.batch_size,
        share_prefix: true,
    };
    let pb = progress(ds.items.len() as u64, quiet, "prompts harvested");
    let (hv, reused) = Harvest::load_or_run(&h.out, model, ds, &spec, &|n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    if reused && !quiet {
        eprintln!("reusing activations in {}", h.out.display());
    }
    Ok(hv)
}

fn resid_hooks(model: &Model, max_layers: Option<usize>) -> Vec<HookName> {
    let n = model.config().n_layers;
    let rows = resid_rows(n);
    match max_layers {
        Some(l) => rows.into_iter().take(l.min(n) + 1).collect(),
        None => rows,
    }
}

// ---------------- harvest ----------------

#[derive(Args)]
pub struct HarvestArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DatasetArgs,
    #[command(flatten)]
    pub h: HarvestOpts,
    /// Hooks to harvest: `resid` (every residual row) or a pattern like `blocks.*.hook_attn_out`.
    #[arg(long, default_value = "resid")]
    pub hooks: String,
}

pub fn harvest(a: HarvestArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let ds = a.data.load()?;
    let hooks = if a.hooks == "resid" {
        resid_hooks(&model, None)
    } else {
        model.resolve_hooks(&a.hooks)?
    };
    let chat = a.data.chat(&model);
    let hv = harvest_into(&model, &ds, hooks, chat, &a.h, a.h.quiet || a.model.json)?;
    let summary = json!({
        "out": a.h.out, "n_prompts": hv.meta.items.len(), "hooks": hv.meta.hooks.len(),
        "position_rule": hv.meta.position_rule, "chat": chat, "dataset_hash": hv.meta.dataset_hash,
        "class_counts": ds.class_counts(),
    });
    if a.model.json {
        println!("{summary}");
    } else {
        println!(
            "harvested {} prompts x {} hooks at position '{}' (chat template: {chat}) -> {}",
            hv.meta.items.len(),
            hv.meta.hooks.len(),
            hv.meta.position_rule,
            a.h.out.join("activations.safetensors").display()
        );
    }
    Ok(())
}

// ---------------- probe ----------------

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DatasetArgs,
    #[command(flatten)]
    pub h: HarvestOpts,
    /// Probe residual rows 0..=L only (row 0 = embeddings).
    #[arg(long)]
    pub max_layers: Option<usize>,
    /// Classes to separate (dataset `class` values); with --by-persona, persona names.
    #[arg(long, value_delimiter = ',', default_value = "novice,expert")]
    pub classes: Vec<String>,
    /// Label prompts by persona name (multi-class: child, phd, beginner, ...).
    #[arg(long)]
    pub by_persona: bool,
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// L2 strength (standardised features).
    #[arg(long, default_value_t = 1e-2, allow_hyphen_values = true)]
    pub l2: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate on held-out phrasing templates (default on).
    #[arg(long, default_value_t = true, overrides_with = "no_template_holdout")]
    pub template_holdout: bool,
    #[arg(long)]
    pub no_template_holdout: bool,
    /// Skip the held-out question / topic / persona-pair evaluations.
    #[arg(long)]
    pub no_generalization: bool,
}

pub fn probe_plot(r: &probe::ProbeReport, stem: &Path) -> Result<Vec<PathBuf>> {
    let x: Vec<f64> = r
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| l.resid_index.unwrap_or(i) as f64)
        .collect();
    let mut series = vec![
        Series {
            name: "train".into(),
            x: x.clone(),
            y: r.layers.iter().map(|l| l.train_accuracy).collect(),
            dashed: true,
            ..Default::default()
        },
        Series {
            name: format!("{}-fold CV (95% Wilson)", r.options.folds),
            x: x.clone(),
            y: r.layers.iter().map(|l| l.cv.accuracy).collect(),
            band: Some((
                r.layers.iter().map(|l| l.cv.accuracy_ci95.0).collect(),
                r.layers.iter().map(|l| l.cv.accuracy_ci95.1).collect(),
            )),
            dashed: false,
        },
    ];
    if r.layers.iter().all(|l| l.template_holdout.is_some()) {
        let m = |l: &probe::LayerProbe| l.template_holdout.clone().unwrap_or_else(|| l.cv.clone());
        series.push(Series {
            name: "held-out templates".into(),
            x: x.clone(),
            y: r.layers.iter().map(|l| m(l).accuracy).collect(),
            band: Some((
                r.layers.iter().map(|l| m(l).accuracy_ci95.0).collect(),
                r.layers.iter().map(|l| m(l).accuracy_ci95.1).collect(),
            )),
            dashed: false,
        });
    }
    let control: Option<Vec<f64>> = r
        .layers
        .iter()
        .map(|l| l.control.as_ref().map(|c| c.accuracy))
        .collect();
    if let Some(y) = control {
        series.push(Series {
            name: "control (shuffled labels)".into(),
            x: x.clone(),
            y,
            dashed: true,
            ..Default::default()
        });
    }
    let chart = LineChart {
        title: format!("Probe accuracy by layer: {}", r.classes.join(" vs ")),
        x_label: "residual row (0 = embeddings, i = output of block i-1)".into(),
        y_label: "accuracy".into(),
        series,
        y_range: Some((0.0, 1.02)),
        hline: Some((r.chance_accuracy, "chance".into())),
        caption: format!(
            "model {} | position {} | n={} | dataset {} | seed {} | l2 {}",
            r.model, r.position_rule, r.n_prompts, r.dataset_hash, r.options.seed, r.options.l2
        ),
    };
    Ok(save_line_chart(&chart, stem)?)
}

/// The probe's options from its flags, checked (before any model loads or harvest runs).
fn probe_options(a: &ProbeArgs) -> Result<ProbeOptions> {
    let opts = ProbeOptions {
        l2: a.l2,
        folds: a.folds,
        seed: a.seed,
        template_holdout: a.template_holdout && !a.no_template_holdout,
        control: true,
        bootstrap: 200,
        generalization: !a.no_generalization,
    };
    opts.validate()?;
    probe::validate_classes(&a.classes)?;
    Ok(opts)
}

pub fn run_probe(model: &Model, a: &ProbeArgs, quiet: bool) -> Result<probe::ProbeReport> {
    let opts = probe_options(a)?;
    let ds = a.data.load()?;
    let chat = a.data.chat(model);
    let hooks = resid_hooks(model, a.max_layers);
    let hv = harvest_into(model, &ds, resid_hooks(model, None), chat, &a.h, quiet)?;
    let names: Vec<String> = hooks.iter().map(|h| h.to_string()).collect();
    // The prompts' tokens, in the harvest's order, for the bag-of-tokens baseline.
    let by_id: std::collections::HashMap<&str, &dataset::PromptItem> =
        ds.items.iter().map(|i| (i.id.as_str(), i)).collect();
    let token_ids = hv
        .meta
        .items
        .iter()
        .map(|it| {
            let item = by_id
                .get(it.id.as_str())
                .with_context(|| format!("harvested prompt {} is not in the dataset", it.id))?;
            Ok(dataset::encode_item(model, item, chat)?.ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let pb = progress(names.len() as u64, quiet, "layers probed");
    let r = probe::probe_layers_with_baseline(
        &hv,
        &names,
        &a.classes,
        a.by_persona,
        &opts,
        Some(&token_ids),
        &|| pb.inc(1),
    )?;
    pb.finish_and_clear();
    write_json(&a.h.out.join("probe.json"), &r)?;
    // The fitted probes, loadable by `conversation` and `serve --probes`.
    persona_lens_analysis::user_model::ProbeWeights::from_report(&r, chat)?.save(
        &a.h.out
            .join(persona_lens_analysis::user_model::PROBE_WEIGHTS_FILE),
    )?;
    probe_plot(&r, &a.h.out.join("probe_accuracy"))?;
    Ok(r)
}

pub fn probe(a: ProbeArgs) -> Result<()> {
    probe_options(&a)?;
    let model = load_model(&a.model)?;
    let quiet = a.h.quiet || a.model.json;
    let r = run_probe(&model, &a, quiet)?;
    if a.model.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "probe {} | model {} | {} prompts {:?} | position {} | {} templates | {:.1} s",
        r.classes.join(" vs "),
        r.model,
        r.n_prompts,
        r.class_counts,
        r.position_rule,
        r.n_templates,
        r.seconds
    );
    println!(
        "{:>4} {:>7} {:>7} {:>15} {:>7} {:>9} {:>8} {:>7}",
        "row", "train", "cv acc", "cv 95% CI", "cv AUC", "held-out", "control", "select."
    );
    for l in &r.layers {
        println!(
            "{:>4} {:>7.3} {:>7.3} {:>15} {:>7} {:>9} {:>8} {:>7}",
            l.resid_index
                .map(|v| v.to_string())
                .unwrap_or(l.hook.clone()),
            l.train_accuracy,
            l.cv.accuracy,
            format!("[{:.3}, {:.3}]", l.cv.accuracy_ci95.0, l.cv.accuracy_ci95.1),
            l.cv.auc.map(|v| format!("{v:.3}")).unwrap_or("-".into()),
            l.template_holdout
                .as_ref()
                .map(|m| format!("{:.3}", m.accuracy))
                .unwrap_or("-".into()),
            l.control
                .as_ref()
                .map(|m| format!("{:.3}", m.accuracy))
                .unwrap_or("-".into()),
            l.selectivity
                .map(|v| format!("{v:+.3}"))
                .unwrap_or("-".into()),
        );
    }
    if let Some(b) = &r.bag_of_tokens {
        println!(
            "bag-of-tokens baseline ({} token types): cv {:.3} [{:.3}, {:.3}], held-out {}; a row beats string matching only above it",
            b.n_features,
            b.cv.accuracy,
            b.cv.accuracy_ci95.0,
            b.cv.accuracy_ci95.1,
            b.template_holdout
                .as_ref()
                .map(|m| format!("{:.3}", m.accuracy))
                .unwrap_or("-".into()),
        );
    }
    print_generalization(&r);
    println!(
        "chance {:.3}; wrote {}/probe.json, probe_weights.json and probe_accuracy.png/.svg",
        r.chance_accuracy,
        a.h.out.display()
    );
    Ok(())
}

/// Held-out accuracies per row beside the bag-of-tokens baseline's.
fn print_generalization(r: &probe::ProbeReport) {
    type Column = (
        &'static str,
        fn(&probe::Generalization) -> Option<&probe::Metrics>,
    );
    let cols: [Column; 5] = [
        ("questions", |g| g.question_holdout.as_ref()),
        ("topics", |g| g.topic_holdout.as_ref()),
        ("pairs", |g| g.pair_transfer.as_ref()),
        ("lex.ctrl", |g| g.lexical_controls.as_ref()),
        ("sel->eval", |g| g.split_transfer.as_ref()),
    ];
    let present: Vec<_> = cols
        .iter()
        .filter(|(_, f)| r.layers.iter().any(|l| f(&l.generalization).is_some()))
        .collect();
    if present.is_empty() {
        return;
    }
    let cell = |m: Option<&probe::Metrics>| {
        m.map(|m| format!("{:.3}", m.accuracy))
            .unwrap_or("-".into())
    };
    let mut head = format!("{:>4}", "row");
    for (name, _) in &present {
        head += &format!(" {name:>9}");
    }
    println!("held-out accuracy (never trained on what it tests):\n{head}");
    for l in &r.layers {
        let mut line = format!(
            "{:>4}",
            l.resid_index
                .map(|v| v.to_string())
                .unwrap_or(l.hook.clone())
        );
        for (_, f) in &present {
            line += &format!(" {:>9}", cell(f(&l.generalization)));
        }
        println!("{line}");
    }
    if let Some(b) = &r.bag_of_tokens {
        let mut line = format!("{:>4}", "bag");
        for (_, f) in &present {
            line += &format!(" {:>9}", cell(f(&b.generalization)));
        }
        println!("{line}");
    }
}

// ---------------- direction ----------------

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DirectionArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DatasetArgs,
    #[command(flatten)]
    pub h: HarvestOpts,
    #[arg(long, default_value = "novice")]
    pub novice_class: String,
    #[arg(long, default_value = "expert")]
    pub expert_class: String,
    /// Also export this layer's direction as persona_direction.npy (see --align-probe-index).
    #[arg(long)]
    pub layer: Option<usize>,
    /// --layer counts like the probe / HF hidden_states (0 = embeddings, L = input of block L);
    /// without it, --layer L is block L's output (hook_resid_post).
    #[arg(long)]
    pub align_probe_index: bool,
    /// Direction exported to .npy: diff_of_means or probe.
    #[arg(long, default_value = "diff_of_means")]
    pub kind: DirectionKind,
    #[arg(long, default_value_t = 1e-2)]
    pub l2: f64,
}

pub fn direction(a: DirectionArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    direction_with(&model, &a, true).map(|_| ())
}

/// Persona directions on a loaded model; writes directions.safetensors/.json (and the .npy
/// export with --layer); prints unless `print` is false. Returns the directions' metadata.
pub fn direction_with(
    model: &Model,
    a: &DirectionArgs,
    print: bool,
) -> Result<direction::DirectionMeta> {
    let quiet = a.h.quiet || a.model.json;
    let ds = a.data.load()?;
    ds.require_classes(&[&a.novice_class, &a.expert_class])?;
    let kind = a.kind;
    let n = model.config().n_layers;
    let row = a
        .layer
        .map(|l| LayerRef::from_flag(l, a.align_probe_index).row());
    if let (Some(l), Some(r)) = (a.layer, row) {
        if r > n {
            bail!(
                "--layer {l} is out of range: this model has {n} blocks (residual rows 0..={n}); use --layer 0..={}",
                if a.align_probe_index { n } else { n - 1 }
            );
        }
    }
    let chat = a.data.chat(model);
    let hooks = resid_hooks(model, None);
    let hv = harvest_into(model, &ds, hooks.clone(), chat, &a.h, quiet)?;
    let names: Vec<String> = hooks.iter().map(|h| h.to_string()).collect();
    let set = direction::compute(&hv, &names, &a.novice_class, &a.expert_class, a.l2)?;
    set.save(&a.h.out.join("directions.safetensors"))?;
    write_json(&a.h.out.join("directions.json"), &set.meta)?;
    let mut exported = None;
    if let Some(r) = row {
        let (hook, v) = set.at_row(r, kind)?;
        let p = a.h.out.join("persona_direction.npy");
        npy::write(&p, &v, &[v.len()])?;
        let side = json!({"file": "persona_direction.npy", "hook": hook, "resid_index": r,
            "layer_arg": a.layer, "align_probe_index": a.align_probe_index, "kind": a.kind,
            "model": set.meta.model, "position_rule": set.meta.position_rule,
            "dataset_hash": set.meta.dataset_hash,
            "norm": v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()});
        write_json(&a.h.out.join("persona_direction.json"), &side)?;
        exported = Some((hook, r, p));
    }
    if !print {
        return Ok(set.meta);
    }
    if a.model.json {
        println!("{}", serde_json::to_string(&set.meta)?);
        return Ok(set.meta);
    }
    println!(
        "persona directions ({} - {}) for {} residual rows, model {}, position {}",
        a.expert_class,
        a.novice_class,
        names.len(),
        set.meta.model,
        set.meta.position_rule
    );
    println!(
        "{:>4} {:>12} {:>8} {:>14}",
        "row", "|mean diff|", "d'", "cos(probe,mean)"
    );
    for (i, r) in set.meta.resid_index.iter().enumerate() {
        println!(
            "{:>4} {:>12.3} {:>8.2} {:>14.3}",
            r.unwrap_or(i),
            set.meta.diff_of_means_norm[i],
            set.meta.diff_of_means_dprime[i],
            set.meta.cosine_probe_vs_means[i]
        );
    }
    if let Some((hook, r, p)) = exported {
        println!("exported {} (row {r} = {hook}) to {}", a.kind, p.display());
    }
    Ok(set.meta)
}

// ---------------- lens ----------------

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LensArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// One prompt (prints the per-layer top-k); without it, the lens runs over the dataset.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Token position for --prompt (default: last).
    #[arg(long)]
    pub position: Option<usize>,
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    #[command(flatten)]
    pub data: DatasetArgs,
    /// Dataset mode: position rule (last or question_last_token).
    #[arg(long, default_value = "last")]
    pub rule: PositionRule,
    /// Expert words to track (single tokens), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub expert_words: Vec<String>,
    /// Simple words to track (single tokens), comma separated.
    #[arg(long, value_delimiter = ',')]
    pub simple_words: Vec<String>,
    #[arg(long, default_value = "out/lens")]
    pub out: PathBuf,
    /// Dataset mode: a folder with stored activations of every residual row (e.g. `probe`'s
    /// --out); prompts it holds at the same position rule are read from it, not re-run.
    #[arg(long)]
    pub activations: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
}

pub fn lens_plot(r: &lens::DatasetLens, stem: &Path) -> Result<Vec<PathBuf>> {
    let series = r
        .personas
        .iter()
        .map(|p| Series {
            name: format!("{} (n={})", p.persona, p.n_prompts),
            x: (0..p.logit_diff_mean.len()).map(|i| i as f64).collect(),
            y: p.logit_diff_mean.clone(),
            band: Some((
                p.logit_diff_ci95.iter().map(|c| c.0).collect(),
                p.logit_diff_ci95.iter().map(|c| c.1).collect(),
            )),
            dashed: false,
        })
        .collect();
    // Row 0 (the bare embedding) sits far below the rest and would flatten every other row:
    // fit the y range to rows 1.. and say so in the caption.
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for p in &r.personas {
        for (m, c) in p.logit_diff_mean.iter().zip(&p.logit_diff_ci95).skip(1) {
            lo = lo.min(c.0.min(*m));
            hi = hi.max(c.1.max(*m));
        }
    }
    let row0 = r
        .personas
        .first()
        .map(|p| p.logit_diff_mean[0])
        .unwrap_or(0.0);
    let y_range = (lo.is_finite() && hi > lo).then(|| {
        let pad = (hi - lo) * 0.1;
        (lo.min(0.0) - pad, hi.max(0.0) + pad)
    });
    let words = |w: &[lens::TrackedWord]| {
        w.iter()
            .map(|w| w.word.clone())
            .collect::<Vec<_>>()
            .join(",")
    };
    let chart = LineChart {
        title: {
            let t = format!(
                "Logit lens: [{}] minus [{}]",
                words(&r.expert_words),
                words(&r.simple_words)
            );
            if t.chars().count() > 80 {
                "Logit lens: expert minus simple tracked words".to_string()
            } else {
                t
            }
        },
        x_label: "residual row (0 = embeddings, i = output of block i-1)".into(),
        y_label: "logit difference (logits)".into(),
        series,
        y_range,
        hline: Some((0.0, "0".into())),
        caption: format!(
            "model {} | position {} | {} expert vs {} simple words (lens.json) | band: 95% CI | row 0 = {row0:.1}, off scale | dataset {}",
            r.model,
            r.position_rule,
            r.expert_words.len(),
            r.simple_words.len(),
            r.dataset_hash
        ),
    };
    Ok(save_line_chart(&chart, stem)?)
}

pub fn run_dataset_lens(model: &Model, a: &LensArgs, quiet: bool) -> Result<lens::DatasetLens> {
    let ds = a.data.load()?;
    let chat = a.data.chat(model);
    let rule = a.rule;
    let mut warnings = Vec::new();
    let mut words = |given: &[String], default: &[&str]| -> Result<Vec<lens::TrackedWord>> {
        let strict = !given.is_empty();
        let list: Vec<String> = if strict {
            given.to_vec()
        } else {
            default.iter().map(|s| s.to_string()).collect()
        };
        let (w, warn) = lens::resolve_words(model, &list, strict)?;
        warnings.extend(warn);
        Ok(w)
    };
    let expert = words(&a.expert_words, DEFAULT_EXPERT_WORDS)?;
    let simple = words(&a.simple_words, DEFAULT_SIMPLE_WORDS)?;
    if !quiet {
        for w in &warnings {
            eprintln!("warning: {w}");
        }
    }
    let pb = progress(ds.items.len() as u64, quiet, "prompts through the lens");
    let stored = match &a.activations {
        Some(dir) => Some(Harvest::load(dir).with_context(|| {
            format!(
                "--activations {}: no stored activations there (run `persona-lens probe --out {}` first)",
                dir.display(),
                dir.display()
            )
        })?),
        None => None,
    };
    let r = lens::dataset_lens_cached(
        model,
        &ds,
        chat,
        rule,
        &expert,
        &simple,
        warnings,
        stored.as_ref(),
        &|n| pb.inc(n as u64),
    )?;
    pb.finish_and_clear();
    write_json(&a.out.join("lens.json"), &r)?;
    lens_plot(&r, &a.out.join("logit_diff"))?;
    Ok(r)
}

pub fn lens(a: LensArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    if let Some(p) = &a.prompt {
        let chat = a.data.chat;
        let ids = model.encode_prompt(p, chat)?;
        let r = lens::logit_lens(&model, &ids, a.position, a.top_k)?;
        if a.model.json {
            let layers: Vec<_> = r
                .layers
                .iter()
                .map(|l| json!({"resid_index": l.resid_index, "top": l.top, "top_tokens": l.top_tokens}))
                .collect();
            println!(
                "{}",
                json!({"input_ids": r.input_ids, "position": r.position, "layers": layers})
            );
        } else {
            println!(
                "logit lens at position {} of {} tokens",
                r.position,
                ids.len()
            );
            for l in &r.layers {
                let tops: Vec<String> = l
                    .top
                    .iter()
                    .zip(&l.top_tokens)
                    .map(|((_, v), t)| format!("{t:?} {v:.2}"))
                    .collect();
                println!("{:>3}  {}", l.resid_index, tops.join("  "));
            }
        }
        return Ok(());
    }
    let quiet = a.quiet || a.model.json;
    let r = run_dataset_lens(&model, &a, quiet).context("logit lens over the dataset")?;
    if a.model.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let last = r
        .personas
        .first()
        .map(|p| p.logit_diff_mean.len())
        .unwrap_or(0);
    println!(
        "logit lens, expert-minus-simple logit difference by residual row (model {}, position {})",
        r.model, r.position_rule
    );
    for p in &r.personas {
        let mut rows: Vec<usize> = (0..last).step_by((last / 6).max(1)).collect();
        if rows.last() != Some(&(last - 1)) {
            rows.push(last - 1);
        }
        let pts: Vec<String> = rows
            .into_iter()
            .map(|i| format!("row {i}: {:+.2}", p.logit_diff_mean[i]))
            .collect();
        println!("  {:<12} {}", p.persona, pts.join("  "));
    }
    println!(
        "wrote {}/lens.json and logit_diff.png/.svg",
        a.out.display()
    );
    Ok(())
}
