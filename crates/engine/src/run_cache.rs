//! `Model::run_with_cache`: many prompts through the model in batches, the wanted hooks captured,
//! every row position-aligned, as one [`ActivationCache`] (TransformerLens's `run_with_cache`).

use crate::error::{EngineError, Result};
use crate::hooks::{ActivationCache, HookName, HookPoint, Hooks, Intervention};
use crate::layers::LogitsAt;
use crate::{Batch, Model};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

/// Which positions `run_with_cache` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CachePositions {
    /// Every prompt position: `[n, max_len, ...]`, index p = prompt position p (BOS included),
    /// zeros past each prompt's end.
    All,
    /// Each prompt's last token only: `[n, 1, ...]` (the position axis kept, of length 1).
    Last,
}

impl std::str::FromStr for CachePositions {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Self::All),
            "last" => Ok(Self::Last),
            o => Err(EngineError::InvalidArgument(format!(
                "unknown positions '{o}'; use all or last"
            ))),
        }
    }
}

impl Model {
    /// Runs `seqs` (token ids) in left-padded batches of `batch_size`, capturing `names`, and
    /// returns the logits and the activations, f32, position-aligned across batches (see
    /// [`CachePositions`]). Logits: `[n, vocab]` at each prompt's last token
    /// ([`LogitsAt::Last`]), `[n, max_len, vocab]` aligned like the activations
    /// ([`LogitsAt::All`]), or none. `progress` is called with the number of prompts done after
    /// each batch. Attention scores / patterns (`[n, heads, q, k]`) keep both position axes aligned.
    pub fn run_with_cache(
        &self,
        seqs: &[Vec<u32>],
        names: &[HookName],
        positions: CachePositions,
        logits_at: LogitsAt,
        batch_size: usize,
        progress: impl FnMut(usize),
    ) -> Result<(Option<Tensor>, ActivationCache)> {
        self.run_with_hooks(seqs, &[], names, positions, logits_at, batch_size, progress)
    }

    /// [`Model::run_with_cache`] with interventions on every batch (TransformerLens's
    /// `run_with_hooks`). A selector's `rows` index `seqs` (the whole input, not a batch): each
    /// batch gets the rows that fall in it, renumbered; an intervention with no row in a batch
    /// is left out of it. Positions are prompt positions, as everywhere.
    #[allow(clippy::too_many_arguments)]
    pub fn run_with_hooks(
        &self,
        seqs: &[Vec<u32>],
        interventions: &[Intervention],
        names: &[HookName],
        positions: CachePositions,
        logits_at: LogitsAt,
        batch_size: usize,
        progress: impl FnMut(usize),
    ) -> Result<(Option<Tensor>, ActivationCache)> {
        let (logits, owned) = self.run_with_hooks_owned(
            seqs,
            interventions,
            names,
            positions,
            logits_at,
            batch_size,
            progress,
        )?;
        let mut cache = ActivationCache::default();
        for a in owned {
            // `from_vec` takes the buffer as the tensor's storage: no copy
            cache.insert(a.hook, Tensor::from_vec(a.data, a.shape, self.device())?);
        }
        cache.pad = vec![0; seqs.len()];
        cache.lens = match positions {
            CachePositions::All => seqs.iter().map(Vec::len).collect(),
            // One position per row, nothing to trim.
            CachePositions::Last => vec![],
        };
        Ok((logits, cache))
    }

    /// [`Model::run_with_hooks`] with each hook's activations as an owned f32 buffer, assembled
    /// across batches with one copy: a front end hands the buffer on (to numpy) without another.
    #[allow(clippy::too_many_arguments)]
    pub fn run_with_hooks_owned(
        &self,
        seqs: &[Vec<u32>],
        interventions: &[Intervention],
        names: &[HookName],
        positions: CachePositions,
        logits_at: LogitsAt,
        batch_size: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<(Option<Tensor>, Vec<OwnedActivation>)> {
        if batch_size == 0 {
            return Err(EngineError::InvalidArgument(
                "batch size 0: give at least 1 prompt per forward call".into(),
            ));
        }
        if seqs.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        for iv in interventions {
            if let Some(r) = iv.sel.rows.iter().flatten().find(|&&r| r >= seqs.len()) {
                return Err(EngineError::InvalidArgument(format!(
                    "hook '{}' selects row {r}, but there are {} prompts (rows 0..={})",
                    iv.hook,
                    seqs.len(),
                    seqs.len() - 1
                )));
            }
        }
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let max_len = lens.iter().copied().max().unwrap_or(0);
        let mut parts: BTreeMap<HookName, Vec<Tensor>> = BTreeMap::new();
        let mut logits_parts = Vec::new();
        let mut done = 0;
        for chunk in seqs.chunks(batch_size) {
            let batch = Batch::left_padded(chunk, self.pad_id(), self.device())?;
            let mut hooks = Hooks::new();
            hooks.capture_all(names);
            for iv in interventions {
                let mut sel = iv.sel.clone();
                if let Some(rows) = &iv.sel.rows {
                    let local: Vec<usize> = rows
                        .iter()
                        .filter(|&&r| r >= done && r < done + chunk.len())
                        .map(|&r| r - done)
                        .collect();
                    if local.is_empty() {
                        continue;
                    }
                    sel.rows = Some(local);
                }
                hooks.intervene(iv.hook, iv.op.clone(), sel);
            }
            let logits = self.forward(&batch, None, &mut hooks, logits_at.clone())?;
            for h in names {
                let t = hooks.cache.aligned(h)?;
                let axis = h.point.pos_axis();
                let two_axes = matches!(h.point, HookPoint::AttnScores | HookPoint::AttnPattern);
                let t = match positions {
                    CachePositions::All => {
                        let mut t = t.pad_with_zeros(axis, 0, max_len - t.dim(axis)?)?;
                        if two_axes {
                            t = t.pad_with_zeros(3, 0, max_len - t.dim(3)?)?;
                        }
                        t
                    }
                    CachePositions::Last => {
                        let rows = (0..chunk.len())
                            .map(|r| t.get(r)?.narrow(axis - 1, chunk[r].len() - 1, 1))
                            .collect::<candle_core::Result<Vec<_>>>()?;
                        let mut t = Tensor::stack(&rows, 0)?;
                        if two_axes {
                            let k = t.dim(3)?;
                            t = t.pad_with_zeros(3, 0, max_len - k)?;
                        }
                        t
                    }
                };
                parts.entry(*h).or_default().push(t.to_dtype(DType::F32)?);
            }
            if let Some(logits) = logits {
                logits_parts.push(match logits_at {
                    LogitsAt::All => {
                        let rows = (0..chunk.len())
                            .map(|r| {
                                logits
                                    .get(r)?
                                    .narrow(0, batch.pad[r], chunk[r].len())?
                                    .pad_with_zeros(0, 0, max_len - chunk[r].len())
                            })
                            .collect::<candle_core::Result<Vec<_>>>()?;
                        Tensor::stack(&rows, 0)?
                    }
                    _ => logits,
                });
            }
            done += chunk.len();
            progress(done);
        }
        let mut owned = Vec::with_capacity(parts.len());
        for (hook, ts) in parts {
            let (data, shape) = concat_rows(&ts)?;
            owned.push(OwnedActivation { hook, data, shape });
        }
        let logits = match logits_parts.is_empty() {
            true => None,
            false => Some(Tensor::cat(&logits_parts, 0)?.contiguous()?),
        };
        Ok((logits, owned))
    }
}

/// One hook's activations, position-aligned across batches, as an owned row-major f32 buffer.
pub struct OwnedActivation {
    pub hook: HookName,
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
}

/// `parts` (f32, equal trailing dims) concatenated along axis 0 into one owned buffer, copying
/// each part once.
fn concat_rows(parts: &[Tensor]) -> Result<(Vec<f32>, Vec<usize>)> {
    let mut shape = parts.first().map(|t| t.dims().to_vec()).unwrap_or_default();
    if let Some(first) = shape.first_mut() {
        *first = parts.iter().map(|t| t.dims()[0]).sum();
    }
    let mut data = Vec::with_capacity(shape.iter().product());
    for p in parts {
        let p = p.contiguous()?;
        let (storage, layout) = p.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(cpu) => {
                let o = layout.start_offset();
                data.extend_from_slice(&cpu.as_slice::<f32>()?[o..o + p.elem_count()]);
            }
            _ => data.extend(p.flatten_all()?.to_vec1::<f32>()?),
        }
    }
    Ok((data, shape))
}
