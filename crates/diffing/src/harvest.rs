//! Paired activations from two models on one corpus.
//!
//! Each model renders every sample its own way (the chat model through its chat template when
//! asked). When both models then see the same token ids and have the same width, rows are
//! paired per token (position 0, the BOS sink with its outsized norm, is left out, as crosscoder
//! training usually does); otherwise one row per sample at each model's last token, zero-padded
//! to the wider model, so models with different tokenizers and widths can still be diffed.

use crate::paired::{Alignment, PairedMeta, PairedWriter, SampleInfo};
use crate::shards::{corpus_sha256, PartManifest, ShardSpec};
use crate::{invalid, Result};
use candle_core::Tensor;
use persona_lens_analysis::harvest::ItemsById;
use persona_lens_analysis::{Harvest, PositionRule};
use persona_lens_engine::{Batch, HookName, HookPoint, Hooks, LogitsAt, Model, SharedPrefix};
use std::ops::Range;
use std::path::Path;

pub use crate::corpus::CorpusItem;

/// Sets up interventions on one model's batch (e.g. a planted feature): gets the batch's
/// token ids per row.
pub type PairSetup<'a> = &'a dyn Fn(&[Vec<u32>], &Batch, &mut Hooks) -> Result<()>;

pub struct PairedHarvestSpec<'a> {
    /// One hook per model (models may have different depths).
    pub hooks: [HookName; 2],
    pub chat_template: [bool; 2],
    /// Tokenise each sample once, with the chat model (index 1, its `chat_template` setting),
    /// and feed those ids to both models: a base/chat pair of one model then reads the same
    /// tokens and pairs per token (Minder et al.). Needs the same tokenizer.
    pub shared_ids: bool,
    /// None = per token when possible, else last token.
    pub alignment: Option<Alignment>,
    pub batch_size: usize,
    pub shard_rows: usize,
    pub setup: [Option<PairSetup<'a>>; 2],
    /// Stored activations per model (a probe harvest, `activations.safetensors`): with last-token
    /// alignment, a sample the harvest holds for the same model file, rendering and last
    /// position takes its row from there instead of a forward (the study's diff step reads the
    /// probe step's). Its hook must be the spec's, or the next block's `hook_resid_pre` for a
    /// `hook_resid_post` (the same tensor). Samples it lacks run as usual.
    pub stored: [Option<&'a Harvest>; 2],
}

/// A model's stored last-token rows that can stand in for its forwards, if `h` fits the spec.
struct StoredRows<'a> {
    h: &'a Harvest,
    key: String,
    items: ItemsById<'a>,
}

impl<'a> StoredRows<'a> {
    fn new(h: &'a Harvest, model: &Model, hook: HookName, chat: bool) -> Option<Self> {
        let n_layers = model.config().n_layers;
        let mut names = vec![hook.to_string()];
        if let (HookPoint::ResidPost, Some(l)) = (hook.point, hook.layer) {
            if l + 1 < n_layers {
                names.push(HookName::block(l + 1, HookPoint::ResidPre).to_string());
            }
        }
        let key = names.into_iter().find(|k| h.acts.contains_key(k))?;
        let usable = h.meta.model_path == model.info.path
            && h.meta.position_rule == PositionRule::Last
            && h.meta.chat == chat;
        usable.then(|| StoredRows {
            h,
            key,
            items: ItemsById::new(h),
        })
    }

    /// The sample's row `[1, d]` if the harvest holds it at the same number of tokens.
    fn row(&self, id: &str, ids: &[u32]) -> Result<Option<Tensor>> {
        let Some(i) = self.items.at(id, ids.len(), ids.len() - 1) else {
            return Ok(None);
        };
        Ok(Some(
            self.h.acts[&self.key]
                .get(i)?
                .to_dtype(candle_core::DType::F32)?
                .unsqueeze(0)?,
        ))
    }
}

/// The default hook: the middle layer's `resid_post`.
pub fn middle_resid_post(model: &Model) -> HookName {
    HookName::block(model.config().n_layers / 2, HookPoint::ResidPost)
}

/// Runs `corpus` through both models and writes paired rows into `out`.
pub fn harvest_paired(
    models: [&Model; 2],
    corpus: &[CorpusItem],
    spec: &PairedHarvestSpec,
    out: &Path,
    progress: &dyn Fn(usize),
) -> Result<PairedMeta> {
    let plan = Plan::new(models, corpus, spec)?;
    let mut w = PairedWriter::new(out, spec.shard_rows, plan.meta.clone())?;
    plan.write_rows(models, corpus, spec, 0..corpus.len(), &mut w, progress)?;
    w.finish()
}

/// Part `shard` of [`harvest_paired`]: the part's samples (see [`crate::shards`]) into its own
/// files and `part-IIIII-of-NNNNN.json` in `out`. Every part reads the whole corpus's token ids
/// first, so all parts choose the same alignment; `corpus_label` is recorded as the store's
/// corpus.
pub fn harvest_paired_part(
    models: [&Model; 2],
    corpus: &[CorpusItem],
    spec: &PairedHarvestSpec,
    shard: ShardSpec,
    corpus_label: &str,
    out: &Path,
    progress: &dyn Fn(usize),
) -> Result<PartManifest> {
    let mut plan = Plan::new(models, corpus, spec)?;
    plan.meta.corpus = corpus_label.to_string();
    let range = shard.sample_range(corpus.len(), spec.batch_size);
    let mut w = PairedWriter::part(out, spec.shard_rows, plan.meta.clone(), shard)?;
    plan.write_rows(models, corpus, spec, range.clone(), &mut w, progress)?;
    w.finish_part(shard, range, corpus_sha256(corpus), corpus.len())
}

/// The whole corpus's token ids and the store's header, decided before any row is written.
struct Plan {
    ids: Vec<[Vec<u32>; 2]>,
    alignment: Alignment,
    dims: [usize; 2],
    meta: PairedMeta,
}

impl Plan {
    fn new(models: [&Model; 2], corpus: &[CorpusItem], spec: &PairedHarvestSpec) -> Result<Self> {
        if corpus.is_empty() {
            return invalid("the corpus is empty; give corpus files or use the default corpus");
        }
        if spec.shared_ids && models[0].config().vocab_size != models[1].config().vocab_size {
            return invalid(format!(
                "shared token ids need one tokenizer, but {} and {} have vocabularies of {} and {}; use each model's own template (template `auto` for a different-family pair)",
                models[0].info.name,
                models[1].info.name,
                models[0].config().vocab_size,
                models[1].config().vocab_size
            ));
        }
        let ids: Vec<[Vec<u32>; 2]> = corpus
            .iter()
            .map(|c| -> Result<[Vec<u32>; 2]> {
                let chat = models[1].encode_prompt(&c.text, spec.chat_template[1])?;
                Ok(if spec.shared_ids {
                    [chat.clone(), chat]
                } else {
                    [
                        models[0].encode_prompt(&c.text, spec.chat_template[0])?,
                        chat,
                    ]
                })
            })
            .collect::<Result<_>>()?;
        let dims = [models[0].config().d_model, models[1].config().d_model];
        let same_tokens = dims[0] == dims[1] && ids.iter().all(|p| p[0] == p[1]);
        let alignment = match spec.alignment {
            Some(Alignment::Tokens) if !same_tokens => {
                return invalid(
                    "per-token pairing needs both models to see the same token ids and have the same width; align on the last token (align = last)",
                )
            }
            Some(a) => a,
            None if same_tokens => Alignment::Tokens,
            None => Alignment::Last,
        };
        let d = dims[0].max(dims[1]);
        let meta = PairedMeta {
            models: models.iter().map(|m| m.info.name.clone()).collect(),
            model_paths: models.iter().map(|m| m.info.path.clone()).collect(),
            hooks: spec.hooks.iter().map(|h| h.to_string()).collect(),
            chat_template: spec.chat_template.to_vec(),
            shared_ids: spec
                .setup
                .iter()
                .all(Option::is_none)
                .then_some(spec.shared_ids),
            alignment,
            dims: dims.to_vec(),
            d,
            rows: 0,
            shards: vec![],
            samples: vec![],
            corpus: String::new(),
            tool: format!("persona-lens {}", env!("CARGO_PKG_VERSION")),
            sharding: None,
        };
        Ok(Self {
            ids,
            alignment,
            dims,
            meta,
        })
    }

    /// Samples `range` (starting on a batch boundary) in batches of the spec's size.
    fn write_rows(
        &self,
        models: [&Model; 2],
        corpus: &[CorpusItem],
        spec: &PairedHarvestSpec,
        range: Range<usize>,
        w: &mut PairedWriter,
        progress: &dyn Fn(usize),
    ) -> Result<()> {
        let (ids, alignment, dims, d) = (&self.ids, self.alignment, self.dims, self.meta.d);
        let bs = spec.batch_size.max(1);
        let tok = &models[0].tokenizer;
        // Last-token rows of plain runs: the tokens every sample starts with in a model's
        // rendering (a chat template's system turn) run once for all rows.
        let shared: Vec<Option<SharedPrefix>> = (0..2)
            .map(|m| {
                if alignment != Alignment::Last || spec.setup[m].is_some() {
                    return Ok(None);
                }
                let seqs: Vec<Vec<u32>> = range.clone().map(|i| ids[i][m].clone()).collect();
                let mut hooks = Hooks::new();
                hooks.stop_after_block = spec.hooks[m].layer;
                SharedPrefix::for_rows(models[m], &seqs, &mut hooks)
            })
            .collect::<persona_lens_engine::Result<_>>()?;
        let stored: Vec<Option<StoredRows>> = (0..2)
            .map(|m| {
                let chat = match spec.shared_ids {
                    true => spec.chat_template[1],
                    false => spec.chat_template[m],
                };
                let usable = alignment == Alignment::Last && spec.setup[m].is_none();
                spec.stored[m]
                    .filter(|_| usable)
                    .and_then(|h| StoredRows::new(h, models[m], spec.hooks[m], chat))
            })
            .collect();
        // Batches are the range's consecutive samples, as in every part of a sharded harvest:
        // a part's rows are then bitwise the rows of the same samples in one whole harvest
        // (batches sorted by length would pad less but differ between the two).
        let mut next = range.start;
        while next < range.end {
            let chunk = next..(next + bs).min(range.end);
            next = chunk.end;
            // rows[m][i - chunk.start]: the sample's rows `(rows, d)` from model m
            let mut rows: [Vec<Option<Tensor>>; 2] = [vec![], vec![]];
            let mut from_store: [Vec<bool>; 2] = [vec![], vec![]];
            for m in 0..2 {
                rows[m] = chunk
                    .clone()
                    .map(|i| match &stored[m] {
                        Some(st) => st.row(&corpus[i].id, &ids[i][m]),
                        None => Ok(None),
                    })
                    .collect::<Result<_>>()?;
                from_store[m] = rows[m].iter().map(Option::is_some).collect();
                // The batch's samples the stored harvest lacks run as one batch.
                let to_run: Vec<usize> = chunk
                    .clone()
                    .filter(|&i| rows[m][i - chunk.start].is_none())
                    .collect();
                if to_run.is_empty() {
                    continue;
                }
                let seqs: Vec<Vec<u32>> = to_run.iter().map(|&i| ids[i][m].clone()).collect();
                for (&i, r) in to_run
                    .iter()
                    .zip(self.run_batch(models[m], m, spec, &shared[m], &seqs)?)
                {
                    rows[m][i - chunk.start] = Some(r);
                }
            }
            for i in chunk.clone() {
                let item = &corpus[i];
                let mut take = |m: usize| {
                    rows[m][i - chunk.start]
                        .take()
                        .expect("every sample's row was read or computed")
                };
                // Zero-padded to the wider model.
                let pad = |m: usize, r: Tensor| match dims[m] < d {
                    true => r.pad_with_zeros(1, 0, d - dims[m]),
                    false => Ok(r),
                };
                let (a, b) = (pad(0, take(0))?, pad(1, take(1))?);
                let n = a.dim(0)?;
                let pair = Tensor::stack(&[&a, &b], 1)?; // (rows, 2, d)
                let toks: Vec<String> = match alignment {
                    Alignment::Tokens => {
                        ids[i][0][1..].iter().map(|&t| tok.id_to_token(t)).collect()
                    }
                    Alignment::Last => {
                        vec![tok.id_to_token(*ids[i][0].last().expect("non-empty"))]
                    }
                };
                let stored_rows = (0..2).filter(|&m| from_store[m][i - chunk.start]).collect();
                w.meta.samples.push(SampleInfo {
                    id: item.id.clone(),
                    source: item.source.clone(),
                    text: item.text.clone(),
                    first_row: w.meta.rows,
                    n_rows: n,
                    tokens: toks,
                    stored_rows,
                });
                w.push(pair)?;
            }
            progress(chunk.len());
        }
        Ok(())
    }

    /// One batch of model `m`'s samples `seqs`: each sample's rows `(rows, d_m)` at the spec's
    /// hook, f32 (every token after the first, or the last token, by the plan's alignment).
    fn run_batch(
        &self,
        model: &Model,
        m: usize,
        spec: &PairedHarvestSpec,
        shared: &Option<SharedPrefix>,
        seqs: &[Vec<u32>],
    ) -> Result<Vec<Tensor>> {
        let batch = Batch::left_padded(seqs, model.pad_id(), model.device())?;
        let mut hooks = Hooks::new();
        hooks.capture(spec.hooks[m]);
        // Only the hook's block and those before it matter: no logits are read.
        hooks.stop_after_block = spec.hooks[m].layer;
        if let Some(f) = spec.setup[m] {
            f(seqs, &batch, &mut hooks)?;
        }
        let width = shared
            .as_ref()
            .and_then(|p| p.width_for(&batch, &vec![usize::MAX; seqs.len()]));
        match (shared, width) {
            (Some(p), Some(w)) => p.forward(model, &batch, w, &mut hooks, LogitsAt::None)?,
            _ => model.forward(&batch, None, &mut hooks, LogitsAt::None)?,
        };
        // (b, t, d_m); with a shared prefix, the columns after it only
        let full = hooks.cache.get(&spec.hooks[m])?;
        let last_column = full.dim(1)? - 1;
        seqs.iter()
            .enumerate()
            .map(|(r, s)| {
                let rows = match self.alignment {
                    Alignment::Tokens => full.get(r)?.narrow(0, batch.pad[r], s.len())?.narrow(
                        0,
                        1.min(s.len() - 1),
                        s.len() - 1.min(s.len() - 1),
                    )?,
                    // Left padding puts every row's last token in the last column.
                    Alignment::Last => full.get(r)?.narrow(0, last_column, 1)?,
                };
                Ok(rows.to_dtype(candle_core::DType::F32)?)
            })
            .collect()
    }
}

/// "Model B = model A + a planted feature": adds `alpha · direction` at `hook` on the position
/// of token `trigger` and, with `persist`, on every later position of the sample (a feature that
/// switches on at a cue and stays on, as a user model would). For known-answer tests of model
/// diffing, through the hook API. A feature planted only at the trigger token co-occurs with
/// that token's own representation, so an L1 crosscoder merges the two into one latent (a
/// triangle-inequality artifact): `persist` is the fair test.
pub fn plant_on_token(
    hook: HookName,
    trigger: u32,
    direction: Tensor,
    alpha: f64,
    persist: bool,
) -> impl Fn(&[Vec<u32>], &Batch, &mut Hooks) -> Result<()> {
    move |seqs, batch, hooks| {
        let t = batch.ids.dim(1)?;
        let mut mask = vec![0f32; seqs.len() * t];
        for (r, s) in seqs.iter().enumerate() {
            let mut on = false;
            for (i, &id) in s.iter().enumerate() {
                let here = id == trigger;
                on = (on && persist) || here;
                if on {
                    mask[r * t + batch.pad[r] + i] = 1.0;
                }
            }
        }
        let dev = batch.ids.device();
        let m = Tensor::from_vec(mask, (seqs.len(), t, 1), dev)?;
        let v = (direction.to_device(dev)?.reshape((1, 1, ()))? * alpha)?;
        hooks.intervene(
            hook,
            persona_lens_engine::Op::Add(m.broadcast_mul(&v)?),
            persona_lens_engine::Selector::all(),
        );
        Ok(())
    }
}
