//! A token prefix that every row of a batch starts with (a chat template's system turn), run
//! once instead of once per row.
//!
//! Why: the study's prompts in SmolLM2's chat template share their first 24 tokens (the system
//! turn and `<|im_start|>user`), about half of each prompt. A causal model computes those
//! positions identically in every row, so one batch-1 run of the prefix gives every row's keys
//! and values there; the batch then runs only the columns after it.
//!
//! Layout: rows stay left padded as [`Batch::left_padded`] lays them out. Row `r` has `pad[r]`
//! pad columns, so the first `width` columns of the batch hold its pads and the prefix's first
//! `width - pad[r]` tokens; the call runs columns `width..`. Rotary positions count from each
//! row's first real token, so the prefix's keys sit at the same positions in every row and only
//! shift by the row's padding.

use candle_core::Tensor;

use crate::hooks::Hooks;
use crate::layers::{KvCache, LayerKv, LogitsAt};
use crate::{Batch, EngineError, Model, Result};

/// Shared prefixes shorter than this run with every row: too little to save.
pub const MIN_SHARED_PREFIX: usize = 8;

/// A prefix's keys and values, for batches whose rows all start with it: one prefix row, or one
/// per group of rows where an intervention treats groups differently (per-row steering vectors).
pub struct SharedPrefix {
    ids: Vec<u32>,
    kv: KvCache,
    groups: usize,
}

/// The number of leading tokens every sequence of `seqs` has in common.
pub fn common_prefix_len(seqs: &[Vec<u32>]) -> usize {
    let Some(first) = seqs.first() else {
        return 0;
    };
    seqs[1..].iter().fold(first.len(), |n, s| {
        n.min(first.iter().zip(s).take_while(|(a, b)| a == b).count())
    })
}

impl SharedPrefix {
    /// Runs `ids` once (batch 1, no padding). `stop_after_block`: the last block later calls
    /// run (captures that stop early); keys and values are kept for blocks up to it.
    pub fn new(model: &Model, ids: &[u32], stop_after_block: Option<usize>) -> Result<Self> {
        let mut hooks = Hooks::new();
        hooks.stop_after_block = stop_after_block;
        Self::with_hooks(model, ids, &mut hooks)
    }

    /// The prefix every sequence of `seqs` starts with, run with `hooks`, where sharing it
    /// pays and is sound: `None` when it is shorter than [`MIN_SHARED_PREFIX`] or the model has
    /// standing hooks (they may treat rows or positions differently). Interventions of the
    /// caller's own are the caller's to rule out.
    pub fn for_rows(model: &Model, seqs: &[Vec<u32>], hooks: &mut Hooks) -> Result<Option<Self>> {
        Self::for_row_groups(model, seqs, 1, hooks)
    }

    /// [`Self::for_rows`] with `groups` prefix rows in one batch, for hooks that treat them
    /// differently (row `g` of an intervention is group `g`'s); later calls say which group each
    /// of their rows belongs to.
    pub fn for_row_groups(
        model: &Model,
        seqs: &[Vec<u32>],
        groups: usize,
        hooks: &mut Hooks,
    ) -> Result<Option<Self>> {
        let n = common_prefix_len(seqs);
        if n < MIN_SHARED_PREFIX || !model.decoder.standing.is_empty() {
            return Ok(None);
        }
        Self::run(model, &seqs[0][..n], groups, hooks).map(Some)
    }

    /// [`Self::new`] with `hooks` on the prefix's run: captures, interventions that treat every
    /// row alike (the rows that reuse the prefix get it as edited here), `start_at_block` (the
    /// cache then has no keys before that block; later calls must start there too).
    pub fn with_hooks(model: &Model, ids: &[u32], hooks: &mut Hooks) -> Result<Self> {
        Self::run(model, ids, 1, hooks)
    }

    fn run(model: &Model, ids: &[u32], groups: usize, hooks: &mut Hooks) -> Result<Self> {
        if ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if groups == 0 {
            return Err(EngineError::InvalidArgument(
                "a shared prefix needs at least one group of rows".into(),
            ));
        }
        let n_layers = model.config().n_layers;
        let rows = vec![ids.to_vec(); groups];
        let batch = Batch::left_padded(&rows, model.pad_id(), model.device())?;
        let mut kv = KvCache::new(n_layers, vec![0; groups]);
        model.forward(&batch, Some(&mut kv), hooks, LogitsAt::None)?;
        Ok(SharedPrefix {
            ids: ids.to_vec(),
            kv,
            groups,
        })
    }

    /// The prefix's tokens.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The widest column count of `batch` this prefix can stand in for: no more than the prefix
    /// in any row, more than every row's padding, short of every row's last token, and no
    /// further than `limit[r]` tokens into row `r` (the first token a caller needs to see
    /// through hooks). `None` when fewer than [`MIN_SHARED_PREFIX`] columns would be saved.
    pub fn width_for(&self, batch: &Batch, limit: &[usize]) -> Option<usize> {
        let max_pad = batch.pad.iter().copied().max().unwrap_or(0);
        let width = batch
            .pad
            .iter()
            .zip(limit)
            .map(|(&p, &l)| p.saturating_add(l))
            .chain(batch.pad.iter().map(|&p| p + self.len()))
            .chain(batch.pad.iter().zip(&batch.lens).map(|(&p, &n)| p + n - 1))
            .fold(usize::MAX, usize::min);
        (width > max_pad && width >= MIN_SHARED_PREFIX).then_some(width)
    }

    /// Forward of `batch` from column `width` on ([`Self::width_for`]), the first `width`
    /// columns taken from the prefix. Hooks see (and logits cover) the columns from `width`;
    /// their context's `start` is `width`.
    pub fn forward(
        &self,
        model: &Model,
        batch: &Batch,
        width: usize,
        hooks: &mut Hooks,
        logits_at: LogitsAt,
    ) -> Result<Option<Tensor>> {
        if self.groups != 1 {
            return Err(EngineError::InvalidArgument(format!(
                "this shared prefix has {} groups of rows; say each row's group (split)",
                self.groups
            )));
        }
        let (mut kv, rest) = self.split(batch, width, &vec![0; batch.pad.len()])?;
        model.forward(&rest, Some(&mut kv), hooks, logits_at)
    }

    /// The KV cache of `batch`'s first `width` columns, taken from the prefix (row `r` from
    /// group `group_of_row[r]`), and the batch of the columns after them, to run on that cache
    /// (a generation then decodes on from it).
    pub fn split(
        &self,
        batch: &Batch,
        width: usize,
        group_of_row: &[usize],
    ) -> Result<(KvCache, Batch)> {
        let (b, t) = batch.ids.dims2()?;
        if width == 0 || width >= t {
            return Err(EngineError::InvalidArgument(format!(
                "shared prefix width {width} must leave columns to run in a batch of {t}"
            )));
        }
        if group_of_row.len() != b || group_of_row.iter().any(|&g| g >= self.groups) {
            return Err(EngineError::InvalidArgument(format!(
                "{} group indices for {b} rows of a prefix with {} groups",
                group_of_row.len(),
                self.groups
            )));
        }
        // The rows must really hold the prefix where it stands in for them.
        let ids = batch.ids.narrow(1, 0, width)?.to_vec2::<u32>()?;
        for (r, row) in ids.iter().enumerate() {
            let p = batch.pad[r];
            if p > width || width - p > self.ids.len() || row[p..] != self.ids[..width - p] {
                return Err(EngineError::InvalidArgument(format!(
                    "row {r} of the batch does not start with the shared prefix over its first {width} columns"
                )));
            }
        }
        let layers = self
            .kv
            .layers
            .iter()
            .map(|l| {
                let shifted = |x: Option<Tensor>| {
                    x.map(|x| shifted_rows(&x, &batch.pad, group_of_row, width))
                        .transpose()
                };
                LayerKv::new(shifted(l.k()?)?, shifted(l.v()?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let kv = KvCache {
            layers,
            pad: batch.pad.clone(),
            len: width,
        };
        let rest = Batch {
            ids: batch.ids.narrow(1, width, t - width)?,
            pad: batch.pad.clone(),
            lens: batch.lens.clone(),
        };
        Ok((kv, rest))
    }
}

/// `x` `[groups, heads, len, d]` as `[pad.len(), heads, width, d]`: row `r` holds `pad[r]` zero
/// (masked) positions, then its group's first `width - pad[r]` prefix positions.
fn shifted_rows(x: &Tensor, pad: &[usize], group_of_row: &[usize], width: usize) -> Result<Tensor> {
    let (_, h, _, d) = x.dims4()?;
    let rows = pad
        .iter()
        .zip(group_of_row)
        .map(|(&p, &g)| {
            let kept = x.narrow(0, g, 1)?.narrow(2, 0, width - p)?;
            if p == 0 {
                return Ok(kept);
            }
            let zeros = Tensor::zeros((1, h, p, d), x.dtype(), x.device())?;
            Ok(Tensor::cat(&[&zeros, &kept], 2)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}
