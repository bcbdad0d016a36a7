//! Causal analyses: `patch` (activation patching sweeps), `attrib`, `path-patch`, `heads`, `ablate`.

use crate::analysis_jobs::DatasetArgs;
use crate::engine_jobs::{load_model, progress};
use crate::ModelArgs;
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use persona_lens_analysis::heads::AblationMode;
use persona_lens_analysis::patching::{
    pair_metric, Direction, Metric, PatchPair, Patcher, Sweep, SweepKind,
};
use persona_lens_analysis::{npy, write_json};
use persona_lens_engine::Model;
use persona_lens_report::heatmap::{save_heatmap, Heatmap};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The prompt pair and metric every causal command takes.
#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
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
    #[arg(long, value_enum, default_value_t = MetricKind::LogitDiff)]
    pub metric: MetricKind,
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
        if self.answer_a.is_some() != self.answer_b.is_some() {
            bail!("give both --answer-a and --answer-b, or neither (automatic choice)");
        }
        let ld = pair_metric(
            model,
            pair,
            self.answer_a.as_deref().zip(self.answer_b.as_deref()),
        )?;
        Ok(match self.metric {
            MetricKind::LogitDiff => ld,
            MetricKind::Logprob => match ld {
                Metric::LogitDiff { a, .. } => Metric::LogProb { token: a },
                m => m,
            },
            MetricKind::Kl => Metric::KlFromClean,
        })
    }
}

/// The metric a causal command measures (`--metric`); the answer tokens are resolved against
/// the model into a [`Metric`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MetricKind {
    /// logit[answer a] - logit[answer b] at the last position.
    LogitDiff,
    /// log p(answer a) at the last position.
    Logprob,
    /// KL(clean || patched) of the last position's next-token distribution, nats.
    Kl,
}

/// Which way a patch goes (`--direction`): clean activations into the corrupted run, corrupted
/// into clean, or both in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatchDirections {
    Denoise,
    Noise,
    Both,
}

impl PatchDirections {
    pub fn directions(self) -> Vec<Direction> {
        match self {
            PatchDirections::Denoise => vec![Direction::Denoise],
            PatchDirections::Noise => vec![Direction::Noise],
            PatchDirections::Both => vec![Direction::Denoise, Direction::Noise],
        }
    }
}

/// One direction (`attrib --direction`: one forward and one backward per direction).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatchDirection {
    Denoise,
    Noise,
}

impl From<PatchDirection> for Direction {
    fn from(d: PatchDirection) -> Direction {
        match d {
            PatchDirection::Denoise => Direction::Denoise,
            PatchDirection::Noise => Direction::Noise,
        }
    }
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Denoise => "denoise",
        Direction::Noise => "noise",
    }
}

fn token_labels(model: &Model, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&t| model.tokenizer.id_to_token(t))
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

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PatchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub pair: PairArgs,
    /// Sweeps, comma separated: resid_pre, resid_mid, attn_out, mlp_out, z_last, z_all,
    /// z_by_pos, pattern.
    #[arg(long, value_delimiter = ',', default_value = "resid_pre,z_last")]
    pub sweep: Vec<SweepKind>,
    /// denoise (clean into corrupted, default), noise (corrupted into clean) or both.
    #[arg(long, value_enum, default_value_t = PatchDirections::Denoise)]
    pub direction: PatchDirections,
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
    let (out, files) = patch_with(&model, &a)?;
    let json_file = (!a.no_files).then(|| a.out.join("patching.json"));
    finish(&out, json_file, files, a.model.json)
}

/// One prompt of a patching pair: text, token ids and token strings.
#[derive(Debug, Clone, Serialize)]
pub struct PatchPrompt {
    pub ids: Vec<u32>,
    pub text: String,
    pub tokens: Vec<String>,
}

/// What the metric reads (`spec` is the typed metric).
#[derive(Debug, Clone, Serialize)]
pub struct PatchMetric {
    pub description: String,
    pub position: String,
    pub spec: Metric,
    pub units: String,
}

/// One sweep: raw metric values and their normalised restoration, `[layer][position or head]`.
#[derive(Debug, Clone, Serialize)]
pub struct SweepResult {
    pub axes: Vec<String>,
    /// `clean` or `noising` direction name.
    pub direction: String,
    /// The hook patched, with `{layer}` for the row.
    pub hook: String,
    pub n_patches: usize,
    pub n_patches_run: usize,
    /// (patched - corrupted) / (clean - corrupted): 1 = clean behaviour, 0 = corrupted.
    pub normalized: Vec<Vec<f32>>,
    pub seconds: f64,
    pub shape: Vec<usize>,
    /// The sweep kind's name (`resid_pre`, `z_last`, ...).
    pub sweep: String,
    pub values: Vec<Vec<f32>>,
}

/// What `patch` writes to `patching.json` (fields in alphabetical order: the file's key order).
#[derive(Debug, Clone, Serialize)]
pub struct PatchResult {
    pub chat: bool,
    pub clean: PatchPrompt,
    /// The same as `clean_metric` when the metric is a logit difference (older readers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clean_logit_diff: Option<f32>,
    pub clean_metric: f32,
    pub corrupted: PatchPrompt,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupted_logit_diff: Option<f32>,
    pub corrupted_metric: f32,
    pub differing_positions: Vec<usize>,
    pub implementation: String,
    pub metric: PatchMetric,
    pub model: String,
    pub seconds: f64,
    /// By `{sweep}_{direction}`.
    pub sweeps: BTreeMap<String, SweepResult>,
    /// The first sweep's values (older readers).
    pub values: Option<Vec<Vec<f32>>>,
}

/// The patching sweeps on a loaded model: the result and the files written (not yet
/// `patching.json`).
pub fn patch_with(model: &Model, a: &PatchArgs) -> Result<(PatchResult, Vec<PathBuf>)> {
    let kinds = a.sweep.clone();
    let dirs = a.direction.directions();
    let (pair, metric) = a.pair.resolve(model)?;
    let t0 = Instant::now();
    let p = Patcher::new(model, pair, metric)?;
    let cfg = model.config();
    let quiet = a.quiet || a.model.json;
    let mut sweeps = BTreeMap::new();
    let mut first: Option<Vec<Vec<f32>>> = None;
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
                first = Some(rows.clone());
            }
            sweeps.insert(
                name.clone(),
                SweepResult {
                    axes: sw.axes.clone(),
                    direction: dir_name(dir).into(),
                    hook: format!("blocks.{{layer}}.{}", kind.point().suffix()),
                    n_patches: sw.values.len(),
                    n_patches_run: sw.n_run,
                    normalized: sw
                        .normalized(p.clean_metric, p.corrupted_metric)
                        .chunks(*sw.shape.last().unwrap_or(&1))
                        .map(|c| c.to_vec())
                        .collect(),
                    seconds: secs,
                    shape: sw.shape.clone(),
                    sweep: kind.name().into(),
                    values: rows,
                },
            );
            if !a.no_files {
                std::fs::create_dir_all(&a.out)?;
                let f = a.out.join(format!("{name}.npy"));
                npy::write(&f, &sw.values, &sw.shape)?;
                files.push(f);
                files.extend(sweep_heatmap(model, &p, &sw, &a.out.join(&name))?);
            }
            if !quiet {
                summarize(model, &p, &sw, secs);
            }
        }
    }
    let prompt = |text: &str, ids: &[u32]| PatchPrompt {
        ids: ids.to_vec(),
        text: text.into(),
        tokens: ids
            .iter()
            .map(|&i| model.tokenizer.id_to_token(i))
            .collect(),
    };
    let logit_diff = matches!(p.metric, Metric::LogitDiff { .. });
    let out = PatchResult {
        chat: p.pair.chat,
        clean: prompt(&p.pair.clean_text, &p.pair.clean_ids),
        clean_logit_diff: logit_diff.then_some(p.clean_metric),
        clean_metric: p.clean_metric,
        corrupted: prompt(&p.pair.corrupted_text, &p.pair.corrupted_ids),
        corrupted_logit_diff: logit_diff.then_some(p.corrupted_metric),
        corrupted_metric: p.corrupted_metric,
        differing_positions: p.pair.differing_positions.clone(),
        implementation: if a.one_by_one {
            "one forward per patch"
        } else {
            "batched incremental (shared prefix keys/values, rows join at their layer)"
        }
        .into(),
        metric: PatchMetric {
            description: p.metric.describe(model),
            position: "last".into(),
            spec: p.metric.clone(),
            units: p.metric.units().into(),
        },
        model: model.info.name.clone(),
        seconds: t0.elapsed().as_secs_f64(),
        sweeps,
        values: first,
    };
    Ok((out, files))
}

/// Writes the result JSON (unless `--no-files`), then prints it (`--json`) or the files written.
fn finish<T: Serialize>(
    out: &T,
    json_file: Option<PathBuf>,
    mut files: Vec<PathBuf>,
    json: bool,
) -> Result<()> {
    if let Some(f) = json_file {
        write_json(&f, out)?;
        files.push(f);
    }
    if json {
        println!("{}", serde_json::to_string(out)?);
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

// ---------------- path-patch ----------------

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PathPatchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub pair: PairArgs,
    /// Receivers: heads such as L12H2,L15H0 (their q/k/v inputs) or `logits` (the direct path).
    #[arg(long, default_value = "logits")]
    pub receivers: String,
    /// Receiver inputs to patch (heads only): q, k, v, comma separated. k and v belong to
    /// key/value heads, shared by a group of query heads in grouped-query models.
    #[arg(long, default_value = "q,k,v")]
    pub receiver_input: String,
    /// Sender heads (L3H1,L5H0); default every head before the last receiver layer.
    #[arg(long, value_delimiter = ',')]
    pub senders: Vec<String>,
    /// denoise (clean sender into the corrupted run, default), noise or both.
    #[arg(long, value_enum, default_value_t = PatchDirections::Denoise)]
    pub direction: PatchDirections,
    /// Two full forwards per sender through hooks instead of the batched runner (reference).
    #[arg(long)]
    pub one_by_one: bool,
    /// Output directory: path_patch.json, .npy and a heatmap (PNG + SVG) per direction.
    #[arg(long, default_value = "out/path_patch")]
    pub out: PathBuf,
    #[arg(long)]
    pub no_files: bool,
    #[arg(long)]
    pub quiet: bool,
}

pub fn path_patch(a: PathPatchArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let (out, files) = path_patch_with(&model, &a)?;
    let json_file = (!a.no_files).then(|| a.out.join("path_patch.json"));
    finish(&out, json_file, files, a.model.json)
}

/// A prompt of a pair as path-patch and attrib record it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PromptIds {
    pub ids: Vec<u32>,
    pub text: String,
}

/// The metric as path-patch and attrib record it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MetricInfo {
    pub description: String,
    /// Where the metric is read (path-patch: `last`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    pub spec: Metric,
    pub units: String,
}

/// One direction's path-patching run (`runs.<direction>` of `path_patch.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PathPatchRun {
    /// Metric of the run patched into, no path patched.
    pub base_metric: f32,
    /// `[sender_layer, sender_head]`.
    pub grid_axes: Vec<String>,
    pub grid_shape: Vec<usize>,
    /// (patched - corrupted) / (clean - corrupted), one per sender.
    pub normalized: Vec<f32>,
    pub seconds: f64,
    /// `L{layer}H{head}`.
    pub senders: Vec<String>,
    /// The metric with each sender's path patched.
    pub values: Vec<f32>,
}

/// What `path-patch` writes to `path_patch.json` (fields in alphabetical order: the file's).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PathPatchResult {
    pub chat: bool,
    pub clean: PromptIds,
    pub clean_metric: f32,
    pub corrupted: PromptIds,
    pub corrupted_metric: f32,
    pub frozen: String,
    pub implementation: String,
    pub metric: MetricInfo,
    pub model: String,
    pub receivers: persona_lens_analysis::path_patching::Receivers,
    /// Per direction (`denoise`, `noise`).
    pub runs: BTreeMap<String, PathPatchRun>,
    pub sender_hook: String,
}

/// One sweep of `attribution.json`: the estimates, and with `--compare` the real patching
/// effects and their agreement.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AttribSweep {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<persona_lens_analysis::attribution::Agreement>,
    pub axes: Vec<String>,
    /// Estimated metric change per entry, rows of the last axis.
    pub delta: Vec<Vec<f32>>,
    pub direction: String,
    /// The base metric plus `delta`.
    pub estimated_values: Vec<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub real_seconds: Option<f64>,
    /// The metric under real patching (`--compare`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub real_values: Option<Vec<Vec<f32>>>,
    pub shape: Vec<usize>,
    pub sweep: String,
}

/// What `attrib` writes to `attribution.json` (fields in alphabetical order: the file's).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AttribResult {
    pub attribution_seconds: f64,
    pub clean: PromptIds,
    pub clean_metric: f32,
    pub corrupted: PromptIds,
    pub corrupted_metric: f32,
    pub method: String,
    pub metric: MetricInfo,
    pub model: String,
    pub sweeps: BTreeMap<String, AttribSweep>,
}

/// Path patching on a loaded model: what `path_patch.json` holds and the files written (not yet
/// `path_patch.json`).
pub fn path_patch_with(
    model: &Model,
    a: &PathPatchArgs,
) -> Result<(PathPatchResult, Vec<PathBuf>)> {
    use persona_lens_analysis::heads::Head;
    use persona_lens_analysis::path_patching::{
        all_senders, path_patch, path_patch_one_by_one, Receivers,
    };
    let dirs = a.direction.directions();
    let receivers = Receivers::parse(&a.receivers, &a.receiver_input)?;
    let (pair, metric) = a.pair.resolve(model)?;
    let p = Patcher::new(model, pair, metric)?;
    let cfg = model.config();
    let senders: Vec<Head> = if a.senders.is_empty() {
        all_senders(&p, &receivers)
    } else {
        a.senders
            .iter()
            .map(|s| s.parse())
            .collect::<std::result::Result<_, _>>()?
    };
    if senders.is_empty() {
        bail!("no senders: the receivers are in layer 0; pick receivers in a later layer");
    }
    let quiet = a.quiet || a.model.json;
    let mut runs = BTreeMap::new();
    let mut files = Vec::new();
    for &dir in &dirs {
        let t = Instant::now();
        let values = if a.one_by_one {
            path_patch_one_by_one(&p, &senders, &receivers, dir)?
        } else {
            let pb = progress(senders.len() as u64, quiet, "senders path-patched");
            let v = path_patch(
                &p,
                &senders,
                &receivers,
                dir,
                Some(&|d| pb.set_position(d as u64)),
            )?;
            pb.finish_and_clear();
            v
        };
        let secs = t.elapsed().as_secs_f64();
        let den = p.clean_metric - p.corrupted_metric;
        let norm: Vec<f32> = values
            .iter()
            .map(|v| (v - p.corrupted_metric) / den)
            .collect();
        let base = p.base_metric(dir);
        // [sender layer][head] grid (NaN where a head was not a sender).
        let n_rows = senders.iter().map(|s| s.layer + 1).max().unwrap_or(0);
        let mut grid = vec![vec![f64::NAN; cfg.n_heads]; n_rows];
        let mut grid_raw = vec![f32::NAN; n_rows * cfg.n_heads];
        for ((s, n), v) in senders.iter().zip(&norm).zip(&values) {
            grid[s.layer][s.head] = *n as f64;
            grid_raw[s.layer * cfg.n_heads + s.head] = *v;
        }
        let name = format!("path_patch_{}", dir_name(dir));
        if !quiet {
            println!(
                "path patching ({}) on {}: senders -> {}; metric {} clean {:.4}, corrupted {:.4}; {} senders in {secs:.2} s",
                dir_name(dir),
                model.info.name,
                receivers.describe(),
                p.metric.describe(model),
                p.clean_metric,
                p.corrupted_metric,
                senders.len()
            );
            let mut idx: Vec<usize> = (0..senders.len()).collect();
            idx.sort_by(|&x, &y| {
                (values[y] - base)
                    .abs()
                    .total_cmp(&(values[x] - base).abs())
            });
            for &i in idx.iter().take(5) {
                println!(
                    "  sender {:<8} patched {:+.4} (base {:+.4})  normalized {:+.3}",
                    senders[i].to_string(),
                    values[i],
                    base,
                    norm[i]
                );
            }
        }
        if !a.no_files {
            std::fs::create_dir_all(&a.out)?;
            let f = a.out.join(format!("{name}.npy"));
            npy::write(&f, &grid_raw, &[n_rows, cfg.n_heads])?;
            files.push(f);
            let h = Heatmap {
                title: format!(
                    "path patching ({}) -> {}, {}",
                    dir_name(dir),
                    receivers.describe(),
                    model.info.name
                ),
                values: grid.clone(),
                row_labels: (0..n_rows).map(|l| l.to_string()).collect(),
                col_labels: (0..cfg.n_heads).map(|h| format!("H{h}")).collect(),
                x_label: "sender head".into(),
                y_label: "sender layer".into(),
                value_label: "(patched - corrupted) / (clean - corrupted)".into(),
                caption: format!(
                    "{}; sender attn.hook_z every position; other heads and MLPs frozen; metric {}; clean {:.3}, corrupted {:.3} {}",
                    model.info.name,
                    p.metric.describe(model),
                    p.clean_metric,
                    p.corrupted_metric,
                    p.metric.units()
                ),
            };
            files.extend(save_heatmap(&h, &a.out.join(&name))?);
        }
        runs.insert(
            dir_name(dir).to_string(),
            PathPatchRun {
                base_metric: base,
                grid_axes: vec!["sender_layer".into(), "sender_head".into()],
                grid_shape: vec![n_rows, cfg.n_heads],
                normalized: norm,
                seconds: secs,
                senders: senders.iter().map(|s| s.to_string()).collect(),
                values,
            },
        );
    }
    let out = PathPatchResult {
        chat: p.pair.chat,
        clean: PromptIds {
            ids: p.pair.clean_ids.clone(),
            text: p.pair.clean_text.clone(),
        },
        clean_metric: p.clean_metric,
        corrupted: PromptIds {
            ids: p.pair.corrupted_ids.clone(),
            text: p.pair.corrupted_text.clone(),
        },
        corrupted_metric: p.corrupted_metric,
        frozen: "every other attn_out and mlp_out at the base run (step A); receivers' inputs replaced, downstream free (step B)".into(),
        implementation: if a.one_by_one {
            "two full forwards per sender"
        } else {
            "batched from the cached base run"
        }
        .into(),
        metric: MetricInfo {
            description: p.metric.describe(model),
            position: Some("last".into()),
            spec: p.metric.clone(),
            units: p.metric.units().into(),
        },
        model: model.info.name.clone(),
        receivers,
        runs,
        sender_hook: "blocks.{layer}.attn.hook_z (one head, every position)".into(),
    };
    Ok((out, files))
}

// ---------------- attrib ----------------

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AttribArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub pair: PairArgs,
    /// Sweeps to estimate (see `patch --sweep`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "resid_pre,attn_out,mlp_out,z_last,z_all"
    )]
    pub sweep: Vec<SweepKind>,
    /// denoise (default) or noise.
    #[arg(long, value_enum, default_value_t = PatchDirection::Denoise)]
    pub direction: PatchDirection,
    /// Also run real patching (batched) and report Pearson r and top-k overlap.
    #[arg(long, default_value_t = true, overrides_with = "no_compare")]
    pub compare: bool,
    #[arg(long)]
    pub no_compare: bool,
    /// k of the top-k overlap.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    #[arg(long, default_value = "out/attrib")]
    pub out: PathBuf,
    #[arg(long)]
    pub no_files: bool,
    #[arg(long)]
    pub quiet: bool,
}

pub fn attrib(a: AttribArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let (out, files) = attrib_with(&model, &a)?;
    if a.model.json {
        println!("{}", serde_json::to_string(&out)?);
    } else if !files.is_empty() {
        println!("wrote {} files to {}", files.len(), a.out.display());
    }
    Ok(())
}

/// Attribution patching on a loaded model: what `attribution.json` holds (written unless
/// --no-files) and the files written.
pub fn attrib_with(model: &Model, a: &AttribArgs) -> Result<(AttribResult, Vec<PathBuf>)> {
    use persona_lens_analysis::attribution::{agreement, attribute};
    let kinds = a.sweep.clone();
    let dir = Direction::from(a.direction);
    let (pair, metric) = a.pair.resolve(model)?;
    let p = Patcher::new(model, pair, metric)?;
    let t = Instant::now();
    let est = attribute(&p, &kinds, dir)?;
    let attr_secs = t.elapsed().as_secs_f64();
    let base = p.base_metric(dir);
    let compare = a.compare && !a.no_compare;
    let mut sweeps = BTreeMap::new();
    let mut files = Vec::new();
    let quiet = a.quiet || a.model.json;
    if !quiet {
        println!(
            "attribution patching on {} ({}), metric {}: clean {:.4}, corrupted {:.4}; one forward + backward in {attr_secs:.2} s",
            model.info.name,
            dir_name(dir),
            p.metric.describe(model),
            p.clean_metric,
            p.corrupted_metric
        );
    }
    for e in &est {
        let estimated: Vec<f32> = e.delta.iter().map(|d| base + d).collect();
        let rows = |v: &[f32]| -> Vec<Vec<f32>> {
            v.chunks(*e.shape.last().unwrap_or(&1))
                .map(|c| c.to_vec())
                .collect()
        };
        let mut entry = AttribSweep {
            agreement: None,
            axes: e.axes.clone(),
            delta: rows(&e.delta),
            direction: dir_name(dir).into(),
            estimated_values: rows(&estimated),
            real_seconds: None,
            real_values: None,
            shape: e.shape.clone(),
            sweep: e.kind.name().into(),
        };
        let sw = Sweep {
            kind: e.kind,
            direction: dir,
            shape: e.shape.clone(),
            axes: e.axes.clone(),
            values: estimated.clone(),
            n_run: 0,
        };
        if compare {
            let t = Instant::now();
            let real = p.run_sweep(e.kind, dir, None)?;
            let real_delta: Vec<f32> = real.values.iter().map(|v| v - base).collect();
            let ag = agreement(&e.delta, &real_delta, a.top_k);
            entry.real_values = Some(real.rows());
            entry.real_seconds = Some(t.elapsed().as_secs_f64());
            if !quiet {
                println!(
                    "  {:<10} Pearson r = {:+.3}, top-{} overlap = {:.2} ({} entries)",
                    e.kind.name(),
                    ag.pearson_r,
                    ag.k,
                    ag.top_k_overlap,
                    ag.n
                );
            }
            entry.agreement = Some(ag);
        }
        if !a.no_files {
            std::fs::create_dir_all(&a.out)?;
            let name = format!("attrib_{}_{}", e.kind.name(), dir_name(dir));
            let f = a.out.join(format!("{name}.npy"));
            npy::write(&f, &e.delta, &e.shape)?;
            files.push(f);
            files.extend(sweep_heatmap(model, &p, &sw, &a.out.join(&name))?);
        }
        sweeps.insert(e.kind.name().into(), entry);
    }
    let out = AttribResult {
        attribution_seconds: attr_secs,
        clean: PromptIds {
            ids: p.pair.clean_ids.clone(),
            text: p.pair.clean_text.clone(),
        },
        clean_metric: p.clean_metric,
        corrupted: PromptIds {
            ids: p.pair.corrupted_ids.clone(),
            text: p.pair.corrupted_text.clone(),
        },
        corrupted_metric: p.corrupted_metric,
        method: "attribution patching: (source - base) . d metric / d activation, one forward + one backward (candle autograd)".into(),
        metric: MetricInfo {
            description: p.metric.describe(model),
            position: None,
            spec: p.metric.clone(),
            units: p.metric.units().into(),
        },
        model: model.info.name.clone(),
        sweeps,
    };
    if !a.no_files {
        let f = a.out.join("attribution.json");
        write_json(&f, &out)?;
        files.push(f);
    }
    Ok((out, files))
}

// ---------------- heads ----------------

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DatasetArgs,
    /// Metric token a for every pair (default: chosen per pair from simple words).
    #[arg(long, requires = "answer_b")]
    pub answer_a: Option<String>,
    #[arg(long, requires = "answer_a")]
    pub answer_b: Option<String>,
    /// Skip pairs whose clean - corrupted metric gap is below this (logits).
    #[arg(long, default_value_t = 0.25)]
    pub min_gap: f32,
    /// Heads to report as persona movers.
    #[arg(long, default_value_t = 4)]
    pub top: usize,
    #[arg(long, default_value = "out/heads")]
    pub out: PathBuf,
    #[arg(long)]
    pub quiet: bool,
}

fn load_pairs(
    data: &DatasetArgs,
) -> Result<
    Vec<(
        persona_lens_analysis::PromptItem,
        persona_lens_analysis::PromptItem,
    )>,
> {
    let ds = data.load()?;
    let pairs = persona_lens_analysis::heads::dataset_pairs(&ds);
    if pairs.is_empty() {
        bail!("the dataset has no novice/expert prompt pairs; check --pair-id / --persona-pair");
    }
    Ok(pairs)
}

pub fn heads(a: HeadsArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    heads_with(&model, &a, true).map(|_| ())
}

/// What `heads` writes to `heads.json` (fields in alphabetical order: the file's key order).
#[derive(Debug, Clone, Serialize)]
pub struct HeadsResult {
    /// Prompts in the chat template.
    pub chat: bool,
    pub definition: String,
    pub model: String,
    pub ranking: persona_lens_analysis::heads::HeadRanking,
    pub seconds: f64,
    /// The first `--top` heads of the ranking, as `L{layer}H{head}`.
    pub top: Vec<String>,
}

/// Head ranking on a loaded model; writes heads.json and the heatmap; prints unless `print` is
/// false. Returns heads.json's content.
pub fn heads_with(model: &Model, a: &HeadsArgs, print: bool) -> Result<HeadsResult> {
    use persona_lens_analysis::heads::rank_heads;
    let pairs = load_pairs(&a.data)?;
    let chat = a.data.chat(model);
    let quiet = a.quiet || a.model.json;
    let pb = progress(pairs.len() as u64, quiet, "pairs patched (z, every head)");
    let answers = a.answer_a.as_deref().zip(a.answer_b.as_deref());
    let t = Instant::now();
    let r = rank_heads(model, &pairs, chat, answers, a.min_gap, &|i| {
        pb.set_position(i as u64)
    })?;
    pb.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    std::fs::create_dir_all(&a.out)?;
    let cfg = model.config();
    let mut mean = vec![vec![0f64; cfg.n_heads]; cfg.n_layers];
    for h in &r.heads {
        mean[h.head.layer][h.head.head] = h.pooled;
    }
    let hm = Heatmap {
        title: format!("persona-mover heads, {} ({} pairs)", model.info.name, r.n_pairs),
        values: mean,
        row_labels: (0..cfg.n_layers).map(|l| l.to_string()).collect(),
        col_labels: (0..cfg.n_heads).map(|h| format!("H{h}")).collect(),
        x_label: "head".into(),
        y_label: "layer".into(),
        value_label: "pooled z-patching score".into(),
        caption: format!(
            "{}; attn.hook_z every (suffix-aligned) position, novice -> expert prompt; chat template {chat}",
            model.info.name
        ),
    };
    let mut files = save_heatmap(&hm, &a.out.join("heads"))?;
    let top: Vec<String> = r
        .heads
        .iter()
        .take(a.top)
        .map(|h| h.head.to_string())
        .collect();
    let out = HeadsResult {
        chat,
        definition: "per pair: corrupted = expert prompt, clean = novice prompt; head z (all positions, suffix-aligned) patched clean -> corrupted; score = sum over pairs of (patched - corrupted) / sum of (clean - corrupted) (pooled ratio; `mean` is the mean of per-pair ratios) of logit[simple] - logit[technical] at the last position".into(),
        model: model.info.name.clone(),
        ranking: r,
        seconds: secs,
        top: top.clone(),
    };
    let r = &out.ranking;
    let f = a.out.join("heads.json");
    write_json(&f, &out)?;
    files.push(f);
    if !print {
        return Ok(out);
    }
    if a.model.json {
        println!("{}", serde_json::to_string(&out)?);
        return Ok(out);
    }
    println!(
        "persona-mover heads on {} over {} pairs ({} skipped for a small gap), {secs:.1} s:",
        model.info.name, r.n_pairs, r.n_skipped
    );
    for h in r.heads.iter().take(a.top.max(5)) {
        println!(
            "  {:<7} pooled {:+.3}  mean {:+.3} [95% CI {:+.3}, {:+.3}]  sd {:.3}",
            h.head.to_string(),
            h.pooled,
            h.mean,
            h.ci95.0,
            h.ci95.1,
            h.std
        );
    }
    println!("top {}: {}", a.top, top.join(","));
    for f in files {
        println!("  {}", f.display());
    }
    Ok(out)
}

// ---------------- ablate ----------------

#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AblateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DatasetArgs,
    /// Heads to ablate, e.g. L12H2,L15H3 (or 12.2); default: the top of --from.
    #[arg(long, value_delimiter = ',')]
    pub heads: Vec<String>,
    /// A heads.json from `persona-lens heads` (its `top` list).
    #[arg(long, default_value = "out/heads/heads.json")]
    pub from: PathBuf,
    /// Ablations: zero, mean, resample (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "zero,mean,resample")]
    pub mode: Vec<AblationMode>,
    /// Random head sets of the same size (baseline).
    #[arg(long, default_value_t = 5)]
    pub n_random: usize,
    /// Random head sets for the first --mode (default: --n-random): the mode whose rank p-value
    /// is tested, so it can reach below 1 / (1 + n-random). Sets beyond the first three get
    /// only the gap (two forwards per pair).
    #[arg(long)]
    pub n_random_primary: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, requires = "answer_b")]
    pub answer_a: Option<String>,
    #[arg(long, requires = "answer_a")]
    pub answer_b: Option<String>,
    /// Pairs whose greedy answers are generated and graded.
    #[arg(long, default_value_t = 6)]
    pub n_generate: usize,
    #[arg(long, default_value_t = 40)]
    pub gen_tokens: usize,
    #[arg(long, default_value = "out/ablate")]
    pub out: PathBuf,
    #[arg(long)]
    pub quiet: bool,
}

pub fn ablate(a: AblateArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    ablate_with(&model, &a, true).map(|_| ())
}

/// One ablation mode's top heads against random head sets of the same size (gap changes in
/// logits; negative = the persona gap closes). Fields in alphabetical order (the file's).
#[derive(Debug, Clone, Serialize)]
pub struct AblationModeSummary {
    pub mode: persona_lens_analysis::heads::AblationMode,
    pub random_gap_change_ci95: (f64, f64),
    pub random_gap_change_max: f64,
    pub random_gap_change_mean: f64,
    pub random_gap_change_min: f64,
    pub random_gap_changes: Vec<f64>,
    /// One-sided rank p-value of the top heads' change among the random sets' (closing the gap
    /// at least as much counts against the top heads).
    pub rank_p_value: Option<f64>,
    pub top_gap_change: Option<f64>,
}

/// What `ablate` writes to `ablate.json` (fields in alphabetical order: the file's key order).
#[derive(Debug, Clone, Serialize)]
pub struct AblateResult {
    pub chat: bool,
    pub definitions: BTreeMap<String, String>,
    /// `effects[0]` is the unablated run (`label` none), then per mode the top heads and the
    /// random sets that got a full run.
    pub effects: Vec<persona_lens_analysis::heads::AblationEffect>,
    pub heads: Vec<String>,
    pub model: String,
    pub n_pairs: usize,
    pub seconds: f64,
    pub seed: u64,
    pub summary: Vec<AblationModeSummary>,
}

impl AblateResult {
    /// The persona gap without ablation (logits).
    pub fn baseline(&self) -> &persona_lens_analysis::heads::AblationEffect {
        &self.effects[0]
    }
}

/// Head ablation on a loaded model; writes ablate.json; prints unless `print` is false.
pub fn ablate_with(model: &Model, a: &AblateArgs, print: bool) -> Result<AblateResult> {
    use persona_lens_analysis::heads::{
        check_heads, random_head_sets, AblationEffect, AblationMode, AblationSetup, Head, ZBank,
    };
    let heads: Vec<Head> = if a.heads.is_empty() {
        let text = std::fs::read_to_string(&a.from).map_err(|e| {
            anyhow::anyhow!(
                "no --heads given and cannot read {} ({e}); run `persona-lens heads` first or pass --heads L12H2,...",
                a.from.display()
            )
        })?;
        let v: Value = serde_json::from_str(&text)?;
        v["top"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("{} has no `top` list", a.from.display()))?
            .iter()
            .filter_map(|x| x.as_str().map(|s| s.parse()))
            .collect::<std::result::Result<_, _>>()?
    } else {
        a.heads
            .iter()
            .map(|s| s.parse())
            .collect::<std::result::Result<_, _>>()?
    };
    check_heads(model, &heads)?;
    let modes = a.mode.clone();
    let pairs = load_pairs(&a.data)?;
    let chat = a.data.chat(model);
    let quiet = a.quiet || a.model.json;
    let metrics: Vec<Metric> = pairs
        .iter()
        .map(|(n, e)| {
            let pair = PatchPair::suffix_aligned(model, &n.text, &e.text, chat)?;
            Ok(pair_metric(
                model,
                &pair,
                a.answer_a.as_deref().zip(a.answer_b.as_deref()),
            )?)
        })
        .collect::<Result<_>>()?;
    let n_primary = a.n_random_primary.unwrap_or(a.n_random);
    let randoms = random_head_sets(
        model,
        heads.len(),
        a.n_random.max(n_primary),
        a.seed,
        &heads,
    );
    let mut layers: Vec<usize> = heads
        .iter()
        .chain(randoms.iter().flatten())
        .map(|h| h.layer)
        .collect();
    layers.sort();
    layers.dedup();
    let ids = AblationSetup::prompt_ids(model, &pairs, chat)?;
    let bank = ZBank::collect(model, &ids, &layers)?;
    let n = model.config().n_layers;
    let setup = AblationSetup {
        model,
        pairs: &pairs,
        metrics: &metrics,
        chat,
        ids: &ids,
        bank: &bank,
        probe_rows: (n / 2..=n).step_by((n / 6).max(1)).collect(),
        n_generate: a.n_generate,
        gen_tokens: a.gen_tokens,
    };
    let n_sets = |mi: usize| if mi == 0 { n_primary } else { a.n_random };
    let total = 1 + (0..modes.len()).map(|mi| 1 + n_sets(mi)).sum::<usize>();
    let pb = progress(total as u64, quiet, "ablation runs");
    let t = Instant::now();
    // Every random set's gap (cheap: two forwards per pair); the first few sets also get the
    // probes and the generated answers of a full run (all full runs' answers in one generation).
    const FULL_RANDOM_RUNS: usize = 3;
    let labels: Vec<String> = (0..FULL_RANDOM_RUNS)
        .map(|i| format!("random{i}"))
        .collect();
    let mut full: Vec<(&str, &[Head], AblationMode)> = vec![("none", &[], AblationMode::Zero)];
    let mut gap_only: Vec<(&[Head], AblationMode)> = vec![];
    for (mi, &m) in modes.iter().enumerate() {
        full.push(("top", &heads, m));
        for (i, r) in randoms.iter().take(n_sets(mi)).enumerate() {
            match labels.get(i) {
                Some(label) => full.push((label, r, m)),
                None => gap_only.push((r, m)),
            }
        }
    }
    let effects: Vec<AblationEffect> = setup.run_many(&full)?;
    pb.inc(full.len() as u64);
    let mut random_gaps: Vec<(AblationMode, f64)> = effects
        .iter()
        .filter(|e| e.label.starts_with("random"))
        .map(|e| (e.mode, e.gap_mean))
        .collect();
    // The other sets' gaps in one pass over the prompts, each set's forward starting at its
    // first ablated block.
    let runs_before = pb.position();
    let gaps = setup.gap_means(&gap_only, &|done, of| {
        pb.set_position(runs_before + (gap_only.len() * done / of.max(1)) as u64)
    })?;
    random_gaps.extend(gap_only.iter().map(|&(_, m)| m).zip(gaps));
    pb.finish_and_clear();
    let base = &effects[0];
    let summary: Vec<AblationModeSummary> = modes
        .iter()
        .map(|&m| {
            let top = effects.iter().find(|e| e.label == "top" && e.mode == m);
            let d: Vec<f64> = random_gaps
                .iter()
                .filter(|(mode, _)| *mode == m)
                .map(|(_, g)| g - base.gap_mean)
                .collect();
            let (rm, rlo, rhi) = persona_lens_analysis::stats::mean_ci95(&d);
            let top_change = top.map(|e| e.gap_mean - base.gap_mean);
            // One-sided rank p-value: random sets that close the gap at least as much as the top
            // heads (a more negative change), among all of them.
            let rank_p = top_change.map(|t| {
                let neg: Vec<f64> = d.iter().map(|x| -x).collect();
                persona_lens_analysis::stats::rank_p_value(-t, &neg)
            });
            AblationModeSummary {
                mode: m,
                random_gap_change_ci95: (rlo, rhi),
                random_gap_change_max: d.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                random_gap_change_mean: rm,
                random_gap_change_min: d.iter().cloned().fold(f64::INFINITY, f64::min),
                random_gap_changes: d,
                rank_p_value: rank_p,
                top_gap_change: top_change,
            }
        })
        .collect();
    let definitions = [
        ("gap", "metric(novice prompt) - metric(expert prompt), metric = logit[simple] - logit[technical] at the last position (logits); a persona-mover ablation shrinks it"),
        ("probe_accuracy", "novice vs expert logistic probe, 5-fold CV accuracy, last token, per residual row"),
        ("grade_gap", "Flesch-Kincaid grade of greedy answers to expert prompts minus novice prompts"),
    ];
    let seconds = t.elapsed().as_secs_f64();
    let out = AblateResult {
        chat,
        definitions: definitions
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        effects,
        heads: heads.iter().map(|h| h.to_string()).collect(),
        model: model.info.name.clone(),
        n_pairs: pairs.len(),
        seconds,
        seed: a.seed,
        summary,
    };
    let (effects, base) = (&out.effects, out.baseline());
    std::fs::create_dir_all(&a.out)?;
    let f = a.out.join("ablate.json");
    write_json(&f, &out)?;
    if !print {
        return Ok(out);
    }
    if a.model.json {
        println!("{}", serde_json::to_string(&out)?);
        return Ok(out);
    }
    println!(
        "ablating {} on {} over {} pairs (baseline gap {:+.3} logits):",
        heads
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
            .join(","),
        model.info.name,
        pairs.len(),
        base.gap_mean
    );
    println!(
        "  {:<10}{:<10}{:>12}{:>12}{:>12}  probe acc by row",
        "heads", "mode", "gap", "Δgap", "grade gap"
    );
    for e in effects {
        println!(
            "  {:<10}{:<10}{:>+12.3}{:>+12.3}{:>12}  {}",
            e.label,
            if e.label == "none" {
                "-".to_string()
            } else {
                format!("{:?}", e.mode).to_lowercase()
            },
            e.gap_mean,
            e.gap_mean - base.gap_mean,
            e.grade_gap
                .map(|g| format!("{g:+.2}"))
                .unwrap_or("-".into()),
            e.probe_accuracy
                .iter()
                .map(|(r, acc)| format!("{r}:{acc:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    println!("  {}", f.display());
    Ok(out)
}
