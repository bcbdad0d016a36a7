//! Activation patching in the TransformerLens sense: run a *base* prompt, overwrite one activation
//! (a hook at a layer, positions, heads) with its value from a *source* prompt, and read a metric
//! at the last position. Denoising = base corrupted, source clean; noising = the reverse.
//!
//! Two implementations with the same results:
//! - [`Patcher::sweep_one_by_one`]: one full forward per patch through `Hooks` (the reference,
//!   the way refs-style scripts do it);
//! - [`Patcher::sweep`]: batched and incremental. A patch at layer l, first position p changes
//!   nothing before layer l nor before position p, so every patch starting at p shares the base
//!   run's keys/values for positions < p, computes only positions >= p, and joins the batch at
//!   its own layer from the cached base residual (rows grow as the layers go). A patch whose
//!   source and base values are bitwise equal (positions before the first differing token) is
//!   the base metric by construction and is not run. The metric needs only the answer tokens'
//!   unembedding rows for a logit difference.

use crate::lens::resolve_words;
use crate::{AnalysisError, Result};
use candle_core::{DType, Tensor, D};
use persona_lens_engine::decoder::Decoder;
use persona_lens_engine::hooks::HookFn;
use persona_lens_engine::layers::LayerKv;
use persona_lens_engine::{
    Batch, HookCtx, HookName, HookPoint, Hooks, KvCache, LogitsAt, Model, Op, Selector,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// `source`'s activations placed in `base`'s positions: equal lengths as is; otherwise base
/// values everywhere but the common suffix (end-aligned). Attention patterns/scores need equal
/// lengths (their key axis would differ) and are left out then.
fn align_source(
    base: &RunCache,
    source: &RunCache,
    hooks: &[HookName],
    suffix: Option<usize>,
) -> Result<HashMap<HookName, Tensor>> {
    let mut out = HashMap::new();
    for h in hooks {
        let s = source.hooks.cache.get(h)?;
        let Some(k) = suffix else {
            out.insert(*h, s);
            continue;
        };
        if matches!(h.point, HookPoint::AttnPattern | HookPoint::AttnScores) {
            continue;
        }
        let b = base.hooks.cache.get(h)?;
        let pa = h.point.pos_axis();
        let (lb, ls) = (b.dim(pa)?, s.dim(pa)?);
        let aligned = Tensor::cat(&[b.narrow(pa, 0, lb - k)?, s.narrow(pa, ls - k, k)?], pa)?;
        out.insert(*h, aligned);
    }
    Ok(out)
}

/// Hook points a patch can target.
pub const PATCHABLE: &[HookPoint] = &[
    HookPoint::ResidPre,
    HookPoint::ResidMid,
    HookPoint::AttnOut,
    HookPoint::MlpOut,
    HookPoint::ResidPost,
    HookPoint::AttnQ,
    HookPoint::AttnK,
    HookPoint::AttnV,
    HookPoint::AttnZ,
    HookPoint::AttnPattern,
    HookPoint::MlpPost,
];

/// A clean/corrupted prompt pair of equal token length.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatchPair {
    pub clean_text: String,
    pub corrupted_text: String,
    pub clean_ids: Vec<u32>,
    pub corrupted_ids: Vec<u32>,
    /// Token labels for plots: the clean token, or "clean/corrupted" where they differ.
    pub labels: Vec<String>,
    /// Positions where the token ids differ.
    pub differing_positions: Vec<usize>,
    pub chat: bool,
    /// Unequal lengths only: the prompts are aligned on their common token suffix of this length
    /// (positions are end-aligned; only suffix positions can be patched).
    pub suffix_len: Option<usize>,
}

impl PatchPair {
    pub fn new(model: &Model, clean: &str, corrupted: &str, chat: bool) -> Result<Self> {
        let c = model.encode_prompt(clean, chat)?;
        let k = model.encode_prompt(corrupted, chat)?;
        Self::from_ids(model, clean, corrupted, c, k, chat)
    }

    /// A pair that may differ in length, aligned on the common suffix of their token ids (the
    /// position rule for dataset pairs whose persona phrases tokenize differently).
    pub fn suffix_aligned(model: &Model, clean: &str, corrupted: &str, chat: bool) -> Result<Self> {
        let c = model.encode_prompt(clean, chat)?;
        let k = model.encode_prompt(corrupted, chat)?;
        if c.len() == k.len() {
            return Self::from_ids(model, clean, corrupted, c, k, chat);
        }
        let suffix = c
            .iter()
            .rev()
            .zip(k.iter().rev())
            .take_while(|(a, b)| a == b)
            .count();
        if suffix == 0 {
            return Err(AnalysisError::Invalid(format!(
                "'{clean}' and '{corrupted}' share no final tokens; nothing can be patched between them"
            )));
        }
        let tok = |i: u32| model.tokenizer.id_to_token(i);
        let labels = (0..k.len()).map(|i| tok(k[i])).collect();
        Ok(PatchPair {
            clean_text: clean.into(),
            corrupted_text: corrupted.into(),
            differing_positions: (0..k.len() - suffix).collect(),
            clean_ids: c,
            corrupted_ids: k,
            labels,
            chat,
            suffix_len: Some(suffix),
        })
    }

    pub fn from_ids(
        model: &Model,
        clean: &str,
        corrupted: &str,
        clean_ids: Vec<u32>,
        corrupted_ids: Vec<u32>,
        chat: bool,
    ) -> Result<Self> {
        let tok = |i: u32| model.tokenizer.id_to_token(i);
        if clean_ids.len() != corrupted_ids.len() {
            return Err(AnalysisError::Invalid(format!(
                "clean and corrupted prompts have different token lengths ({} vs {}): clean {:?}, corrupted {:?}; \
                 position-wise patching needs equal lengths, so pick persona words with the same token count",
                clean_ids.len(),
                corrupted_ids.len(),
                clean_ids.iter().map(|&i| tok(i)).collect::<Vec<_>>(),
                corrupted_ids.iter().map(|&i| tok(i)).collect::<Vec<_>>(),
            )));
        }
        let differing: Vec<usize> = (0..clean_ids.len())
            .filter(|&i| clean_ids[i] != corrupted_ids[i])
            .collect();
        if differing.is_empty() {
            return Err(AnalysisError::Invalid(
                "clean and corrupted prompts tokenize identically; patching between them measures nothing".into(),
            ));
        }
        let labels = (0..clean_ids.len())
            .map(|i| {
                if clean_ids[i] == corrupted_ids[i] {
                    tok(clean_ids[i])
                } else {
                    format!("{}/{}", tok(clean_ids[i]), tok(corrupted_ids[i]))
                }
            })
            .collect();
        Ok(PatchPair {
            clean_text: clean.into(),
            corrupted_text: corrupted.into(),
            clean_ids,
            corrupted_ids,
            labels,
            differing_positions: differing,
            chat,
            suffix_len: None,
        })
    }

    /// Length of the corrupted prompt (the base of denoising runs; labels refer to it).
    pub fn len(&self) -> usize {
        self.corrupted_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.corrupted_ids.is_empty()
    }

    pub fn base_len(&self, dir: Direction) -> usize {
        match dir {
            Direction::Denoise => self.corrupted_ids.len(),
            Direction::Noise => self.clean_ids.len(),
        }
    }
}

/// What is read at the last position of a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Metric {
    /// `logit[a] - logit[b]`.
    LogitDiff { a: u32, b: u32 },
    /// `log_softmax[a] - log_softmax[b]` (equal to the logit difference; kept for symmetry).
    /// `log p(a)` of one token.
    LogProb { token: u32 },
    /// KL(clean || run) of the next-token distributions, in nats.
    KlFromClean,
}

impl Metric {
    pub fn describe(&self, model: &Model) -> String {
        let t = |i: u32| model.tokenizer.id_to_token(i);
        match self {
            Metric::LogitDiff { a, b } => format!("logit[{}] - logit[{}]", t(*a), t(*b)),
            Metric::LogProb { token } => format!("log p({})", t(*token)),
            Metric::KlFromClean => "KL(clean || patched) in nats".into(),
        }
    }

    /// The logit-difference metric from two answer words (each must be one token).
    pub fn logit_diff_words(model: &Model, a: &str, b: &str) -> Result<Self> {
        let (w, _) = resolve_words(model, &[a.to_string(), b.to_string()], true)?;
        Ok(Metric::LogitDiff {
            a: w[0].token_id,
            b: w[1].token_id,
        })
    }

    pub fn units(&self) -> &'static str {
        match self {
            Metric::LogitDiff { .. } => "logits",
            Metric::LogProb { .. } => "nats (log-prob)",
            Metric::KlFromClean => "nats",
        }
    }
}

/// Which way the patch goes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Base = corrupted, source = clean (clean -> corrupted): what restores the clean behaviour.
    Denoise,
    /// Base = clean, source = corrupted (corrupted -> clean): what breaks it.
    Noise,
}

/// One patch: `hook` at `layer`, the given positions (and heads for per-head hooks) taken from
/// the source run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    pub layer: usize,
    pub point: HookPoint,
    pub positions: Vec<usize>,
    pub heads: Option<Vec<usize>>,
}

impl Variant {
    pub fn hook(&self) -> HookName {
        HookName::block(self.layer, self.point)
    }
}

/// The standard sweeps.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SweepKind {
    /// `[layer][position]` of `hook_resid_pre`.
    ResidPre,
    ResidMid,
    AttnOut,
    MlpOut,
    /// `[layer][head]`: head h's `attn.hook_z` at the last position.
    ZLast,
    /// `[layer][head]`: head h's `attn.hook_z` at every position.
    ZAll,
    /// `[layer][head][position]`: head h's `attn.hook_z` at one position.
    ZByPos,
    /// `[layer][head]`: head h's attention pattern (every query position).
    Pattern,
}

impl SweepKind {
    pub const ALL: &'static [SweepKind] = &[
        SweepKind::ResidPre,
        SweepKind::ResidMid,
        SweepKind::AttnOut,
        SweepKind::MlpOut,
        SweepKind::ZLast,
        SweepKind::ZAll,
        SweepKind::ZByPos,
        SweepKind::Pattern,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            SweepKind::ResidPre => "resid_pre",
            SweepKind::ResidMid => "resid_mid",
            SweepKind::AttnOut => "attn_out",
            SweepKind::MlpOut => "mlp_out",
            SweepKind::ZLast => "z_last",
            SweepKind::ZAll => "z_all",
            SweepKind::ZByPos => "z_by_pos",
            SweepKind::Pattern => "pattern",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                AnalysisError::Invalid(format!(
                    "unknown sweep '{s}'; use one of {}",
                    Self::ALL
                        .iter()
                        .map(|k| k.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    pub fn point(&self) -> HookPoint {
        match self {
            SweepKind::ResidPre => HookPoint::ResidPre,
            SweepKind::ResidMid => HookPoint::ResidMid,
            SweepKind::AttnOut => HookPoint::AttnOut,
            SweepKind::MlpOut => HookPoint::MlpOut,
            SweepKind::ZLast | SweepKind::ZAll | SweepKind::ZByPos => HookPoint::AttnZ,
            SweepKind::Pattern => HookPoint::AttnPattern,
        }
    }

    /// The variants in row-major order of [`SweepKind::shape`].
    pub fn variants(&self, n_layers: usize, n_heads: usize, seq: usize) -> Vec<Variant> {
        let p = self.point();
        let mut v = Vec::new();
        for l in 0..n_layers {
            match self {
                SweepKind::ResidPre
                | SweepKind::ResidMid
                | SweepKind::AttnOut
                | SweepKind::MlpOut => {
                    for pos in 0..seq {
                        v.push(Variant {
                            layer: l,
                            point: p,
                            positions: vec![pos],
                            heads: None,
                        });
                    }
                }
                SweepKind::ZLast | SweepKind::ZAll | SweepKind::Pattern => {
                    for h in 0..n_heads {
                        v.push(Variant {
                            layer: l,
                            point: p,
                            positions: if *self == SweepKind::ZLast {
                                vec![seq - 1]
                            } else {
                                (0..seq).collect()
                            },
                            heads: Some(vec![h]),
                        });
                    }
                }
                SweepKind::ZByPos => {
                    for h in 0..n_heads {
                        for pos in 0..seq {
                            v.push(Variant {
                                layer: l,
                                point: p,
                                positions: vec![pos],
                                heads: Some(vec![h]),
                            });
                        }
                    }
                }
            }
        }
        v
    }

    pub fn shape(&self, n_layers: usize, n_heads: usize, seq: usize) -> Vec<usize> {
        match self {
            SweepKind::ResidPre | SweepKind::ResidMid | SweepKind::AttnOut | SweepKind::MlpOut => {
                vec![n_layers, seq]
            }
            SweepKind::ZLast | SweepKind::ZAll | SweepKind::Pattern => vec![n_layers, n_heads],
            SweepKind::ZByPos => vec![n_layers, n_heads, seq],
        }
    }

    /// Axis names of [`SweepKind::shape`].
    pub fn axes(&self) -> Vec<&'static str> {
        match self.shape(1, 1, 1).len() {
            3 => vec!["layer", "head", "position"],
            _ if matches!(
                self,
                SweepKind::ZLast | SweepKind::ZAll | SweepKind::Pattern
            ) =>
            {
                vec!["layer", "head"]
            }
            _ => vec!["layer", "position"],
        }
    }
}

/// One cached run: activations at every patchable hook, its keys/values and final residual.
pub struct RunCache {
    pub hooks: Hooks,
    pub kv: KvCache,
    pub logits_last: Tensor,
}

fn cache_run(model: &Model, ids: &[u32], hooks_wanted: &[HookName]) -> Result<RunCache> {
    let batch = Batch::left_padded(&[ids.to_vec()], model.pad_id(), model.device())?;
    let mut hooks = Hooks::new();
    hooks.capture_all(hooks_wanted);
    let mut kv = KvCache::new(model.config().n_layers, batch.pad.clone());
    let logits = model
        .forward(&batch, Some(&mut kv), &mut hooks, LogitsAt::Last)?
        .ok_or_else(|| AnalysisError::Invalid("forward returned no logits".into()))?;
    Ok(RunCache {
        hooks,
        kv,
        logits_last: logits.get(0)?,
    })
}

/// Every patchable hook of every layer.
fn patchable_hooks(n_layers: usize) -> Vec<HookName> {
    (0..n_layers)
        .flat_map(|l| PATCHABLE.iter().map(move |&p| HookName::block(l, p)))
        .collect()
}

/// Evaluates a metric on last-position residuals, touching only the unembedding rows it needs.
pub(crate) struct MetricEval {
    metric: Metric,
    /// `[k, d]` unembedding rows for a logit difference.
    rows: Option<Tensor>,
    clean_log_probs: Option<Tensor>,
}

fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let s = x.broadcast_sub(&m)?;
    let lse = s.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(s.broadcast_sub(&lse)?)
}

impl MetricEval {
    fn new(model: &Model, metric: &Metric, clean_logits: &Tensor) -> Result<Self> {
        let vocab = model.config().vocab_size as u32;
        let check = |t: u32| {
            if t >= vocab {
                Err(AnalysisError::Invalid(format!(
                    "answer token id {t} is out of range (vocabulary of {vocab})"
                )))
            } else {
                Ok(())
            }
        };
        let rows = match metric {
            Metric::LogitDiff { a, b } => {
                check(*a)?;
                check(*b)?;
                let ids = Tensor::new(&[*a, *b], model.device())?;
                Some(
                    model
                        .decoder
                        .lm_head
                        .dense_rows(&ids)?
                        .to_dtype(DType::F32)?,
                )
            }
            Metric::LogProb { token } => {
                check(*token)?;
                None
            }
            Metric::KlFromClean => None,
        };
        let clean_log_probs = match metric {
            Metric::KlFromClean => Some(log_softmax(&clean_logits.unsqueeze(0)?)?),
            _ => None,
        };
        Ok(MetricEval {
            metric: metric.clone(),
            rows,
            clean_log_probs,
        })
    }

    /// Metric per row of full logits `[b, vocab]`.
    pub(crate) fn of_logits(&self, logits: &Tensor) -> Result<Vec<f32>> {
        let v: Vec<f32> = match &self.metric {
            Metric::LogitDiff { a, b } => {
                let a = logits.narrow(1, *a as usize, 1)?;
                let b = logits.narrow(1, *b as usize, 1)?;
                (a - b)?.squeeze(1)?.to_vec1()?
            }
            Metric::LogProb { token } => log_softmax(logits)?
                .narrow(1, *token as usize, 1)?
                .squeeze(1)?
                .to_vec1()?,
            Metric::KlFromClean => {
                let lp = log_softmax(logits)?;
                let cl = self.clean_log_probs.as_ref().expect("set for KL");
                let p = cl.exp()?;
                p.broadcast_mul(&cl.broadcast_sub(&lp)?)?
                    .sum(1)?
                    .to_vec1()?
            }
        };
        Ok(v)
    }

    /// Metric per row of last-position residuals `[b, d]` (before the final norm).
    pub(crate) fn of_resid(&self, dec: &Decoder, x: &Tensor) -> Result<Vec<f32>> {
        match &self.rows {
            Some(rows) => {
                let normed = dec.final_norm.forward(x)?;
                let l = normed.matmul(&rows.t()?)?;
                let l = persona_lens_engine::layers::softcap(l, dec.cfg.final_logit_softcap)?;
                let d = (l.narrow(1, 0, 1)? - l.narrow(1, 1, 1)?)?.squeeze(1)?;
                Ok(d.to_vec1()?)
            }
            None => self.of_logits(&dec.unembed_resid(x)?),
        }
    }
}

/// The clean and corrupted runs of a pair, cached once, and the metric; runs sweeps.
pub struct Patcher<'a> {
    pub model: &'a Model,
    pub pair: PatchPair,
    pub metric: Metric,
    pub clean: RunCache,
    pub corrupted: RunCache,
    pub clean_metric: f32,
    pub corrupted_metric: f32,
    pub(crate) eval: MetricEval,
    /// Clean activations in the corrupted run's positions, and the reverse (suffix alignment;
    /// the caches themselves for equal lengths).
    clean_in_corrupted: HashMap<HookName, Tensor>,
    corrupted_in_clean: HashMap<HookName, Tensor>,
    /// Most rows in one batched forward.
    pub max_rows: usize,
}

/// Result of a sweep: patched metric values (not normalised) in row-major order of `shape`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sweep {
    pub kind: SweepKind,
    pub direction: Direction,
    pub shape: Vec<usize>,
    pub axes: Vec<String>,
    pub values: Vec<f32>,
    /// Patches that were actually run (the rest were bitwise no-ops).
    pub n_run: usize,
}

impl Sweep {
    /// `(patched - corrupted) / (clean - corrupted)`: 1 = fully clean behaviour, 0 = corrupted.
    pub fn normalized(&self, clean: f32, corrupted: f32) -> Vec<f32> {
        let den = clean - corrupted;
        self.values
            .iter()
            .map(|v| {
                if den.abs() < 1e-12 {
                    f32::NAN
                } else {
                    (v - corrupted) / den
                }
            })
            .collect()
    }

    /// Values as nested rows of the last axis (2-D: `[a][b]`; 3-D flattened over the first two).
    pub fn rows(&self) -> Vec<Vec<f32>> {
        let last = *self.shape.last().unwrap_or(&1);
        self.values
            .chunks(last.max(1))
            .map(|c| c.to_vec())
            .collect()
    }
}

impl<'a> Patcher<'a> {
    pub fn new(model: &'a Model, pair: PatchPair, metric: Metric) -> Result<Self> {
        let hooks = patchable_hooks(model.config().n_layers);
        let clean = cache_run(model, &pair.clean_ids, &hooks)?;
        let corrupted = cache_run(model, &pair.corrupted_ids, &hooks)?;
        let eval = MetricEval::new(model, &metric, &clean.logits_last)?;
        let clean_in_corrupted = align_source(&corrupted, &clean, &hooks, pair.suffix_len)?;
        let corrupted_in_clean = align_source(&clean, &corrupted, &hooks, pair.suffix_len)?;
        let clean_metric = eval.of_logits(&clean.logits_last.unsqueeze(0)?)?[0];
        let corrupted_metric = eval.of_logits(&corrupted.logits_last.unsqueeze(0)?)?[0];
        Ok(Patcher {
            model,
            pair,
            metric,
            clean,
            corrupted,
            clean_metric,
            corrupted_metric,
            eval,
            clean_in_corrupted,
            corrupted_in_clean,
            max_rows: 64,
        })
    }

    /// The base run, the source activations in its positions, the base ids.
    pub(crate) fn runs(&self, dir: Direction) -> (&RunCache, &HashMap<HookName, Tensor>, &[u32]) {
        match dir {
            Direction::Denoise => (
                &self.corrupted,
                &self.clean_in_corrupted,
                &self.pair.corrupted_ids,
            ),
            Direction::Noise => (&self.clean, &self.corrupted_in_clean, &self.pair.clean_ids),
        }
    }

    pub fn source_activation(&self, dir: Direction, h: &HookName) -> Result<Tensor> {
        self.runs(dir).1.get(h).cloned().ok_or_else(|| {
            AnalysisError::Invalid(format!(
                "{h} cannot be patched between prompts of different lengths (its key axis differs); use equal-length prompts"
            ))
        })
    }

    pub fn base_metric(&self, dir: Direction) -> f32 {
        match dir {
            Direction::Denoise => self.corrupted_metric,
            Direction::Noise => self.clean_metric,
        }
    }

    fn check_variant(&self, v: &Variant, dir: Direction) -> Result<()> {
        let cfg = self.model.config();
        if v.layer >= cfg.n_layers {
            return Err(AnalysisError::Invalid(format!(
                "layer {} out of range: the model has {} layers (0..{})",
                v.layer,
                cfg.n_layers,
                cfg.n_layers - 1
            )));
        }
        if !PATCHABLE.contains(&v.point) {
            return Err(AnalysisError::Invalid(format!(
                "hook point {} cannot be patched; use one of {}",
                v.point.suffix(),
                PATCHABLE
                    .iter()
                    .map(|p| p.suffix())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if v.positions.is_empty() {
            return Err(AnalysisError::Invalid("a patch needs positions".into()));
        }
        let n = self.pair.base_len(dir);
        if let Some(&p) = v.positions.iter().find(|&&p| p >= n) {
            return Err(AnalysisError::Invalid(format!(
                "position {p} is past the prompt's last token ({n} tokens)"
            )));
        }
        if let Some(hs) = &v.heads {
            if v.point.head_axis().is_none() {
                return Err(AnalysisError::Invalid(format!(
                    "hook {} has no heads; drop the head selection",
                    v.point.suffix()
                )));
            }
            let n = match v.point {
                HookPoint::AttnK | HookPoint::AttnV => cfg.n_kv_heads,
                _ => cfg.n_heads,
            };
            if let Some(&h) = hs.iter().find(|&&h| h >= n) {
                return Err(AnalysisError::Invalid(format!(
                    "head {h} out of range: {} has {n} heads (0..{})",
                    v.hook(),
                    n - 1
                )));
            }
        }
        Ok(())
    }

    /// Reference: one full forward per patch through hooks.
    pub fn sweep_one_by_one(&self, variants: &[Variant], dir: Direction) -> Result<Vec<f32>> {
        let (_, _, base_ids) = self.runs(dir);
        let batch = Batch::left_padded(
            &[base_ids.to_vec()],
            self.model.pad_id(),
            self.model.device(),
        )?;
        let mut out = Vec::with_capacity(variants.len());
        for v in variants {
            self.check_variant(v, dir)?;
            let src = self.source_activation(dir, &v.hook())?;
            let mut sel = Selector::all().positions(v.positions.clone());
            if let Some(h) = &v.heads {
                sel = sel.heads(h.clone());
            }
            let mut hooks = Hooks::new();
            hooks.intervene(v.hook(), Op::Replace(src), sel);
            let logits = self
                .model
                .forward(&batch, None, &mut hooks, LogitsAt::Last)?
                .ok_or_else(|| AnalysisError::Invalid("no logits".into()))?;
            out.push(self.eval.of_logits(&logits)?[0]);
        }
        Ok(out)
    }

    /// The base activation at `v`'s hook with `v`'s slots taken from the source, shaped
    /// `[1, ...]`, and the first position where it differs from the base (earlier positions are
    /// untouched, so the patch can start there); None when the two are bitwise equal (a no-op).
    fn patched_full(&self, v: &Variant, dir: Direction) -> Result<Option<(Tensor, usize)>> {
        let (base, _, _) = self.runs(dir);
        let h = v.hook();
        let b = base.hooks.cache.get(&h)?;
        let s = self.source_activation(dir, &h)?;
        let pa = v.point.pos_axis();
        let seq = b.dim(pa)?;
        let dims = b.dims().to_vec();
        // Mask over (positions, heads).
        let mut shape = vec![1usize; dims.len()];
        shape[pa] = seq;
        let pm: Vec<u8> = (0..seq).map(|i| v.positions.contains(&i) as u8).collect();
        let mut m = Tensor::from_vec(pm, seq, b.device())?
            .reshape(shape)?
            .to_dtype(DType::F32)?;
        if let (Some(hs), Some(ha)) = (&v.heads, v.point.head_axis()) {
            let nh = dims[ha];
            let hv: Vec<f32> = (0..nh).map(|i| hs.contains(&i) as u8 as f32).collect();
            let mut hshape = vec![1usize; dims.len()];
            hshape[ha] = nh;
            m = m.broadcast_mul(&Tensor::from_vec(hv, nh, b.device())?.reshape(hshape)?)?;
        }
        let m = m
            .to_dtype(DType::U8)?
            .broadcast_as(b.shape())?
            .contiguous()?;
        let patched = m.where_cond(&s, &b)?;
        // Changed elements per position: sum over every other axis.
        let mut changed = patched.ne(&b)?.to_dtype(DType::F32)?;
        for ax in (0..dims.len()).rev() {
            if ax != pa {
                changed = changed.sum(ax)?;
            }
        }
        let per_pos: Vec<f32> = changed.to_vec1()?;
        match per_pos.iter().position(|&c| c > 0.0) {
            Some(first) => Ok(Some((patched, first))),
            None => Ok(None),
        }
    }

    /// Batched, incremental patching (see the module docs); equals [`Self::sweep_one_by_one`]
    /// to float noise.
    pub fn sweep(
        &self,
        variants: &[Variant],
        dir: Direction,
        progress: Option<&dyn Fn(usize)>,
    ) -> Result<Vec<f32>> {
        Ok(self.sweep_counted(variants, dir, progress)?.0)
    }

    /// [`Self::sweep`] and the number of patches actually run.
    pub fn sweep_counted(
        &self,
        variants: &[Variant],
        dir: Direction,
        progress: Option<&dyn Fn(usize)>,
    ) -> Result<(Vec<f32>, usize)> {
        for v in variants {
            self.check_variant(v, dir)?;
        }
        let base_metric = self.base_metric(dir);
        let mut out = vec![base_metric; variants.len()];
        // Group by the first position a patch changes (bitwise no-ops are dropped): positions
        // before it share the base run's keys/values. For patches over every position of a
        // chat-templated prompt this skips the whole shared template prefix.
        // (Two passes so that only one group's patched tensors are held at a time.)
        let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        let mut done = 0usize;
        let mut n_run = 0usize;
        for (i, v) in variants.iter().enumerate() {
            match self.patched_full(v, dir)? {
                Some((_, first)) => groups.entry(first).or_default().push(i),
                None => done += 1,
            }
        }
        for (start, mut idxs) in groups {
            idxs.sort_by_key(|&i| variants[i].layer);
            let mut work: Vec<(usize, Tensor)> = Vec::with_capacity(idxs.len());
            for i in idxs {
                let (t, _) = self
                    .patched_full(&variants[i], dir)?
                    .expect("changed above");
                let pa = variants[i].point.pos_axis();
                let seq = t.dim(pa)?;
                work.push((i, t.narrow(pa, start, seq - start)?.contiguous()?));
            }
            for chunk in work.chunks(self.max_rows.max(1)) {
                let vals = self.run_chunk(variants, chunk, dir, start)?;
                for ((i, _), v) in chunk.iter().zip(vals) {
                    out[*i] = v;
                }
                done += chunk.len();
                n_run += chunk.len();
                if let Some(p) = progress {
                    p(done);
                }
            }
        }
        Ok((out, n_run))
    }

    fn run_chunk(
        &self,
        variants: &[Variant],
        chunk: &[(usize, Tensor)],
        dir: Direction,
        start: usize,
    ) -> Result<Vec<f32>> {
        let dec = &self.model.decoder;
        let (base, _, _) = self.runs(dir);
        let seq = self.pair.base_len(dir);
        let t = seq - start;
        let cc = dec.call_ctx(&[0], start, t)?;
        let first_layer = variants[chunk[0].0].layer;
        let mut x: Option<Tensor> = None;
        let mut next = 0usize;
        for l in first_layer..dec.cfg.n_layers {
            // Rows joining at this layer, from the base residual (patched if the patch is there).
            let mut joining: Vec<Tensor> = Vec::new();
            let mut interventions: Vec<(usize, HookPoint, Tensor)> = Vec::new();
            let b_old = x.as_ref().map(|x| x.dim(0)).transpose()?.unwrap_or(0);
            while next < chunk.len() && variants[chunk[next].0].layer == l {
                let (i, patched) = &chunk[next];
                let v = &variants[*i];
                if v.point == HookPoint::ResidPre {
                    joining.push(patched.clone());
                } else {
                    let r = base
                        .hooks
                        .cache
                        .get(&HookName::block(l, HookPoint::ResidPre))?
                        .narrow(1, start, t)?;
                    joining.push(r);
                    interventions.push((b_old + joining.len() - 1, v.point, patched.clone()));
                }
                next += 1;
            }
            if !joining.is_empty() {
                let mut parts: Vec<Tensor> = x.iter().cloned().collect();
                parts.extend(joining);
                x = Some(Tensor::cat(&parts, 0)?);
            }
            let Some(xc) = x.take() else { continue };
            let b = xc.dim(0)?;
            let mut hooks = Hooks::new();
            let mut points: Vec<HookPoint> = interventions.iter().map(|(_, p, _)| *p).collect();
            points.dedup();
            for p in points {
                let rows: Vec<(usize, Tensor)> = interventions
                    .iter()
                    .filter(|(_, q, _)| *q == p)
                    .map(|(r, _, t)| (*r, t.clone()))
                    .collect();
                let f: HookFn = Arc::new(move |a: &Tensor, _ctx: &HookCtx| {
                    let mut pieces: Vec<Tensor> = Vec::with_capacity(a.dim(0)?);
                    for r in 0..a.dim(0)? {
                        match rows.iter().find(|(rr, _)| *rr == r) {
                            Some((_, t)) => pieces.push(t.clone()),
                            None => pieces.push(a.narrow(0, r, 1)?),
                        }
                    }
                    Tensor::cat(&pieces, 0)
                });
                hooks.intervene(HookName::block(l, p), Op::Func(f), Selector::all());
            }
            let mut kv = if start > 0 {
                let lk = &base.kv.layers[l];
                let grow = |t: Option<Tensor>| -> Result<Option<Tensor>> {
                    let t = t.ok_or_else(|| {
                        AnalysisError::Invalid("base run has no cached keys".into())
                    })?;
                    let (_, h, _, d) = t.dims4()?;
                    Ok(Some(
                        t.narrow(2, 0, start)?
                            .broadcast_as((b, h, start, d))?
                            .contiguous()?,
                    ))
                };
                LayerKv::new(grow(lk.k()?)?, grow(lk.v()?)?)?
            } else {
                LayerKv::default()
            };
            let mut ctx = HookCtx {
                name: HookName::block(l, HookPoint::ResidPre),
                pad: vec![0; b],
                start,
            };
            x = Some(dec.block_forward(l, xc, &cc, Some(&mut kv), &mut hooks, &mut ctx)?);
        }
        let x = x.ok_or_else(|| AnalysisError::Invalid("empty patch chunk".into()))?;
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        self.eval.of_resid(dec, &last)
    }

    /// A whole standard sweep.
    pub fn run_sweep(
        &self,
        kind: SweepKind,
        dir: Direction,
        progress: Option<&dyn Fn(usize)>,
    ) -> Result<Sweep> {
        let cfg = self.model.config();
        let seq = self.pair.base_len(dir);
        let variants = kind.variants(cfg.n_layers, cfg.n_heads, seq);
        let (values, n_run) = self.sweep_counted(&variants, dir, progress)?;
        Ok(Sweep {
            kind,
            direction: dir,
            shape: kind.shape(cfg.n_layers, cfg.n_heads, seq),
            axes: kind.axes().into_iter().map(String::from).collect(),
            values,
            n_run,
        })
    }
}

/// Candidate answer words (the golden set's lists): simple vs technical continuations.
pub const SIMPLE_ANSWERS: &[&str] = &["simple", "easy", "like", "fun", "very", "just"];
pub const TECHNICAL_ANSWERS: &[&str] = &[
    "time",
    "relativity",
    "dilation",
    "Einstein",
    "special",
    "physics",
];

/// The logit-difference metric of a pair: the named answer words, or (None) the automatic
/// choice from [`SIMPLE_ANSWERS`] and [`TECHNICAL_ANSWERS`] (see [`auto_answers`]).
pub fn pair_metric(
    model: &Model,
    pair: &PatchPair,
    answers: Option<(&str, &str)>,
) -> Result<Metric> {
    match answers {
        Some((a, b)) => Metric::logit_diff_words(model, a, b),
        None => {
            let words = |ws: &[&str]| ws.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            auto_answers(
                model,
                pair,
                &words(SIMPLE_ANSWERS),
                &words(TECHNICAL_ANSWERS),
            )
        }
    }
}

/// Picks the logit-difference metric `logit[a] - logit[b]`, a from `simple`, b from `technical`
/// (single-token words only, preferring words ranked < 200 in either run's last-position logits),
/// maximising clean minus corrupted difference: the golden set's selection rule.
pub fn auto_answers(
    model: &Model,
    pair: &PatchPair,
    simple: &[String],
    technical: &[String],
) -> Result<Metric> {
    let (s, _) = resolve_words(model, simple, false)?;
    let (t, _) = resolve_words(model, technical, false)?;
    if s.is_empty() || t.is_empty() {
        return Err(AnalysisError::Invalid(
            "no single-token answer candidates for this tokenizer; give the answer words (answer_a, answer_b)"
                .into(),
        ));
    }
    let last = |ids: &[u32]| -> Result<Vec<f32>> {
        let b = Batch::left_padded(&[ids.to_vec()], model.pad_id(), model.device())?;
        let l = model
            .forward(&b, None, &mut Hooks::new(), LogitsAt::Last)?
            .ok_or_else(|| AnalysisError::Invalid("no logits".into()))?;
        Ok(l.get(0)?.to_vec1()?)
    };
    let (lc, lk) = (last(&pair.clean_ids)?, last(&pair.corrupted_ids)?);
    let rank = |row: &[f32], id: u32| row.iter().filter(|&&x| x > row[id as usize]).count();
    let top = |id: u32| rank(&lc, id) < 200 || rank(&lk, id) < 200;
    let pick = |ws: &[crate::lens::TrackedWord]| -> Vec<u32> {
        let good: Vec<u32> = ws.iter().map(|w| w.token_id).filter(|&i| top(i)).collect();
        if good.is_empty() {
            ws.iter().map(|w| w.token_id).collect()
        } else {
            good
        }
    };
    let (sa, tb) = (pick(&s), pick(&t));
    let mut best = (f32::NEG_INFINITY, sa[0], tb[0]);
    for &a in &sa {
        for &b in &tb {
            let gap = (lc[a as usize] - lc[b as usize]) - (lk[a as usize] - lk[b as usize]);
            if gap > best.0 {
                best = (gap, a, b);
            }
        }
    }
    Ok(Metric::LogitDiff {
        a: best.1,
        b: best.2,
    })
}
