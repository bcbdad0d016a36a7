//! Harvesting: run a dataset through the model in batches and keep one vector per prompt per
//! hook at a position rule. Stored as safetensors (tensors named by hook, `[n_prompts, d]`, f32)
//! with a JSON sidecar (model, hook, position rule, dataset hash, prompt ids) so later commands
//! reuse them instead of running the model again.

use crate::dataset::{encode_item, EncodedPrompt, PersonaDataset};
use crate::{write_json, AnalysisError, Result};
use candle_core::{DType, Device, Tensor};
use persona_lens_engine::io::save_safetensors;
use persona_lens_engine::{Batch, HookName, HookPoint, Hooks, LogitsAt, Model};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Which position(s) of a prompt give its vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionRule {
    /// The last prompt token (for chat models: the end of the generation prompt).
    Last,
    /// The last token of the question.
    QuestionLastToken,
    /// The mean over the persona phrase's tokens.
    PersonaMean,
}

impl std::str::FromStr for PositionRule {
    type Err = AnalysisError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "last" => Ok(Self::Last),
            "question_last_token" => Ok(Self::QuestionLastToken),
            "persona_mean" => Ok(Self::PersonaMean),
            o => Err(AnalysisError::Invalid(format!(
                "unknown position rule '{o}'; use last, question_last_token or persona_mean"
            ))),
        }
    }
}

impl std::fmt::Display for PositionRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Last => "last",
            Self::QuestionLastToken => "question_last_token",
            Self::PersonaMean => "persona_mean",
        })
    }
}

impl PositionRule {
    /// Token positions `[start, end)` the rule averages over for one prompt.
    pub fn span(&self, e: &EncodedPrompt, id: &str) -> Result<(usize, usize)> {
        match self {
            Self::Last => Ok((e.last, e.last + 1)),
            Self::QuestionLastToken => Ok((e.question_last_token, e.question_last_token + 1)),
            Self::PersonaMean => e.persona_tokens.ok_or_else(|| {
                AnalysisError::Dataset(format!(
                    "prompt {id} has no persona phrase; use the position rule `last` or give `persona` in the dataset file"
                ))
            }),
        }
    }
}

#[derive(Debug, Clone)]
pub struct HarvestSpec {
    pub hooks: Vec<HookName>,
    pub rule: PositionRule,
    /// Render prompts with the model's chat template.
    pub chat: bool,
    pub batch_size: usize,
    /// Run the tokens every prompt starts with (a chat template's system turn) once instead of
    /// once per prompt ([`persona_lens_engine::SharedPrefix`]); the numbers agree with whole
    /// rows within float rounding. Off in any case for batches with interventions.
    pub share_prefix: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HarvestedItem {
    pub id: String,
    pub class: String,
    pub persona: String,
    pub topic: String,
    pub template_id: String,
    pub question_id: String,
    /// Persona pair (built-in) or the file's pair id.
    #[serde(default)]
    pub pair_id: String,
    /// See [`crate::dataset::PromptItem::lexical_control`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lexical_control: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<crate::dataset::Split>,
    pub n_tokens: usize,
    /// Token positions `[start, end)` averaged.
    pub positions: (usize, usize),
}

/// The sidecar: everything needed to know what the vectors are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HarvestMeta {
    pub model: String,
    pub model_path: String,
    pub dataset_source: String,
    pub dataset_hash: String,
    pub position_rule: PositionRule,
    pub chat: bool,
    pub hooks: Vec<String>,
    pub d: BTreeMap<String, usize>,
    pub items: Vec<HarvestedItem>,
    pub tool: String,
    /// Tokens every prompt starts with that ran once for all rows (0: every row ran whole).
    #[serde(default)]
    pub shared_prefix_tokens: usize,
}

pub struct Harvest {
    pub meta: HarvestMeta,
    /// hook name -> `[n_prompts, d]` f32.
    pub acts: BTreeMap<String, Tensor>,
}

/// A harvest's items by id, for callers that read a prompt's stored rows instead of running a
/// forward (the logit lens, the diff step's paired harvest).
pub struct ItemsById<'a> {
    h: &'a Harvest,
    by_id: HashMap<&'a str, usize>,
}

impl<'a> ItemsById<'a> {
    pub fn new(h: &'a Harvest) -> Self {
        let by_id = h
            .meta
            .items
            .iter()
            .enumerate()
            .map(|(i, it)| (it.id.as_str(), i))
            .collect();
        ItemsById { h, by_id }
    }

    /// The index of item `id` if the harvest holds it at `n_tokens` tokens with its kept span
    /// the single position `pos`: the same prompt, read at the same token.
    pub fn at(&self, id: &str, n_tokens: usize, pos: usize) -> Option<usize> {
        let &i = self.by_id.get(id)?;
        let it = &self.h.meta.items[i];
        (it.n_tokens == n_tokens && it.positions == (pos, pos + 1)).then_some(i)
    }
}

pub const ACTS_FILE: &str = "activations.safetensors";
pub const META_FILE: &str = "activations.json";

fn check_hook(h: &HookName) -> Result<()> {
    if matches!(h.point, HookPoint::AttnPattern | HookPoint::AttnScores) {
        return Err(AnalysisError::Invalid(format!(
            "hook '{h}' has two position axes; harvest per-position hooks (residuals, z, q/k/v, mlp)"
        )));
    }
    Ok(())
}

/// Sets up interventions for one batch: gets the dataset indices of the batch's rows (row r of
/// the forward call is item `rows[r]`) and the batch's left padding.
pub type BatchSetup<'a> = &'a dyn Fn(&[usize], &Batch, &mut Hooks) -> Result<()>;

/// Runs `ds` through `model` and keeps each prompt's vector at every hook of `spec`.
pub fn harvest(
    model: &Model,
    ds: &PersonaDataset,
    spec: &HarvestSpec,
    progress: &dyn Fn(usize),
) -> Result<Harvest> {
    harvest_with(model, ds, spec, None, progress)
}

/// [`harvest`] with interventions per batch (ablations, planted features, steering).
pub fn harvest_with(
    model: &Model,
    ds: &PersonaDataset,
    spec: &HarvestSpec,
    setup: Option<BatchSetup>,
    progress: &dyn Fn(usize),
) -> Result<Harvest> {
    Ok(harvest_runs(model, ds, spec, setup, false, progress)?.0)
}

/// [`harvest_with`] whose forwards also give each prompt's logits at its last token (item order),
/// so a caller that needs both (the ablation report: its gap and its probes under one ablation)
/// runs every prompt once.
pub fn harvest_with_last_logits(
    model: &Model,
    ds: &PersonaDataset,
    spec: &HarvestSpec,
    setup: Option<BatchSetup>,
    progress: &dyn Fn(usize),
) -> Result<(Harvest, Vec<Vec<f32>>)> {
    let (h, logits) = harvest_runs(model, ds, spec, setup, true, progress)?;
    // Every item sits in one chunk whose forward returned logits: none may be missing, or the
    // rows would no longer line up with the items.
    let logits = logits
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            AnalysisError::Invalid("a harvest forward returned no last-token logits".into())
        })?;
    Ok((h, logits))
}

/// The harvest; with `logits`, every block runs and each prompt's last-token logits come back
/// in item order (one per item), else none.
fn harvest_runs(
    model: &Model,
    ds: &PersonaDataset,
    spec: &HarvestSpec,
    setup: Option<BatchSetup>,
    logits: bool,
    progress: &dyn Fn(usize),
) -> Result<(Harvest, Vec<Option<Vec<f32>>>)> {
    for h in &spec.hooks {
        check_hook(h)?;
    }
    let encoded: Vec<EncodedPrompt> = ds
        .items
        .iter()
        .map(|it| encode_item(model, it, spec.chat))
        .collect::<Result<_>>()?;
    let spans: Vec<(usize, usize)> = ds
        .items
        .iter()
        .zip(&encoded)
        .map(|(it, e)| spec.rule.span(e, &it.id))
        .collect::<Result<_>>()?;
    let bs = spec.batch_size.max(1);
    // Batch prompts of similar length together: less padding, same results.
    let mut order: Vec<usize> = (0..encoded.len()).collect();
    order.sort_by_key(|&i| encoded[i].ids.len());
    let mut slots: Vec<Vec<Option<Tensor>>> = vec![vec![None; encoded.len()]; spec.hooks.len()];
    // Without logits: stop after the last block a captured hook belongs to.
    let stop_after_block = spec
        .hooks
        .iter()
        .map(|h| h.layer)
        .collect::<Option<Vec<usize>>>()
        .and_then(|ls| ls.into_iter().max())
        .filter(|_| !logits);
    let logits_at = match logits {
        true => LogitsAt::Last,
        false => LogitsAt::None,
    };
    let mut last_logits: Vec<Option<Vec<f32>>> = vec![None; encoded.len()];
    // Interventions (a setup, or the model's standing hooks) may treat rows or positions
    // differently, so the prefix is shared only in plain runs.
    let shared = match spec.share_prefix && setup.is_none() {
        true => {
            let seqs: Vec<Vec<u32>> = encoded.iter().map(|e| e.ids.clone()).collect();
            let mut hooks = Hooks::new();
            hooks.stop_after_block = stop_after_block;
            persona_lens_engine::SharedPrefix::for_rows(model, &seqs, &mut hooks)?
        }
        false => None,
    };
    for chunk in order.chunks(bs) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i].ids.clone()).collect();
        let batch = Batch::left_padded(&seqs, model.pad_id(), model.device())?;
        let mut hooks = Hooks::new();
        hooks.capture_all(&spec.hooks);
        hooks.stop_after_block = stop_after_block;
        if let Some(f) = setup {
            f(chunk, &batch, &mut hooks)?;
        }
        // Columns the shared prefix stands in for: hooks see the columns after them only, so
        // every kept span must start after them.
        let first_kept: Vec<usize> = chunk.iter().map(|&i| spans[i].0).collect();
        let width = shared
            .as_ref()
            .and_then(|p| p.width_for(&batch, &first_kept));
        let out = match (&shared, width) {
            (Some(p), Some(w)) => p.forward(model, &batch, w, &mut hooks, logits_at.clone())?,
            _ => model.forward(&batch, None, &mut hooks, logits_at.clone())?,
        };
        if let Some(l) = out {
            for (&i, row) in chunk.iter().zip(l.to_dtype(DType::F32)?.to_vec2::<f32>()?) {
                last_logits[i] = Some(row);
            }
        }
        let skipped = width.unwrap_or(0);
        for (hi, h) in spec.hooks.iter().enumerate() {
            let full = hooks.cache.get(h)?;
            for (r, &i) in chunk.iter().enumerate() {
                let (s, e) = spans[i];
                let x = full
                    .get(r)?
                    .narrow(0, batch.pad[r] + s - skipped, e - s)?
                    .mean(0)?
                    .flatten_all()?;
                slots[hi][i] = Some(x);
            }
        }
        progress(chunk.len());
    }
    let mut acts = BTreeMap::new();
    let mut d = BTreeMap::new();
    for (h, vs) in spec.hooks.iter().zip(slots) {
        // Every prompt sits in exactly one chunk, so every slot is filled.
        let vs: Vec<Tensor> = vs.into_iter().flatten().collect();
        let t = Tensor::stack(&vs, 0)?;
        d.insert(h.to_string(), t.dim(1)?);
        acts.insert(h.to_string(), t);
    }
    let items = ds
        .items
        .iter()
        .zip(&encoded)
        .zip(&spans)
        .map(|((it, e), &sp)| HarvestedItem {
            id: it.id.clone(),
            class: it.class.clone(),
            persona: it.persona.clone(),
            topic: it.topic.clone(),
            template_id: it.template_id.clone(),
            pair_id: it.pair_id.clone(),
            lexical_control: it.lexical_control,
            split: it.split,
            question_id: it.question_id.clone(),
            n_tokens: e.ids.len(),
            positions: sp,
        })
        .collect();
    let h = Harvest {
        meta: HarvestMeta {
            model: model.info.name.clone(),
            model_path: model.info.path.clone(),
            dataset_source: ds.source.clone(),
            dataset_hash: ds.hash(),
            position_rule: spec.rule,
            chat: spec.chat,
            hooks: spec.hooks.iter().map(|h| h.to_string()).collect(),
            d,
            items,
            tool: format!("persona-lens {}", env!("CARGO_PKG_VERSION")),
            shared_prefix_tokens: shared.as_ref().map_or(0, |p| p.len()),
        },
        acts,
    };
    Ok((h, last_logits))
}

impl Harvest {
    /// Saves `activations.safetensors` + `activations.json` into `dir` (atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .acts
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut md = HashMap::new();
        md.insert("sidecar".to_string(), META_FILE.to_string());
        md.insert(
            "position_rule".to_string(),
            self.meta.position_rule.to_string(),
        );
        md.insert("dataset_hash".to_string(), self.meta.dataset_hash.clone());
        save_safetensors(&tensors, md, &dir.join(ACTS_FILE))?;
        write_json(&dir.join(META_FILE), &self.meta)
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let mp = dir.join(META_FILE);
        let text = std::fs::read_to_string(&mp).map_err(|e| {
            AnalysisError::Invalid(format!(
                "cannot read {}: {e} (harvest into {} first)",
                mp.display(),
                dir.display()
            ))
        })?;
        let meta: HarvestMeta = serde_json::from_str(&text)
            .map_err(|e| AnalysisError::Invalid(format!("{}: {e}", mp.display())))?;
        let ap = dir.join(ACTS_FILE);
        let acts = candle_core::safetensors::load(&ap, &Device::Cpu)
            .map_err(|e| AnalysisError::Invalid(format!("{}: {e}", ap.display())))?;
        for h in &meta.hooks {
            if !acts.contains_key(h) {
                return Err(AnalysisError::Invalid(format!(
                    "{} lacks tensor '{h}' named in its sidecar; re-run harvest",
                    ap.display()
                )));
            }
        }
        Ok(Harvest {
            meta,
            acts: acts.into_iter().collect(),
        })
    }

    /// Whether this harvest was made from the same model file, dataset, rule, template use and
    /// covers the hooks asked for: then it can be reused.
    pub fn matches(&self, model: &Model, ds: &PersonaDataset, spec: &HarvestSpec) -> bool {
        self.meta.model_path == model.info.path
            && self.meta.dataset_hash == ds.hash()
            && self.meta.position_rule == spec.rule
            && self.meta.chat == spec.chat
            && spec
                .hooks
                .iter()
                .all(|h| self.meta.hooks.contains(&h.to_string()))
    }

    /// Loads the harvest in `dir` if it matches, else harvests and saves it there.
    pub fn load_or_run(
        dir: &Path,
        model: &Model,
        ds: &PersonaDataset,
        spec: &HarvestSpec,
        progress: &dyn Fn(usize),
    ) -> Result<(Self, bool)> {
        if dir.join(META_FILE).exists() {
            if let Ok(h) = Self::load(dir) {
                if h.matches(model, ds, spec) {
                    return Ok((h, true));
                }
            }
        }
        let h = harvest(model, ds, spec, progress)?;
        h.save(dir)?;
        Ok((h, false))
    }

    /// `[n, d]` rows for a hook as f64 row-major, for the probes.
    pub fn matrix(&self, hook: &str) -> Result<(Vec<f64>, usize, usize)> {
        let t = self.acts.get(hook).ok_or_else(|| {
            AnalysisError::Invalid(format!(
                "hook '{hook}' is not in this harvest (has: {})",
                self.meta.hooks.join(", ")
            ))
        })?;
        let (n, d) = t.dims2()?;
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        Ok((v.into_iter().map(f64::from).collect(), n, d))
    }
}
