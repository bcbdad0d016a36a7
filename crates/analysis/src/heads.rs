//! Persona-mover heads: rank attention heads by how much patching their output (`attn.hook_z`,
//! every position) from the novice prompt into the expert prompt restores the novice behaviour,
//! over all prompt pairs of a topic; then ablate the top heads (zero, dataset mean, resample) and
//! measure what is left of the persona: the logit-difference gap, probe accuracy at later
//! layers, and the readability gap of greedy generations. Random heads of the same count are the
//! baseline.

use crate::dataset::{PersonaDataset, PromptItem};
use crate::patching::{pair_metric, Direction, Metric, PatchPair, Patcher, SweepKind};
use crate::stats::mean_ci95;
use crate::{AnalysisError, Result};
use candle_core::{DType, Tensor};
use persona_lens_engine::hooks::HookFn;
use persona_lens_engine::{
    ActivationCache, Batch, HookCtx, HookName, HookPoint, Hooks, LogitsAt, Model, Op, Selector,
    SharedPrefix,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

pub use crate::dataset::dataset_pairs;

/// A head, `L{layer}H{head}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Hash)]
pub struct Head {
    pub layer: usize,
    pub head: usize,
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "L{}H{}", self.layer, self.head)
    }
}

impl std::str::FromStr for Head {
    type Err = AnalysisError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            AnalysisError::Invalid(format!(
                "cannot read head '{s}'; write heads as L12H2 or 12.2"
            ))
        };
        let t = s.trim().trim_start_matches(['L', 'l']);
        let (l, h) = t.split_once(['H', 'h', '.']).ok_or_else(bad)?;
        Ok(Head {
            layer: l.parse().map_err(|_| bad())?,
            head: h.parse().map_err(|_| bad())?,
        })
    }
}

pub fn check_heads(model: &Model, heads: &[Head]) -> Result<()> {
    let cfg = model.config();
    for h in heads {
        if h.layer >= cfg.n_layers || h.head >= cfg.n_heads {
            return Err(AnalysisError::Invalid(format!(
                "head {h} out of range: the model has {} layers x {} heads (L0H0..L{}H{})",
                cfg.n_layers,
                cfg.n_heads,
                cfg.n_layers - 1,
                cfg.n_heads - 1
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadScore {
    pub head: Head,
    /// What heads are ranked by: the pooled ratio sum(patched - corrupted) / sum(clean -
    /// corrupted) over pairs, so a pair with a small gap cannot dominate through its denominator.
    #[serde(default)]
    pub pooled: f64,
    /// Mean normalised patching score over pairs, (patched - corrupted) / (clean - corrupted).
    pub mean: f64,
    pub ci95: (f64, f64),
    pub std: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadRanking {
    pub model: String,
    pub n_pairs: usize,
    pub n_skipped: usize,
    pub skipped_reasons: Vec<String>,
    /// Sorted by pooled score, highest first.
    pub heads: Vec<HeadScore>,
    /// Per pair clean - corrupted metric gap (logits), the pooled ratio's weights.
    #[serde(default)]
    pub gaps: Vec<f64>,
    /// `[pair][layer * n_heads + head]` normalised scores.
    pub per_pair: Vec<Vec<f32>>,
    pub pair_ids: Vec<String>,
    pub metrics: Vec<String>,
    pub n_layers: usize,
    pub n_heads: usize,
}

/// Patches every head's z (all suffix-aligned positions) from clean (novice) into corrupted
/// (expert) for every pair; pairs whose clean-corrupted metric gap is under `min_gap` are skipped
/// (normalised scores would be noise).
pub fn rank_heads(
    model: &Model,
    pairs: &[(PromptItem, PromptItem)],
    chat: bool,
    answers: Option<(&str, &str)>,
    min_gap: f32,
    progress: &dyn Fn(usize),
) -> Result<HeadRanking> {
    let cfg = model.config();
    let mut per_pair = Vec::new();
    let mut pair_ids = Vec::new();
    let mut metrics = Vec::new();
    let mut gaps = Vec::new();
    let mut skipped = Vec::new();
    for (i, (nov, exp)) in pairs.iter().enumerate() {
        let pair = PatchPair::suffix_aligned(model, &nov.text, &exp.text, chat)?;
        let metric = pair_metric(model, &pair, answers)?;
        let p = Patcher::new(model, pair, metric)?;
        let gap = p.clean_metric - p.corrupted_metric;
        if gap.abs() < min_gap {
            skipped.push(format!(
                "{}: clean - corrupted = {gap:.3} < {min_gap}",
                nov.id
            ));
            progress(i + 1);
            continue;
        }
        let sw = p.run_sweep(SweepKind::ZAll, Direction::Denoise, None)?;
        per_pair.push(sw.normalized(p.clean_metric, p.corrupted_metric));
        gaps.push(gap as f64);
        pair_ids.push(nov.id.clone());
        metrics.push(p.metric.describe(model));
        progress(i + 1);
    }
    if per_pair.is_empty() {
        return Err(AnalysisError::Invalid(format!(
            "no prompt pair has a clean-corrupted metric gap of at least {min_gap}; lower min_gap or choose other answer words"
        )));
    }
    let n = cfg.n_layers * cfg.n_heads;
    let mut heads: Vec<HeadScore> = (0..n)
        .map(|j| {
            let xs: Vec<f64> = per_pair.iter().map(|r| r[j] as f64).collect();
            let (mean, lo, hi) = mean_ci95(&xs);
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>()
                / (xs.len().saturating_sub(1).max(1)) as f64;
            // Normalised score x gap = the pair's raw effect (patched - corrupted).
            let effect: f64 = xs.iter().zip(&gaps).map(|(x, g)| x * g).sum();
            HeadScore {
                head: Head {
                    layer: j / cfg.n_heads,
                    head: j % cfg.n_heads,
                },
                pooled: effect / gaps.iter().sum::<f64>(),
                mean,
                ci95: (lo, hi),
                std: var.sqrt(),
            }
        })
        .collect();
    heads.sort_by(|a, b| b.pooled.total_cmp(&a.pooled));
    Ok(HeadRanking {
        model: model.info.name.clone(),
        n_pairs: per_pair.len(),
        n_skipped: skipped.len(),
        skipped_reasons: skipped,
        heads,
        gaps,
        per_pair,
        pair_ids,
        metrics,
        n_layers: cfg.n_layers,
        n_heads: cfg.n_heads,
    })
}

/// How an ablated head's output is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AblationMode {
    Zero,
    /// The head's z averaged over every position of every dataset prompt except the first
    /// (BOS / the attention sink, whose z is unlike any other position's).
    Mean,
    /// The head's z from another dataset prompt (random, seeded), end-aligned: a row's last
    /// position (where metrics are read) gets the donor's last position, the one before it the
    /// donor's one before, and so on; positions before the donor's start get its first.
    Resample,
}

impl AblationMode {
    /// The name `FromStr` reads and the results write (`zero`, `mean`, `resample`).
    pub fn name(self) -> &'static str {
        match self {
            AblationMode::Zero => "zero",
            AblationMode::Mean => "mean",
            AblationMode::Resample => "resample",
        }
    }
}

impl AblationMode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "zero" => Ok(AblationMode::Zero),
            "mean" => Ok(AblationMode::Mean),
            "resample" => Ok(AblationMode::Resample),
            o => Err(AnalysisError::Invalid(format!(
                "unknown ablation '{o}'; use zero, mean or resample"
            ))),
        }
    }
}

/// Per-layer z of every dataset prompt (`[t, H, hd]` each), for mean and resample ablations.
pub struct ZBank {
    /// layer -> prompt -> [t, H, hd]
    pub z: BTreeMap<usize, Vec<Tensor>>,
    /// layer -> [H, hd], over every prompt position but the first
    pub mean: BTreeMap<usize, Tensor>,
}

impl ZBank {
    pub fn collect(model: &Model, prompts: &[Vec<u32>], layers: &[usize]) -> Result<Self> {
        let mut z: BTreeMap<usize, Vec<Tensor>> = BTreeMap::new();
        for ids in prompts {
            let b = Batch::left_padded(std::slice::from_ref(ids), model.pad_id(), model.device())?;
            let mut hooks = Hooks::new();
            for &l in layers {
                hooks.capture(HookName::block(l, HookPoint::AttnZ));
            }
            model.forward(&b, None, &mut hooks, LogitsAt::None)?;
            for &l in layers {
                z.entry(l).or_default().push(
                    hooks
                        .cache
                        .get(&HookName::block(l, HookPoint::AttnZ))?
                        .get(0)?,
                );
            }
        }
        ZBank::from_z(z)
    }

    /// A bank from per-layer, per-prompt z (`[t, H, hd]` each); the mean leaves out position 0.
    pub fn from_z(z: BTreeMap<usize, Vec<Tensor>>) -> Result<Self> {
        let mut mean = BTreeMap::new();
        for (l, zs) in &z {
            let rest: Vec<Tensor> = zs
                .iter()
                .filter(|t| t.dim(0).is_ok_and(|n| n > 1))
                .map(|t| t.narrow(0, 1, t.dim(0)? - 1))
                .collect::<candle_core::Result<_>>()?;
            if rest.is_empty() {
                return Err(AnalysisError::Invalid(
                    "mean ablation needs prompts longer than one token".into(),
                ));
            }
            let all = Tensor::cat(&rest, 0)?; // [sum (t - 1), H, hd]
            mean.insert(*l, all.mean(0)?);
        }
        Ok(ZBank { z, mean })
    }
}

/// Hooks that ablate `heads` (all positions, every row). For `Resample`, row r of a batch takes
/// its replacement from bank prompt `donor[r]`.
pub fn ablation_hooks(
    heads: &[Head],
    mode: AblationMode,
    bank: Option<&ZBank>,
    donors: &[usize],
) -> Result<Hooks> {
    let mut hooks = Hooks::new();
    add_ablation(&mut hooks, heads, mode, bank, donors)?;
    Ok(hooks)
}

/// Adds the ablation of `heads` to existing hooks (see [`ablation_hooks`]).
pub fn add_ablation(
    hooks: &mut Hooks,
    heads: &[Head],
    mode: AblationMode,
    bank: Option<&ZBank>,
    donors: &[usize],
) -> Result<()> {
    let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for h in heads {
        by_layer.entry(h.layer).or_default().push(h.head);
    }
    for (l, hs) in by_layer {
        let name = HookName::block(l, HookPoint::AttnZ);
        let sel = Selector::all().heads(hs.clone());
        match mode {
            AblationMode::Zero => {
                hooks.intervene(name, Op::Zero, sel);
            }
            AblationMode::Mean => {
                let bank = bank
                    .ok_or_else(|| AnalysisError::Invalid("mean ablation needs a z bank".into()))?;
                hooks.intervene(name, Op::Replace(bank.mean[&l].clone()), sel);
            }
            AblationMode::Resample => {
                let bank = bank.ok_or_else(|| {
                    AnalysisError::Invalid("resample ablation needs a z bank".into())
                })?;
                let zs: Vec<Tensor> = donors.iter().map(|&d| bank.z[&l][d].clone()).collect();
                let f: HookFn = Arc::new(move |x: &Tensor, ctx: &HookCtx| {
                    // x: [b, t, H, hd]; end-align each donor to its row's real length so far.
                    let (b, t, _, _) = x.dims4()?;
                    let mut rows = Vec::with_capacity(b);
                    for r in 0..b {
                        let donor = &zs[r % zs.len()];
                        let dl = donor.dim(0)?;
                        let row_len = (ctx.start + t).saturating_sub(ctx.pad[r]);
                        let mut pos_rows = Vec::with_capacity(t);
                        for i in 0..t {
                            let p = ctx.position(r, i).unwrap_or(0);
                            pos_rows.push(donor.get(end_aligned(p, row_len, dl))?);
                        }
                        rows.push(Tensor::stack(&pos_rows, 0)?);
                    }
                    Tensor::stack(&rows, 0)?.to_dtype(x.dtype())
                });
                hooks.intervene(name, Op::Func(f), sel);
            }
        }
    }
    Ok(())
}

/// The block an ablation of `heads` must start from: its first ablated layer, or `None` when
/// that is block 0 or `heads` is empty (the forward then runs whole).
fn first_ablated_block(heads: &[Head]) -> Option<usize> {
    heads.iter().map(|h| h.layer).min().filter(|&l| l > 0)
}

/// A forward's last-position logits (`LogitsAt::Last`) as f32 rows `[rows][vocab]`.
fn logit_rows(logits: Option<Tensor>) -> Result<Vec<Vec<f32>>> {
    Ok(logits
        .ok_or_else(|| AnalysisError::Invalid("no logits".into()))?
        .to_dtype(DType::F32)?
        .to_vec2()?)
}

/// How many prompt rows [`AblationSetup::gap_means`] puts in one forward when it runs several
/// head sets together: enough rows for the matrix products to run at the batched rate.
const SETS_ROWS_PER_FORWARD: usize = 96;

/// Hooks that ablate a different head set in each equal block of a batch's rows: set `g` of
/// `sets` in rows `g * b / sets.len()..(g + 1) * b / sets.len()` of a batch of `b` rows, every
/// position, with a uniform `mode` (zero, or the bank's mean). One hook per layer.
fn group_ablation_hooks(sets: &[&[Head]], mode: AblationMode, bank: &ZBank) -> Result<Hooks> {
    let mut by_layer: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
    for (g, heads) in sets.iter().enumerate() {
        for h in heads.iter() {
            by_layer.entry(h.layer).or_default().push((g, h.head));
        }
    }
    let k = sets.len();
    let mut hooks = Hooks::new();
    for (l, set_heads) in by_layer {
        let replacement = match mode {
            AblationMode::Zero => None,
            AblationMode::Mean => Some(bank.mean[&l].clone()),
            AblationMode::Resample => {
                return Err(AnalysisError::Invalid(
                    "resample ablation gives each row its own donor: run its sets one by one"
                        .into(),
                ))
            }
        };
        let f: HookFn = Arc::new(move |x: &Tensor, _ctx: &HookCtx| {
            // x: [b, t, H, hd]
            let (b, _, n_heads, _) = x.dims4()?;
            let per_set = b / k;
            let mut mask = vec![0u8; b * n_heads];
            for &(g, h) in &set_heads {
                for r in g * per_set..(g + 1) * per_set {
                    mask[r * n_heads + h] = 1;
                }
            }
            let mask =
                Tensor::from_vec(mask, (b, 1, n_heads, 1), x.device())?.broadcast_as(x.shape())?;
            let new = match &replacement {
                None => x.zeros_like()?,
                Some(v) => v
                    .to_dtype(x.dtype())?
                    .broadcast_as(x.shape())?
                    .contiguous()?,
            };
            mask.where_cond(&new, x)
        });
        hooks.intervene(
            HookName::block(l, HookPoint::AttnZ),
            Op::Func(f),
            Selector::all(),
        );
    }
    Ok(hooks)
}

/// One batch row's ablation: its heads, how, and (resample) the prompt it takes them from.
struct RowAblation {
    heads: Vec<Head>,
    mode: AblationMode,
    donor: usize,
}

/// What replaces a row's ablated heads other than zeros: the bank's mean `[H, hd]`, or the
/// donor prompt's activations `[t, H, hd]` (end-aligned).
enum Replacement {
    Mean(Tensor),
    Donor(Tensor),
}

/// Hooks where row `r` of every call (of exactly `rows.len()` rows) ablates `rows[r]`'s heads its own way (zero, the bank's
/// mean, or its donor's activations end-aligned, as [`add_ablation`] does for a whole batch).
fn row_ablation_hooks(rows: &[RowAblation], bank: &ZBank) -> Result<Hooks> {
    let layers: std::collections::BTreeSet<usize> = rows
        .iter()
        .flat_map(|r| r.heads.iter().map(|h| h.layer))
        .collect();
    let mut hooks = Hooks::new();
    for l in layers {
        // Per row: its heads at this layer and what replaces them (`None`: zeros).
        let per_row: Vec<(Vec<usize>, Option<Replacement>)> = rows
            .iter()
            .map(|r| {
                let heads: Vec<usize> = r
                    .heads
                    .iter()
                    .filter(|h| h.layer == l)
                    .map(|h| h.head)
                    .collect();
                let with = match (heads.is_empty(), r.mode) {
                    (true, _) | (false, AblationMode::Zero) => None,
                    (false, AblationMode::Mean) => Some(Replacement::Mean(bank.mean[&l].clone())),
                    (false, AblationMode::Resample) => {
                        Some(Replacement::Donor(bank.z[&l][r.donor].clone()))
                    }
                };
                (heads, with)
            })
            .collect();
        let f: HookFn = Arc::new(move |x: &Tensor, ctx: &HookCtx| {
            // x: [b, t, H, hd]
            let (b, t, n_heads, _) = x.dims4()?;
            if b != per_row.len() {
                candle_core::bail!("row ablation for {} rows got a batch of {b}", per_row.len());
            }
            let mut mask = vec![0u8; b * n_heads];
            let mut new = Vec::with_capacity(b);
            for (r, (heads, with)) in per_row.iter().enumerate() {
                heads.iter().for_each(|&h| mask[r * n_heads + h] = 1);
                let keep = x.get(r)?;
                new.push(match with {
                    None => keep.zeros_like()?,
                    Some(Replacement::Donor(donor)) => {
                        let dl = donor.dim(0)?;
                        let row_len = (ctx.start + t).saturating_sub(ctx.pad[r]);
                        let pos: Vec<Tensor> = (0..t)
                            .map(|i| {
                                let p = ctx.position(r, i).unwrap_or(0);
                                donor.get(end_aligned(p, row_len, dl))
                            })
                            .collect::<candle_core::Result<_>>()?;
                        Tensor::stack(&pos, 0)?.to_dtype(x.dtype())?
                    }
                    Some(Replacement::Mean(mean)) => mean
                        .to_dtype(x.dtype())?
                        .unsqueeze(0)?
                        .broadcast_as(keep.shape())?
                        .contiguous()?,
                });
            }
            let mask =
                Tensor::from_vec(mask, (b, 1, n_heads, 1), x.device())?.broadcast_as(x.shape())?;
            mask.where_cond(&Tensor::stack(&new, 0)?, x)
        });
        hooks.intervene(
            HookName::block(l, HookPoint::AttnZ),
            Op::Func(f),
            Selector::all(),
        );
    }
    Ok(hooks)
}

/// The donor position for position `p` of a row of `row_len` positions, end-aligned to a donor
/// of `donor_len`: the last position maps to the donor's last, earlier ones count back from it,
/// positions before the donor's start take its first.
pub fn end_aligned(p: usize, row_len: usize, donor_len: usize) -> usize {
    let from_end = row_len.saturating_sub(p + 1);
    (donor_len - 1).saturating_sub(from_end)
}

/// `n` random head sets of `k` heads each (seeded), drawn from the heads not in `exclude` (the
/// selected heads: a baseline set that contains them would measure them again).
pub fn random_head_sets(
    model: &Model,
    k: usize,
    n: usize,
    seed: u64,
    exclude: &[Head],
) -> Vec<Vec<Head>> {
    let cfg = model.config();
    let all: Vec<Head> = (0..cfg.n_layers)
        .flat_map(|l| (0..cfg.n_heads).map(move |h| Head { layer: l, head: h }))
        .filter(|h| !exclude.contains(h))
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut v = all.clone();
            v.shuffle(&mut rng);
            v.truncate(k);
            v.sort();
            v
        })
        .collect()
}

/// Last-position metric for each prompt with the given hooks (fresh per prompt).
pub fn metric_with(model: &Model, ids: &[u32], metric: &Metric, hooks: &mut Hooks) -> Result<f32> {
    let b = Batch::left_padded(&[ids.to_vec()], model.pad_id(), model.device())?;
    let l = model
        .forward(&b, None, hooks, LogitsAt::Last)?
        .ok_or_else(|| AnalysisError::Invalid("no logits".into()))?
        .to_dtype(DType::F32)?
        .get(0)?;
    Ok(match metric {
        Metric::LogitDiff { a, b } => {
            l.get(*a as usize)?.to_scalar::<f32>()? - l.get(*b as usize)?.to_scalar::<f32>()?
        }
        _ => {
            return Err(AnalysisError::Invalid(
                "ablation reports use the logit-difference metric".into(),
            ))
        }
    })
}

/// What is left of the persona with a set of heads ablated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AblationEffect {
    pub label: String,
    pub heads: Vec<Head>,
    pub mode: AblationMode,
    /// Mean over pairs of metric(novice) - metric(expert), logits (the persona gap).
    pub gap_mean: f64,
    pub gap_ci95: (f64, f64),
    /// Per pair gap.
    pub gaps: Vec<f64>,
    /// Probe (novice vs expert, last token) 5-fold CV accuracy per residual row.
    pub probe_accuracy: BTreeMap<usize, f64>,
    /// Mean complexity grade (Flesch-Kincaid) of greedy answers to expert minus novice prompts.
    pub grade_gap: Option<f64>,
    pub novice_grade: Option<f64>,
    pub expert_grade: Option<f64>,
    pub samples: Vec<(String, String)>,
}

pub struct AblationSetup<'a> {
    pub model: &'a Model,
    pub pairs: &'a [(PromptItem, PromptItem)],
    /// Metric per pair (logit difference, simple minus technical).
    pub metrics: &'a [Metric],
    pub chat: bool,
    /// Encoded prompts ([`AblationSetup::prompt_ids`]): novice of pair i at 2i, expert at 2i+1.
    pub ids: &'a [Vec<u32>],
    pub bank: &'a ZBank,
    /// Residual rows to probe.
    pub probe_rows: Vec<usize>,
    /// Pairs whose answers are generated (first n).
    pub n_generate: usize,
    pub gen_tokens: usize,
}

impl AblationSetup<'_> {
    /// Encoded prompts: novice of pair i at 2i, expert at 2i+1 (the bank's order).
    pub fn prompt_ids(
        model: &Model,
        pairs: &[(PromptItem, PromptItem)],
        chat: bool,
    ) -> Result<Vec<Vec<u32>>> {
        let mut v = Vec::new();
        for (n, e) in pairs {
            v.push(model.encode_prompt(&n.text, chat)?);
            v.push(model.encode_prompt(&e.text, chat)?);
        }
        Ok(v)
    }

    /// Donor for prompt `i`: a pseudo-random other prompt of the bank (either persona).
    pub fn donor(&self, i: usize) -> usize {
        let n = self.pairs.len() * 2;
        if n < 2 {
            return 0;
        }
        (i + 1 + (i.wrapping_mul(2_654_435_761) >> 7) % (n - 1)) % n
    }

    /// The persona gap (metric of the novice prompt minus the expert prompt) of every pair with
    /// `heads` ablated; prompts run in left-padded batches, each row with its own donor.
    fn gaps(&self, heads: &[Head], mode: AblationMode) -> Result<Vec<f64>> {
        let n = 2 * self.metrics.len();
        let mut metric = vec![0f64; n];
        let idx: Vec<usize> = (0..n).collect();
        for chunk in idx.chunks(16) {
            let rows: Vec<Vec<u32>> = chunk.iter().map(|&i| self.ids[i].clone()).collect();
            let donors: Vec<usize> = chunk.iter().map(|&i| self.donor(i)).collect();
            let mut h = ablation_hooks(heads, mode, Some(self.bank), &donors)?;
            let b = Batch::left_padded(&rows, self.model.pad_id(), self.model.device())?;
            for (&i, l) in chunk.iter().zip(&self.last_logits(&b, &mut h)?) {
                metric[i] = self.logit_diff(i, l)?;
            }
        }
        Ok(self.pair_gaps(&metric))
    }

    /// The mean persona gap with `heads` ablated: the cheap part of [`Self::run`], for the many
    /// random head sets of a baseline.
    pub fn gap_mean(&self, heads: &[Head], mode: AblationMode) -> Result<f64> {
        Ok(mean_ci95(&self.gaps(heads, mode)?).0)
    }

    /// [`Self::gap_mean`] of many head sets at once, the same numbers for less work: per chunk
    /// of prompts one clean forward keeps the input of every block where some set's first
    /// ablated head sits, and each set runs from there (blocks before its first ablated head see
    /// no ablation, so they would compute exactly what the clean forward did). Where every
    /// prompt starts with the same tokens (a chat template's system turn) and the ablation
    /// treats every row and position alike (zero, mean), those tokens run once per set instead
    /// of once per prompt ([`SharedPrefix`]), and up to [`SETS_ROWS_PER_FORWARD`] rows of
    /// several sets run in one forward ([`Self::shared_prefix_group`]); the numbers agree
    /// within float rounding. `progress` gets the number of chunks done and their count.
    pub fn gap_means(
        &self,
        sets: &[(&[Head], AblationMode)],
        progress: &dyn Fn(usize, usize),
    ) -> Result<Vec<f64>> {
        let model = self.model;
        let n = 2 * self.metrics.len();
        let start_of = first_ablated_block;
        let mut starts: Vec<usize> = sets.iter().filter_map(|(h, _)| start_of(h)).collect();
        starts.sort();
        starts.dedup();
        let starts: Vec<HookName> = starts
            .into_iter()
            .map(|l| HookName::block(l, HookPoint::ResidPre))
            .collect();
        let last_start = starts.iter().filter_map(|h| h.layer).max();
        let clean_hooks = || {
            let mut h = Hooks::new();
            h.capture_all(&starts);
            h.stop_after_block = last_start;
            h
        };
        let uniform = |mode: AblationMode| matches!(mode, AblationMode::Zero | AblationMode::Mean);
        // The clean prefix (its inputs to every start block are captured) when sharing pays.
        let shared = match sets.iter().any(|&(_, m)| uniform(m)) {
            true => {
                let mut h = clean_hooks();
                SharedPrefix::for_rows(model, self.ids, &mut h)?.map(|p| (p, h.cache))
            }
            false => None,
        };
        let resid_at =
            |cache: &ActivationCache, l: usize| cache.get(&HookName::block(l, HookPoint::ResidPre));
        // metric[set][prompt]
        let mut metric = vec![vec![0f64; n]; sets.len()];
        let idx: Vec<usize> = (0..n).collect();
        let n_chunks = idx.chunks(16).len();
        for (ci, chunk) in idx.chunks(16).enumerate() {
            let rows: Vec<Vec<u32>> = chunk.iter().map(|&i| self.ids[i].clone()).collect();
            let donors: Vec<usize> = chunk.iter().map(|&i| self.donor(i)).collect();
            let b = Batch::left_padded(&rows, model.pad_id(), model.device())?;
            let width = shared
                .as_ref()
                .and_then(|(p, _)| p.width_for(&b, &vec![usize::MAX; chunk.len()]));
            let shares = |mode| width.is_some() && uniform(mode);
            // Clean inputs of the start blocks: whole rows for the sets that run whole, the
            // columns after the prefix for the sets that share it.
            let mut clean_whole = clean_hooks();
            if !starts.is_empty() && sets.iter().any(|&(_, m)| !shares(m)) {
                model.forward(&b, None, &mut clean_whole, LogitsAt::None)?;
            }
            let mut clean_rest = clean_hooks();
            if let (Some((p, _)), Some(w)) = (&shared, width) {
                if !starts.is_empty() && sets.iter().any(|&(_, m)| shares(m)) {
                    p.forward(model, &b, w, &mut clean_rest, LogitsAt::None)?;
                }
            }
            // Sets that share the prefix run several to a forward, sorted by their first
            // ablated block so that a group's sets start close together.
            let mut grouped: Vec<usize> =
                (0..sets.len()).filter(|&si| shares(sets[si].1)).collect();
            grouped.sort_by_key(|&si| (sets[si].1.name(), start_of(sets[si].0).unwrap_or(0)));
            let per_forward = (SETS_ROWS_PER_FORWARD / chunk.len()).max(1);
            if let (Some((clean_prefix, prefix_cache)), Some(w)) = (&shared, width) {
                for group in grouped.chunk_by(|&a, &b| sets[a].1 == sets[b].1) {
                    for group in group.chunks(per_forward) {
                        let heads: Vec<&[Head]> = group.iter().map(|&si| sets[si].0).collect();
                        let logits = self.shared_prefix_group(
                            &heads,
                            sets[group[0]].1,
                            clean_prefix,
                            prefix_cache,
                            &clean_rest.cache,
                            &rows,
                            w,
                        )?;
                        for (&si, logits) in group.iter().zip(logits.chunks(chunk.len())) {
                            for (&i, l) in chunk.iter().zip(logits) {
                                metric[si][i] = self.logit_diff(i, l)?;
                            }
                        }
                    }
                }
            }
            for (si, &(heads, mode)) in sets.iter().enumerate() {
                if shares(mode) {
                    continue;
                }
                let mut h = ablation_hooks(heads, mode, Some(self.bank), &donors)?;
                if let Some(l) = start_of(heads) {
                    h.start_at_block = Some((l, resid_at(&clean_whole.cache, l)?));
                }
                for (&i, l) in chunk.iter().zip(&self.last_logits(&b, &mut h)?) {
                    metric[si][i] = self.logit_diff(i, l)?;
                }
            }
            progress(ci + 1, n_chunks);
        }
        Ok(metric
            .iter()
            .map(|m| mean_ci95(&self.pair_gaps(m)).0)
            .collect())
    }

    /// The last logits of `rows` (one chunk of prompts) under each of several head sets of one
    /// uniform mode (zero, mean), all in one forward: the sets' prefix rows in one batch (row
    /// `g` ablates set `g`'s heads), then `rows` once per set on those prefixes (set `g`'s copy
    /// at rows `g * rows.len()..`). The forward starts at the group's earliest first ablated
    /// block from the clean inputs there; a set whose first ablated block comes later computes
    /// the clean values up to it, as its own forward would. Returns `[set][row][vocab]`
    /// flattened over sets and rows.
    #[allow(clippy::too_many_arguments)]
    fn shared_prefix_group(
        &self,
        sets: &[&[Head]],
        mode: AblationMode,
        clean_prefix: &SharedPrefix,
        prefix_cache: &ActivationCache,
        rest_cache: &ActivationCache,
        rows: &[Vec<u32>],
        width: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let model = self.model;
        let k = sets.len();
        // A set that starts at block 0 (or ablates nothing) makes the group start there.
        let start = sets
            .iter()
            .map(|heads| first_ablated_block(heads))
            .min()
            .flatten();
        let repeated = |cache: &ActivationCache, l: usize| -> Result<Tensor> {
            let x = cache.get(&HookName::block(l, HookPoint::ResidPre))?;
            Ok(Tensor::cat(&vec![&x; k], 0)?)
        };
        let mut prefix_hooks = group_ablation_hooks(sets, mode, self.bank)?;
        if let Some(l) = start {
            prefix_hooks.start_at_block = Some((l, repeated(prefix_cache, l)?));
        }
        let prefix_ids = [clean_prefix.ids().to_vec()];
        let prefix = SharedPrefix::for_row_groups(model, &prefix_ids, k, &mut prefix_hooks)?
            .ok_or_else(|| AnalysisError::Invalid("the shared prefix is too short".into()))?;
        let all_rows: Vec<Vec<u32>> = (0..k).flat_map(|_| rows.iter().cloned()).collect();
        let batch = Batch::left_padded(&all_rows, model.pad_id(), model.device())?;
        let group_of_row: Vec<usize> = (0..all_rows.len()).map(|r| r / rows.len()).collect();
        let (mut kv, rest) = prefix.split(&batch, width, &group_of_row)?;
        let mut hooks = group_ablation_hooks(sets, mode, self.bank)?;
        if let Some(l) = start {
            hooks.start_at_block = Some((l, repeated(rest_cache, l)?));
        }
        logit_rows(model.forward(&rest, Some(&mut kv), &mut hooks, LogitsAt::Last)?)
    }

    /// The last position's logits `[rows][vocab]` of one forward of `b` with `hooks`.
    fn last_logits(&self, b: &Batch, hooks: &mut Hooks) -> Result<Vec<Vec<f32>>> {
        logit_rows(self.model.forward(b, None, hooks, LogitsAt::Last)?)
    }

    /// Per pair: the novice prompt's metric minus the expert prompt's (`metric` per prompt).
    fn pair_gaps(&self, metric: &[f64]) -> Vec<f64> {
        (0..self.metrics.len())
            .map(|i| metric[2 * i] - metric[2 * i + 1])
            .collect()
    }

    /// The logit difference of prompt `i` (novice of pair i/2 at even i) from its last logits.
    fn logit_diff(&self, i: usize, logits: &[f32]) -> Result<f64> {
        match self.metrics[i / 2] {
            Metric::LogitDiff { a, b } => Ok((logits[a as usize] - logits[b as usize]) as f64),
            _ => Err(AnalysisError::Invalid(
                "ablation reports use the logit-difference metric".into(),
            )),
        }
    }

    pub fn run(&self, label: &str, heads: &[Head], mode: AblationMode) -> Result<AblationEffect> {
        Ok(self.run_many(&[(label, heads, mode)])?.remove(0))
    }

    /// [`Self::run`] of several ablations: each one's gap and probes, then every ablation's
    /// greedy answers in one generation (row `k * prompts + p`: prompt `p` under ablation `k`,
    /// each row ablating its own heads its own way), since decoding many rows per step costs
    /// little more than decoding a few.
    pub fn run_many(&self, runs: &[(&str, &[Head], AblationMode)]) -> Result<Vec<AblationEffect>> {
        let mut effects = runs
            .iter()
            .map(|&(label, heads, mode)| self.measure(label, heads, mode))
            .collect::<Result<Vec<_>>>()?;
        self.answer_grades(&mut effects)?;
        Ok(effects)
    }

    /// An ablation's gap and probes (no answers yet).
    fn measure(&self, label: &str, heads: &[Head], mode: AblationMode) -> Result<AblationEffect> {
        let model = self.model;
        // The gap's prompts with their probes' rows: one forward per chunk gives both the
        // last logits (the gap) and the ablated residual rows (the probes).
        let items: Vec<PromptItem> = self
            .pairs
            .iter()
            .flat_map(|(n, e)| [n.clone(), e.clone()])
            .collect();
        let ds = PersonaDataset {
            items,
            source: "ablation pairs".into(),
        };
        let rows = crate::resid_rows(model.config().n_layers);
        let hooks: Vec<HookName> = self.probe_rows.iter().map(|&r| rows[r]).collect();
        let spec = crate::harvest::HarvestSpec {
            hooks: hooks.clone(),
            rule: crate::harvest::PositionRule::Last,
            chat: self.chat,
            batch_size: 16,
            share_prefix: true,
        };
        let setup = |idx: &[usize], _b: &Batch, h: &mut Hooks| -> Result<()> {
            let donors: Vec<usize> = idx.iter().map(|&i| self.donor(i)).collect();
            add_ablation(h, heads, mode, Some(self.bank), &donors)
        };
        let (hv, logits) =
            crate::harvest::harvest_with_last_logits(model, &ds, &spec, Some(&setup), &|_| {})?;
        // The harvest renders the prompts itself: its token counts must be the setup's ids'.
        let same_ids = hv.meta.items.len() == self.ids.len()
            && hv
                .meta
                .items
                .iter()
                .zip(self.ids)
                .all(|(it, ids)| it.n_tokens == ids.len());
        // 1. Persona gap of the metric.
        let gaps = match same_ids {
            true => {
                let metric = logits
                    .iter()
                    .enumerate()
                    .map(|(i, l)| self.logit_diff(i, l))
                    .collect::<Result<Vec<f64>>>()?;
                self.pair_gaps(&metric)
            }
            false => self.gaps(heads, mode)?,
        };
        let (gap_mean, lo, hi) = mean_ci95(&gaps);
        // 2. Probes at later layers on the ablated residual stream.
        let opts = crate::probe::ProbeOptions {
            template_holdout: false,
            control: false,
            bootstrap: 50,
            generalization: false,
            ..Default::default()
        };
        let names: Vec<String> = hooks.iter().map(|h| h.to_string()).collect();
        let rep = crate::probe::probe_layers(
            &hv,
            &names,
            &["novice".to_string(), "expert".to_string()],
            false,
            &opts,
            &|| {},
        )?;
        let probe_accuracy = self
            .probe_rows
            .iter()
            .zip(&rep.layers)
            .map(|(&r, l)| (r, l.cv.accuracy))
            .collect();
        Ok(AblationEffect {
            label: label.into(),
            heads: heads.to_vec(),
            mode,
            gap_mean,
            gap_ci95: (lo, hi),
            gaps,
            probe_accuracy,
            grade_gap: None,
            novice_grade: None,
            expert_grade: None,
            samples: vec![],
        })
    }

    /// The complexity of greedy answers to the first `n_generate` pairs under each effect's
    /// ablation, in one generation.
    fn answer_grades(&self, effects: &mut [AblationEffect]) -> Result<()> {
        let model = self.model;
        let n = self.n_generate.min(self.pairs.len());
        if n == 0 || self.gen_tokens == 0 || effects.is_empty() {
            return Ok(());
        }
        let prompts: Vec<Vec<u32>> = self.ids[..2 * n].to_vec();
        let rows: Vec<Vec<u32>> = effects.iter().flat_map(|_| prompts.clone()).collect();
        let ablations: Vec<RowAblation> = effects
            .iter()
            .flat_map(|e| {
                (0..2 * n).map(move |i| RowAblation {
                    heads: e.heads.clone(),
                    mode: e.mode,
                    donor: self.donor(i),
                })
            })
            .collect();
        let mut h = row_ablation_hooks(&ablations, self.bank)?;
        let opts = persona_lens_engine::GenerateOptions {
            max_new_tokens: self.gen_tokens,
            stop_tokens: model.tokenizer.eos_ids.clone(),
            ..Default::default()
        };
        let gens = persona_lens_engine::generate(model, &rows, &opts, &mut h)?;
        for (e, gens) in effects.iter_mut().zip(gens.chunks(2 * n)) {
            let (mut ng, mut eg) = (Vec::new(), Vec::new());
            for (i, g) in gens.iter().enumerate() {
                let text = model.tokenizer.decode(&g.generated_ids, true)?;
                if let Some(grade) = persona_lens_rate::readability::complexity_grade(&text) {
                    if i % 2 == 0 {
                        ng.push(grade);
                    } else {
                        eg.push(grade);
                    }
                }
                if i < 4 {
                    e.samples.push((
                        self.pairs[i / 2].0.id.clone() + if i % 2 == 0 { "" } else { "/expert" },
                        text,
                    ));
                }
            }
            let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
            (e.novice_grade, e.expert_grade) = (mean(&ng), mean(&eg));
            e.grade_gap = e.novice_grade.zip(e.expert_grade).map(|(n, x)| x - n);
        }
        Ok(())
    }
}

/// The answer words of a ranking, chosen once on the pairs given (the selection split) and then
/// fixed for every pair and for the ablation on the other split: a single-token word from
/// `simple` and one from `technical`, neither among the token ids of any prompt of the pairs
/// (a word the prompt contains would be scored by copying), maximising the mean over pairs of
/// the novice-minus-expert difference of `logit[simple] - logit[technical]` at the last position.
/// Returns the two words and that mean (logits).
pub fn choose_answers(
    model: &Model,
    pairs: &[(PromptItem, PromptItem)],
    chat: bool,
    simple: &[String],
    technical: &[String],
) -> Result<(String, String, f64)> {
    let (s, _) = crate::lens::resolve_words(model, simple, false)?;
    let (t, _) = crate::lens::resolve_words(model, technical, false)?;
    let mut ids = Vec::new();
    for (n, e) in pairs {
        ids.push(model.encode_prompt(&n.text, chat)?);
        ids.push(model.encode_prompt(&e.text, chat)?);
    }
    let in_prompts: std::collections::HashSet<u32> = ids.iter().flatten().copied().collect();
    let s: Vec<_> = s
        .into_iter()
        .filter(|w| !in_prompts.contains(&w.token_id))
        .collect();
    let t: Vec<_> = t
        .into_iter()
        .filter(|w| !in_prompts.contains(&w.token_id))
        .collect();
    if s.is_empty() || t.is_empty() || pairs.is_empty() {
        return Err(AnalysisError::Invalid(
            "no single-token answer words absent from the prompts; give the answer words (answer_a, answer_b)"
                .into(),
        ));
    }
    let mut last: Vec<Vec<f32>> = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(16) {
        let b = Batch::left_padded(chunk, model.pad_id(), model.device())?;
        let l = model
            .forward(&b, None, &mut Hooks::new(), LogitsAt::Last)?
            .ok_or_else(|| AnalysisError::Invalid("no logits".into()))?
            .to_dtype(DType::F32)?;
        last.extend(l.to_vec2::<f32>()?);
    }
    let mut best = (f64::NEG_INFINITY, 0, 0);
    for (i, a) in s.iter().enumerate() {
        for (j, b) in t.iter().enumerate() {
            let d = |l: &[f32]| (l[a.token_id as usize] - l[b.token_id as usize]) as f64;
            let gap = (0..pairs.len())
                .map(|p| d(&last[2 * p]) - d(&last[2 * p + 1]))
                .sum::<f64>()
                / pairs.len() as f64;
            if gap > best.0 {
                best = (gap, i, j);
            }
        }
    }
    Ok((s[best.1].word.clone(), t[best.2].word.clone(), best.0))
}

// ---------------- head roles ----------------

/// Where a head attends at the last position of a novice prompt, and the role that suggests.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HeadRole {
    pub head: String,
    pub head_index: usize,
    pub layer: usize,
    pub persona_attention: f64,
    pub persona_positions: (usize, usize),
    pub prompt: String,
    pub role: String,
    pub top_attention: f64,
    pub top_position: usize,
    pub top_token: String,
}

/// Where a head at the last position looks: share of attention on the persona tokens and the
/// most attended token, on the first novice prompt of `topic` (built-in prompts of `persona_pair`);
/// a head reading the persona is a "persona mover". Empty when no prompt marks its persona span.
pub fn head_roles(
    model: &Model,
    persona_pair: &str,
    topic: &str,
    heads: &[Head],
) -> Result<Vec<HeadRole>> {
    use crate::dataset;
    let ds = dataset::generate(&crate::GenOptions {
        persona_pairs: vec![persona_pair.to_string()],
        topics: vec![],
        n_questions_per_pair: 1,
        templates: vec![],
        include_neutral: false,
        include_lexical_controls: false,
    })?;
    let ds = dataset::select_pairs(ds, &[topic.to_string()])?;
    let Some(item) = ds
        .items
        .iter()
        .find(|i| i.class == "novice" && i.persona_span.is_some())
    else {
        return Ok(vec![]);
    };
    let chat = model.is_chat_model();
    let span = item.persona_span.unwrap_or((0, 0));
    let (ids, spans) = model.encode_prompt_spans(&item.text, chat, &[span])?;
    let (p0, p1) = spans[0].unwrap_or((0, 0));
    let batch = Batch::left_padded(std::slice::from_ref(&ids), model.pad_id(), model.device())?;
    let mut hooks = Hooks::new();
    for &Head { layer: l, .. } in heads {
        hooks.capture(HookName::block(l, HookPoint::AttnPattern));
    }
    model.forward(&batch, None, &mut hooks, LogitsAt::None)?;
    let t = ids.len();
    let mut out = vec![];
    for &Head { layer: l, head: h } in heads {
        let pat = hooks
            .cache
            .get(&HookName::block(l, HookPoint::AttnPattern))?;
        // [1, heads, q, k] -> the last query's row
        let row: Vec<f32> = pat.get(0)?.get(h)?.get(t - 1)?.to_vec1()?;
        let persona: f64 = row[p0..p1].iter().map(|&x| x as f64).sum();
        let (top, topv) = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, &v)| (i, v as f64))
            .unwrap_or((0, 0.0));
        let tok = model.tokenizer.id_to_token(ids[top]);
        let bos = top == 0;
        let role = if persona >= 0.2 {
            format!(
                "persona mover: {:.0} % of its last-position attention is on the persona tokens",
                persona * 100.0
            )
        } else if bos {
            format!("mostly attends to the first token ({:.0} %, an attention sink); its effect comes from small shifts, not from reading the persona", topv * 100.0)
        } else {
            format!("reads {tok:?} (position {top}, {:.0} % of attention) more than the persona tokens ({:.0} %): a downstream or question-reading head", topv * 100.0, persona * 100.0)
        };
        out.push(HeadRole {
            head: format!("L{l}H{h}"),
            head_index: h,
            layer: l,
            persona_attention: persona,
            persona_positions: (p0, p1),
            prompt: item.text.clone(),
            role,
            top_attention: topv,
            top_position: top,
            top_token: tok,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::AblationMode;

    /// One name per mode: what `FromStr` reads, `name` gives and the result files write.
    #[test]
    fn ablation_mode_names_round_trip() {
        for m in [
            AblationMode::Zero,
            AblationMode::Mean,
            AblationMode::Resample,
        ] {
            assert_eq!(m.name().parse::<AblationMode>().unwrap(), m);
            assert_eq!(serde_json::to_value(m).unwrap(), m.name());
        }
    }
}
