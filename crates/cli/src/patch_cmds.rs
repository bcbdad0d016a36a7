//! Causal analyses: `patch` (activation patching sweeps), `attrib`, `path-patch`, `heads`, `ablate`.

use crate::analysis_cmds::DatasetArgs;
use crate::engine_cmds::{load_model, progress};
use crate::ModelArgs;
use anyhow::{bail, Result};
use clap::Args;
use persona_lens_analysis::patching::{
    auto_answers, Direction, Metric, PatchPair, Patcher, Sweep, SweepKind, SIMPLE_ANSWERS,
    TECHNICAL_ANSWERS,
};
use persona_lens_analysis::{npy, write_json};
use persona_lens_engine::Model;
use persona_lens_report::heatmap::{save_heatmap, Heatmap};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The prompt pair and metric every causal command takes.
#[derive(Args, Clone, Debug)]
pub struct PairArgs {
    /// Clean prompt (the behaviour to restore), e.g. "I am a child. Explain ...".
    #[arg(long, requires = "corrupted")]
    pub clean: Option<String>,
    /// Corrupted prompt: the clean one with the persona words swapped (same token length).
    #[arg(long, requires = "clean")]
    pub corrupted: Option<String>,
    /// Metric token a (logit[a] - logit[b]); default: chosen from simple words.
    #[arg(long)]
    pub answer_a: Option<String>,
    /// Metric token b; default: chosen from technical words.
    #[arg(long)]
    pub answer_b: Option<String>,
    /// logit-diff (default), logprob (log p(answer-a)) or kl (KL(clean || patched), nats).
    #[arg(long, default_value = "logit-diff")]
    pub metric: String,
    /// Render with the chat template.
    #[arg(long, conflicts_with = "no_chat")]
    pub chat: bool,
    #[arg(long)]
    pub no_chat: bool,
}

impl PairArgs {
    pub fn chat(&self, m: &Model) -> bool {
        self.chat || (!self.no_chat && m.is_chat_model())
    }

    /// The pair (strict equal length) and metric.
    pub fn resolve(&self, model: &Model) -> Result<(PatchPair, Metric)> {
        let (Some(c), Some(k)) = (&self.clean, &self.corrupted) else {
            bail!("give --clean TEXT and --corrupted TEXT (the same prompt with the persona words swapped)");
        };
        let pair = PatchPair::new(model, c, k, self.chat(model))?;
        let metric = self.metric_for(model, &pair)?;
        Ok((pair, metric))
    }

    pub fn metric_for(&self, model: &Model, pair: &PatchPair) -> Result<Metric> {
        let ld = match (&self.answer_a, &self.answer_b) {
            (Some(a), Some(b)) => Metric::logit_diff_words(model, a, b)?,
            (None, None) => auto_answers(
                model,
                pair,
                &SIMPLE_ANSWERS
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
                &TECHNICAL_ANSWERS
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
            )?,
            _ => bail!("give both --answer-a and --answer-b, or neither (automatic choice)"),
        };
        Ok(match self.metric.as_str() {
            "logit-diff" => ld,
            "logprob" => match ld {
                Metric::LogitDiff { a, .. } => Metric::LogProb { token: a },
                m => m,
            },
            "kl" => Metric::KlFromClean,
            m => bail!("unknown --metric '{m}'; use logit-diff, logprob or kl"),
        })
    }
}

fn parse_dir(s: &str) -> Result<Vec<Direction>> {
    Ok(match s {
        "denoise" => vec![Direction::Denoise],
        "noise" => vec![Direction::Noise],
        "both" => vec![Direction::Denoise, Direction::Noise],
        o => bail!("unknown --direction '{o}'; use denoise, noise or both"),
    })
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Denoise => "denoise",
        Direction::Noise => "noise",
    }
}

fn token_labels(model: &Model, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .enumerate()
        .map(|(_, &t)| model.tokenizer.id_to_token(t))
        .collect()
}

/// Heatmap of normalised patching scores with token or head labels.
#[allow(clippy::too_many_arguments)]
pub fn sweep_heatmap(model: &Model, p: &Patcher, s: &Sweep, stem: &Path) -> Result<Vec<PathBuf>> {
    let norm = s.normalized(p.clean_metric, p.corrupted_metric);
    let cfg = model.config();
    let base_ids = match s.direction {
        Direction::Denoise => &p.pair.corrupted_ids,
        Direction::Noise => &p.pair.clean_ids,
    };
    let tokens = if p.pair.suffix_len.is_none() && s.direction == Direction::Denoise {
        p.pair.labels.clone()
    } else {
        token_labels(model, base_ids)
    };
    let (values, rows, cols, xl, yl): (Vec<Vec<f64>>, Vec<String>, Vec<String>, &str, &str) =
        match s.shape.len() {
            3 => {
                let seq = s.shape[2];
                let v = norm
                    .chunks(seq)
                    .map(|c| c.iter().map(|&x| x as f64).collect())
                    .collect();
                let rows = (0..cfg.n_layers)
                    .flat_map(|l| (0..cfg.n_heads).map(move |h| format!("L{l}H{h}")))
                    .collect();
                (v, rows, tokens, "position (token)", "layer.head")
            }
            _ => {
                let w = s.shape[1];
                let v = norm
                    .chunks(w)
                    .map(|c| c.iter().map(|&x| x as f64).collect())
                    .collect();
                let rows = (0..cfg.n_layers).map(|l| l.to_string()).collect();
                if s.axes[1] == "head" {
                    let cols = (0..w).map(|h| format!("H{h}")).collect();
                    (v, rows, cols, "head", "layer")
                } else {
                    (v, rows, tokens, "position (token)", "layer")
                }
            }
        };
    let h = Heatmap {
        title: format!(
            "{} patching ({}), {}",
            s.kind.name(),
            dir_name(s.direction),
            model.info.name
        ),
        values,
        row_labels: rows,
        col_labels: cols,
        x_label: xl.into(),
        y_label: yl.into(),
        value_label: "(patched - corrupted) / (clean - corrupted)".into(),
        caption: format!(
            "{}; metric {}; clean {:.3}, corrupted {:.3} {}",
            model.info.name,
            p.metric.describe(model),
            p.clean_metric,
            p.corrupted_metric,
            p.metric.units()
        ),
    };
    Ok(save_heatmap(&h, stem)?)
}

// ---------------- patch ----------------

#[derive(Args)]
pub struct PatchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub pair: PairArgs,
    /// Sweeps, comma separated: resid_pre, resid_mid, attn_out, mlp_out, z_last, z_all,
    /// z_by_pos, pattern.
    #[arg(long, value_delimiter = ',', default_value = "resid_pre,z_last")]
    pub sweep: Vec<String>,
    /// denoise (clean into corrupted, default), noise (corrupted into clean) or both.
    #[arg(long, default_value = "denoise")]
    pub direction: String,
    /// One full forward per patch instead of the batched incremental runner (for comparison).
    #[arg(long)]
    pub one_by_one: bool,
    /// Output directory: patching.json, one .npy and one heatmap (PNG + SVG) per sweep.
    #[arg(long, default_value = "out/patch")]
    pub out: PathBuf,
    /// Do not write files (stdout only).
    #[arg(long)]
    pub no_files: bool,
    #[arg(long)]
    pub quiet: bool,
}

pub fn patch(a: PatchArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let kinds: Vec<SweepKind> = a
        .sweep
        .iter()
        .map(|s| SweepKind::parse(s.trim()))
        .collect::<std::result::Result<_, _>>()?;
    let dirs = parse_dir(&a.direction)?;
    let (pair, metric) = a.pair.resolve(&model)?;
    let t0 = Instant::now();
    let p = Patcher::new(&model, pair, metric)?;
    let cfg = model.config();
    let quiet = a.quiet || a.model.json;
    let mut sweeps = serde_json::Map::new();
    let mut first: Option<Value> = None;
    let mut files = Vec::new();
    for &dir in &dirs {
        for &kind in &kinds {
            let t = Instant::now();
            let sw = if a.one_by_one {
                let vs = kind.variants(cfg.n_layers, cfg.n_heads, p.pair.len());
                let values = p.sweep_one_by_one(&vs, dir)?;
                Sweep {
                    kind,
                    direction: dir,
                    shape: kind.shape(cfg.n_layers, cfg.n_heads, p.pair.len()),
                    axes: kind.axes().into_iter().map(String::from).collect(),
                    n_run: values.len(),
                    values,
                }
            } else {
                let n = kind.variants(cfg.n_layers, cfg.n_heads, p.pair.len()).len();
                let pb = progress(n as u64, quiet, &format!("{} patches", kind.name()));
                let sw = p.run_sweep(kind, dir, Some(&|d| pb.set_position(d as u64)))?;
                pb.finish_and_clear();
                sw
            };
            let secs = t.elapsed().as_secs_f64();
            let rows = sw.rows();
            let name = format!("{}_{}", kind.name(), dir_name(dir));
            if first.is_none() {
                first = Some(json!(rows));
            }
            sweeps.insert(
                name.clone(),
                json!({
                    "sweep": kind.name(), "direction": dir_name(dir), "shape": sw.shape,
                    "axes": sw.axes, "values": rows,
                    "normalized": sw.normalized(p.clean_metric, p.corrupted_metric)
                        .chunks(*sw.shape.last().unwrap_or(&1)).map(|c| c.to_vec()).collect::<Vec<_>>(),
                    "n_patches": sw.values.len(), "n_patches_run": sw.n_run, "seconds": secs,
                    "hook": format!("blocks.{{layer}}.{}", kind.point().suffix()),
                }),
            );
            if !a.no_files {
                std::fs::create_dir_all(&a.out)?;
                let f = a.out.join(format!("{name}.npy"));
                npy::write(&f, &sw.values, &sw.shape)?;
                files.push(f);
                files.extend(sweep_heatmap(&model, &p, &sw, &a.out.join(&name))?);
            }
            if !quiet {
                summarize(&model, &p, &sw, secs);
            }
        }
    }
    let tok = |ids: &[u32]| {
        ids.iter()
            .map(|&i| model.tokenizer.id_to_token(i))
            .collect::<Vec<_>>()
    };
    let mut out = json!({
        "model": model.info.name,
        "clean": {"text": p.pair.clean_text, "ids": p.pair.clean_ids, "tokens": tok(&p.pair.clean_ids)},
        "corrupted": {"text": p.pair.corrupted_text, "ids": p.pair.corrupted_ids, "tokens": tok(&p.pair.corrupted_ids)},
        "differing_positions": p.pair.differing_positions,
        "chat": p.pair.chat,
        "metric": {"spec": p.metric, "description": p.metric.describe(&model), "units": p.metric.units(), "position": "last"},
        "clean_metric": p.clean_metric,
        "corrupted_metric": p.corrupted_metric,
        "values": first.unwrap_or(Value::Null),
        "sweeps": sweeps,
        "implementation": if a.one_by_one { "one forward per patch" } else { "batched incremental (shared prefix keys/values, rows join at their layer)" },
        "seconds": t0.elapsed().as_secs_f64(),
    });
    if matches!(p.metric, Metric::LogitDiff { .. }) {
        out["clean_logit_diff"] = json!(p.clean_metric);
        out["corrupted_logit_diff"] = json!(p.corrupted_metric);
    }
    if !a.no_files {
        let f = a.out.join("patching.json");
        write_json(&f, &out)?;
        files.push(f);
    }
    if a.model.json {
        println!("{out}");
    } else if !files.is_empty() {
        println!("wrote {}", files.len());
        for f in files {
            println!("  {}", f.display());
        }
    }
    Ok(())
}

fn summarize(model: &Model, p: &Patcher, s: &Sweep, secs: f64) {
    let norm = s.normalized(p.clean_metric, p.corrupted_metric);
    let mut idx: Vec<usize> = (0..norm.len()).filter(|&i| norm[i].is_finite()).collect();
    idx.sort_by(|&a, &b| norm[b].abs().total_cmp(&norm[a].abs()));
    println!(
        "{} ({}) on {}: metric {} clean {:.4}, corrupted {:.4}; {} patches ({} run) in {:.2} s",
        s.kind.name(),
        dir_name(s.direction),
        model.info.name,
        p.metric.describe(model),
        p.clean_metric,
        p.corrupted_metric,
        s.values.len(),
        s.n_run,
        secs
    );
    for &i in idx.iter().take(5) {
        let mut coords = Vec::new();
        let mut rem = i;
        for (k, &d) in s.shape.iter().enumerate().rev() {
            coords.push(format!("{}={}", s.axes[k], rem % d));
            rem /= d;
        }
        coords.reverse();
        println!(
            "  {:<28} patched {:+.4}  normalized {:+.3}",
            coords.join(" "),
            s.values[i],
            norm[i]
        );
    }
}

// keep the DatasetArgs import used by later commands
#[allow(dead_code)]
fn _uses(_: &DatasetArgs) {}
