//! The logit lens: `unembed(final_norm(resid))` for every residual row at a position, with the
//! model's own final norm and soft-cap, so the last row equals the model's real logits. Plus
//! tracked token sets (expert vs simple words) with log-prob, rank and the expert-minus-simple
//! logit difference per layer, aggregated per persona over a dataset.

use crate::dataset::{encode_item, PersonaDataset};
use crate::harvest::PositionRule;
use crate::stats::mean_ci95;
use crate::{resid_rows, AnalysisError, Result};
use candle_core::Tensor;
use persona_lens_engine::{Batch, Hooks, LogitsAt, Model};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Residual rows `[n_layers + 1, d]` at `position` of one prompt (raw, before the final norm).
pub fn resid_at(model: &Model, ids: &[u32], position: usize) -> Result<Tensor> {
    if position >= ids.len() {
        return Err(AnalysisError::Invalid(format!(
            "position {position} is past the prompt's last token ({} tokens)",
            ids.len()
        )));
    }
    let rows = resid_rows(model.config().n_layers);
    let batch = Batch::left_padded(&[ids.to_vec()], model.pad_id(), model.device())?;
    let mut hooks = Hooks::new();
    hooks.capture_all(&rows);
    model.forward(&batch, None, &mut hooks, LogitsAt::None)?;
    let vs: Vec<Tensor> = rows
        .iter()
        .map(|h| Ok(hooks.cache.get(h)?.get(0)?.get(position)?))
        .collect::<Result<_>>()?;
    Ok(Tensor::stack(&vs, 0)?)
}

/// Lens logits `[rows, vocab]` (f32) for residual rows `[rows, d]`.
pub fn lens_logits(model: &Model, resid: &Tensor) -> Result<Vec<Vec<f32>>> {
    let l = model.decoder.unembed_resid(resid)?;
    Ok(l.to_dtype(candle_core::DType::F32)?.to_vec2()?)
}

fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let k = k.min(row.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
        row[b as usize].total_cmp(&row[a as usize])
    });
    let mut top: Vec<(u32, f32)> = idx[..k].iter().map(|&i| (i, row[i as usize])).collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top
}

fn log_softmax_at(row: &[f32], ids: &[u32]) -> Vec<(f64, usize)> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
    let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    ids.iter()
        .map(|&i| {
            let v = row[i as usize];
            let rank = row.iter().filter(|&&x| x > v).count();
            (v as f64 - lse, rank)
        })
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LensLayer {
    /// 0 = embeddings, i = output of block i - 1 (raw residual).
    pub resid_index: usize,
    pub top: Vec<(u32, f32)>,
    pub top_tokens: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LensResult {
    pub input_ids: Vec<u32>,
    pub position: usize,
    pub layers: Vec<LensLayer>,
}

/// Logit lens of one prompt at `position` (default: last).
pub fn logit_lens(
    model: &Model,
    ids: &[u32],
    position: Option<usize>,
    k: usize,
) -> Result<LensResult> {
    let pos = position.unwrap_or(ids.len().saturating_sub(1));
    let resid = resid_at(model, ids, pos)?;
    let logits = lens_logits(model, &resid)?;
    let layers = logits
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let top = top_k(row, k);
            LensLayer {
                resid_index: i,
                top_tokens: top
                    .iter()
                    .map(|(t, _)| model.tokenizer.id_to_token(*t))
                    .collect(),
                top,
            }
        })
        .collect();
    Ok(LensResult {
        input_ids: ids.to_vec(),
        position: pos,
        layers,
    })
}

/// A word tracked by the lens and its single token id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrackedWord {
    pub word: String,
    pub token_id: u32,
    pub token: String,
}

pub const DEFAULT_EXPERT_WORDS: &[&str] = &[
    "Lorentz",
    "relativity",
    "dilation",
    "quantum",
    "theorem",
    "entropy",
    "molecular",
    "velocity",
];
pub const DEFAULT_SIMPLE_WORDS: &[&str] = &[
    "fast", "space", "clock", "fun", "big", "easy", "like", "really",
];

/// Maps words to single tokens, preferring the word-initial form (" word"). Words that are not
/// one token are an error when `strict` (the user named them), else skipped with a warning.
pub fn resolve_words(
    model: &Model,
    words: &[String],
    strict: bool,
) -> Result<(Vec<TrackedWord>, Vec<String>)> {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for w in words {
        let w = w.trim();
        let mut found = None;
        for form in [format!(" {w}"), w.to_string()] {
            let ids = model.tokenizer.encode(&form, false)?;
            if ids.len() == 1 {
                found = Some(ids[0]);
                break;
            }
        }
        match found {
            Some(id) => out.push(TrackedWord {
                word: w.to_string(),
                token_id: id,
                token: model.tokenizer.id_to_token(id),
            }),
            None => {
                let pieces = model.tokenizer.encode(&format!(" {w}"), false)?;
                let msg = format!(
                    "tracked word '{w}' is not a single token for this model (it splits into {} tokens: {:?}); pick single-token words",
                    pieces.len(),
                    pieces.iter().map(|&i| model.tokenizer.id_to_token(i)).collect::<Vec<_>>()
                );
                if strict {
                    return Err(AnalysisError::Invalid(msg));
                }
                warnings.push(msg);
            }
        }
    }
    Ok((out, warnings))
}

/// Per persona, per residual row: the expert-minus-simple logit difference (mean and 95 % CI
/// over prompts) and each tracked token's mean log-prob and median rank.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersonaLens {
    pub persona: String,
    pub n_prompts: usize,
    pub logit_diff_mean: Vec<f64>,
    pub logit_diff_ci95: Vec<(f64, f64)>,
    /// word -> per row mean log-prob (nats).
    pub logprob_mean: BTreeMap<String, Vec<f64>>,
    /// word -> per row median rank (0 = top-1).
    pub rank_median: BTreeMap<String, Vec<f64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetLens {
    pub model: String,
    pub dataset_source: String,
    pub dataset_hash: String,
    pub position_rule: String,
    pub chat: bool,
    pub expert_words: Vec<TrackedWord>,
    pub simple_words: Vec<TrackedWord>,
    pub warnings: Vec<String>,
    pub metric: String,
    pub personas: Vec<PersonaLens>,
    /// Per prompt: id, persona and the logit difference per row.
    pub prompts: Vec<(String, String, Vec<f64>)>,
    /// Prompts whose residual rows were read from stored activations instead of a forward.
    #[serde(default)]
    pub prompts_from_cache: usize,
}

/// One residual row of one prompt: (logit difference, per tracked word (log-prob, rank)).
type RowStats = (f64, Vec<(f64, usize)>);

/// Stored residual rows (a probe's harvest) that the lens can read instead of running forwards:
/// usable when the harvest has every residual row at the same position rule and chat setting.
struct HarvestRows<'a> {
    h: &'a crate::Harvest,
    items: crate::harvest::ItemsById<'a>,
    hooks: Vec<String>,
}

impl<'a> HarvestRows<'a> {
    fn new(h: &'a crate::Harvest, model: &Model, rule: PositionRule, chat: bool) -> Option<Self> {
        let hooks: Vec<String> = crate::resid_rows(model.config().n_layers)
            .iter()
            .map(|x| x.to_string())
            .collect();
        let usable = h.meta.position_rule == rule
            && h.meta.chat == chat
            && h.meta.model_path == model.info.path
            && hooks.iter().all(|k| h.acts.contains_key(k));
        usable.then(|| HarvestRows {
            h,
            items: crate::harvest::ItemsById::new(h),
            hooks,
        })
    }

    /// The prompt's rows `[rows, d]` if the harvest holds it at the same tokens and position.
    fn rows(&self, id: &str, n_tokens: usize, pos: usize) -> Result<Option<Tensor>> {
        let Some(i) = self.items.at(id, n_tokens, pos) else {
            return Ok(None);
        };
        let vs = self
            .hooks
            .iter()
            .map(|k| Ok(self.h.acts[k].get(i)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::stack(&vs, 0)?))
    }
}

/// Runs the lens over every prompt of `ds` at `rule` and aggregates per persona.
#[allow(clippy::too_many_arguments)]
pub fn dataset_lens(
    model: &Model,
    ds: &PersonaDataset,
    chat: bool,
    rule: PositionRule,
    expert: &[TrackedWord],
    simple: &[TrackedWord],
    warnings: Vec<String>,
    progress: &dyn Fn(usize),
) -> Result<DatasetLens> {
    dataset_lens_cached(
        model, ds, chat, rule, expert, simple, warnings, None, progress,
    )
}

/// [`dataset_lens`], reading each prompt's residual rows from `cache` (a stored harvest of the
/// same model, position rule and chat setting) where it holds the prompt, and running a forward
/// only for the others. The result says how many prompts came from the cache.
#[allow(clippy::too_many_arguments)]
pub fn dataset_lens_cached(
    model: &Model,
    ds: &PersonaDataset,
    chat: bool,
    rule: PositionRule,
    expert: &[TrackedWord],
    simple: &[TrackedWord],
    warnings: Vec<String>,
    cache: Option<&crate::Harvest>,
    progress: &dyn Fn(usize),
) -> Result<DatasetLens> {
    let cached = cache.and_then(|h| HarvestRows::new(h, model, rule, chat));
    let mut n_cached = 0usize;
    if expert.is_empty() || simple.is_empty() {
        return Err(AnalysisError::Invalid(
            "the logit lens needs at least one single-token expert word and one simple word".into(),
        ));
    }
    let all_ids: Vec<u32> = expert.iter().chain(simple).map(|w| w.token_id).collect();
    let ne = expert.len();
    let mut prompts = Vec::new();
    // persona -> per prompt: per row (diff, per-word (logprob, rank))
    let mut per: BTreeMap<String, Vec<Vec<RowStats>>> = BTreeMap::new();
    // Prompts go through the unembedding in chunks: one matrix product packs the (large)
    // unembedding matrix once for a chunk's rows instead of once per prompt.
    const PROMPTS_PER_UNEMBED: usize = 16;
    for chunk in ds.items.chunks(PROMPTS_PER_UNEMBED) {
        let mut resids = Vec::with_capacity(chunk.len());
        for it in chunk {
            let enc = encode_item(model, it, chat)?;
            let (s, _) = rule.span(&enc, &it.id)?;
            let pos = if rule == PositionRule::PersonaMean {
                enc.last
            } else {
                s
            };
            let stored = match (&cached, rule) {
                (Some(c), PositionRule::Last | PositionRule::QuestionLastToken) => {
                    c.rows(&it.id, enc.ids.len(), pos)?
                }
                _ => None,
            };
            resids.push(match stored {
                Some(r) => {
                    n_cached += 1;
                    r
                }
                None => resid_at(model, &enc.ids, pos)?,
            });
        }
        let n_rows = resids[0].dim(0)?;
        if resids.iter().any(|r| r.dim(0).ok() != Some(n_rows)) {
            return Err(AnalysisError::Invalid(
                "the stored harvest's residual rows differ from the model's; harvest again".into(),
            ));
        }
        let logits = lens_logits(model, &Tensor::cat(&resids, 0)?)?;
        let stats: Vec<RowStats> = logits
            .par_iter()
            .map(|row| {
                let lp = log_softmax_at(row, &all_ids);
                let me = all_ids[..ne]
                    .iter()
                    .map(|&i| row[i as usize] as f64)
                    .sum::<f64>()
                    / ne as f64;
                let ms = all_ids[ne..]
                    .iter()
                    .map(|&i| row[i as usize] as f64)
                    .sum::<f64>()
                    / (all_ids.len() - ne) as f64;
                (me - ms, lp)
            })
            .collect();
        for (it, rows) in chunk.iter().zip(stats.chunks(n_rows)) {
            prompts.push((
                it.id.clone(),
                it.persona.clone(),
                rows.iter().map(|r| r.0).collect(),
            ));
            per.entry(it.persona.clone())
                .or_default()
                .push(rows.to_vec());
        }
        progress(chunk.len());
    }
    let words: Vec<&TrackedWord> = expert.iter().chain(simple).collect();
    let personas = per
        .into_iter()
        .map(|(persona, ps)| {
            let n_rows = ps[0].len();
            let mut mean = Vec::new();
            let mut ci = Vec::new();
            let mut lp: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            let mut rk: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for r in 0..n_rows {
                let xs: Vec<f64> = ps.iter().map(|p| p[r].0).collect();
                let (m, lo, hi) = mean_ci95(&xs);
                mean.push(m);
                ci.push((lo, hi));
                for (wi, w) in words.iter().enumerate() {
                    let l: f64 = ps.iter().map(|p| p[r].1[wi].0).sum::<f64>() / ps.len() as f64;
                    let mut ranks: Vec<f64> = ps.iter().map(|p| p[r].1[wi].1 as f64).collect();
                    ranks.sort_by(f64::total_cmp);
                    lp.entry(w.word.clone()).or_default().push(l);
                    rk.entry(w.word.clone())
                        .or_default()
                        .push(ranks[ranks.len() / 2]);
                }
            }
            PersonaLens {
                persona,
                n_prompts: ps.len(),
                logit_diff_mean: mean,
                logit_diff_ci95: ci,
                logprob_mean: lp,
                rank_median: rk,
            }
        })
        .collect();
    Ok(DatasetLens {
        model: model.info.name.clone(),
        dataset_source: ds.source.clone(),
        dataset_hash: ds.hash(),
        position_rule: rule.to_string(),
        chat,
        expert_words: expert.to_vec(),
        simple_words: simple.to_vec(),
        warnings,
        metric: "mean logit of expert words minus mean logit of simple words, lens logits = unembed(final_norm(resid)) (logits, not probabilities)".into(),
        personas,
        prompts,
        prompts_from_cache: n_cached,
    })
}

/// Per novice/expert pair (same question and paraphrase) of `split` (None: every pair): the
/// expert prompt's readout minus the novice prompt's, per residual row, with the pair's question
/// as its cluster (an index). Lexical controls and prompts the lens did not read are left out.
pub fn paired_readout_gaps(
    lens: &DatasetLens,
    ds: &PersonaDataset,
    split: Option<crate::dataset::Split>,
) -> Vec<(usize, Vec<f64>)> {
    let by_id: std::collections::HashMap<&str, &Vec<f64>> = lens
        .prompts
        .iter()
        .map(|(id, _, rows)| (id.as_str(), rows))
        .collect();
    let mut clusters: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (n, e) in crate::dataset::dataset_pairs(ds) {
        if n.lexical_control || e.lexical_control {
            continue;
        }
        if split.is_some() && (n.split != split || e.split != split) {
            continue;
        }
        let (Some(rn), Some(re)) = (by_id.get(n.id.as_str()), by_id.get(e.id.as_str())) else {
            continue;
        };
        let key = format!("{}/{}/{}", n.pair_id, n.topic, n.question_id);
        let next = clusters.len();
        let c = *clusters.entry(key).or_insert(next);
        out.push((c, re.iter().zip(rn.iter()).map(|(a, b)| a - b).collect()));
    }
    out
}

/// The paired persona effect on the readout at each residual row: mean expert-minus-novice
/// difference, its 95 % interval by bootstrap over questions, and the one-sided clustered
/// p-value of `effect > 0` (see [`crate::claims::clustered_test`]).
pub fn paired_effects(
    gaps: &[(usize, Vec<f64>)],
    reps: usize,
    seed: u64,
) -> Vec<Option<crate::claims::ClusteredTest>> {
    let rows = gaps.first().map(|g| g.1.len()).unwrap_or(0);
    (0..rows)
        .map(|r| {
            let d: Vec<(usize, f64)> = gaps.iter().map(|(c, v)| (*c, v[r])).collect();
            crate::claims::clustered_test(&d, reps, seed)
        })
        .collect()
}

/// The decision row: the first residual row from which the paired effect's 95 % lower bound
/// stays above `min_effect` (logits) to the last row. Chosen on one split, reported on another.
pub fn decision_row(
    effects: &[Option<crate::claims::ClusteredTest>],
    min_effect: f64,
) -> Option<usize> {
    let above = |r: usize| effects[r].is_some_and(|t| t.ci95.0 > min_effect);
    (0..effects.len()).find(|&r| (r..effects.len()).all(above))
}
