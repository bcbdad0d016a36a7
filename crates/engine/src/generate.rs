//! Greedy and sampled generation, batched (left padded), with the KV cache or by full recompute.

use crate::error::{EngineError, Result};
use crate::hooks::Hooks;
use crate::layers::{KvCache, LogitsAt};
use crate::{Batch, Model, SharedPrefix};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Sampling {
    /// argmax; ties go to the lowest id (as torch.argmax).
    Greedy,
    Sample {
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        seed: u64,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation of a row stops after it emits one of these (the stop token is kept).
    pub stop_tokens: Vec<u32>,
    /// Incremental decoding with the KV cache (default) or full recompute at every step.
    pub use_kv_cache: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 16,
            sampling: Sampling::Greedy,
            stop_tokens: vec![],
            use_kv_cache: true,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    /// Top-1 minus top-2 logit at each step (a small margin = a near-tie).
    pub margins: Vec<f32>,
    pub stopped_on: Option<u32>,
}

/// Greedy decoding's choice: the id of the largest logit, ties to the lowest id.
pub fn greedy_token(row: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn pick(row: &[f32], sampling: &Sampling, rng: &mut rand::rngs::StdRng) -> Result<u32> {
    match sampling {
        Sampling::Greedy => Ok(greedy_token(row)),
        Sampling::Sample {
            temperature,
            top_k,
            top_p,
            ..
        } => {
            if *temperature <= 0.0 {
                return pick(row, &Sampling::Greedy, rng);
            }
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            if let Some(k) = top_k {
                idx.truncate((*k).max(1));
            }
            let maxv = row[idx[0]] as f64;
            let mut probs: Vec<f64> = idx
                .iter()
                .map(|&i| ((row[i] as f64 - maxv) / temperature).exp())
                .collect();
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
            if let Some(pp) = top_p {
                let mut cum = 0.0;
                let mut keep = probs.len();
                for (j, p) in probs.iter().enumerate() {
                    cum += p;
                    if cum >= *pp {
                        keep = j + 1;
                        break;
                    }
                }
                probs.truncate(keep);
                idx.truncate(keep);
                let t: f64 = probs.iter().sum();
                probs.iter_mut().for_each(|p| *p /= t);
            }
            let u: f64 = rng.random();
            let mut cum = 0.0;
            for (j, p) in probs.iter().enumerate() {
                cum += p;
                if u < cum {
                    return Ok(idx[j] as u32);
                }
            }
            Ok(*idx
                .last()
                .ok_or_else(|| EngineError::InvalidArgument("empty distribution".into()))?
                as u32)
        }
    }
}

fn margin(row: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in row {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

/// Generates continuations of each prompt (one batch, left padded). Hooks fire at every forward
/// call (prompt, then each new token), so steering hooks apply to each position exactly once.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    hooks: &mut Hooks,
) -> Result<Vec<Generation>> {
    generate_after_prefix(model, prompts, opts, hooks, None)
}

/// [`generate`] where the prompts start with `prefix` (row `r` takes prefix group
/// `group_of_row[r]`, run with the hooks' edits of that row): the prompt's columns after the
/// prefix run on its keys and values, then decoding goes on as usual. Hooks therefore do not fire
/// on the prefix's columns here; the prefix's own run must have applied what they would. Without
/// the KV cache, or where the prefix cannot stand in for the batch's columns
/// ([`SharedPrefix::width_for`]), the prompts run whole.
pub fn generate_after_prefix(
    model: &Model,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    hooks: &mut Hooks,
    prefix: Option<(&SharedPrefix, &[usize])>,
) -> Result<Vec<Generation>> {
    let b = prompts.len();
    let seed = match &opts.sampling {
        Sampling::Sample { seed, .. } => *seed,
        Sampling::Greedy => 0,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|p| Generation {
            prompt_ids: p.clone(),
            generated_ids: vec![],
            margins: vec![],
            stopped_on: None,
        })
        .collect();
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    let pad_id = model.pad_id();
    let batch = Batch::left_padded(prompts, pad_id, model.device())?;
    let max_pos = model.config().max_position;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest > max_pos {
        return Err(EngineError::PromptTooLong {
            len: longest,
            max: max_pos,
        });
    }
    if longest + opts.max_new_tokens > max_pos {
        return Err(EngineError::GenerationTooLong {
            prompt: longest,
            new_tokens: opts.max_new_tokens,
            max: max_pos,
        });
    }
    let mut done = vec![false; b];
    let shared = match prefix {
        Some((p, groups)) if opts.use_kv_cache => p
            .width_for(&batch, &vec![usize::MAX; b])
            .map(|w| p.split(&batch, w, groups))
            .transpose()?,
        _ => None,
    };
    let (mut kv, first) = match shared {
        Some((cache, rest)) => (Some(cache), rest),
        None => (
            opts.use_kv_cache
                .then(|| KvCache::new(model.config().n_layers, batch.pad.clone())),
            batch.clone(),
        ),
    };
    if let Some(cache) = kv.as_mut() {
        // Decode steps then write their keys into this room instead of copying the cache.
        cache.reserve(opts.max_new_tokens);
    }
    let mut logits = model
        .forward(&first, kv.as_mut(), hooks, LogitsAt::Last)?
        .ok_or_else(|| EngineError::InvalidArgument("no logits".into()))?;
    for _step in 0..opts.max_new_tokens {
        let rows = logits.to_vec2::<f32>()?;
        let mut next = vec![pad_id; b];
        for r in 0..b {
            if done[r] {
                continue;
            }
            let tok = pick(&rows[r], &opts.sampling, &mut rng)?;
            out[r].margins.push(margin(&rows[r]));
            out[r].generated_ids.push(tok);
            next[r] = tok;
            if opts.stop_tokens.contains(&tok) {
                done[r] = true;
                out[r].stopped_on = Some(tok);
            }
        }
        if done.iter().all(|d| *d)
            || out
                .iter()
                .all(|g| g.generated_ids.len() >= opts.max_new_tokens)
        {
            break;
        }
        logits = match kv.as_mut() {
            Some(cache) => {
                let step = Batch {
                    ids: Tensor::from_vec(next, (b, 1), model.device())?,
                    pad: batch.pad.clone(),
                    lens: vec![1; b],
                };
                model.forward(&step, Some(cache), hooks, LogitsAt::Last)?
            }
            None => {
                // Full recompute: the whole sequence again (what HF does with use_cache=False),
                // with each row's original left padding. Stopped rows grow with padding ids at
                // the end (never read) so all rows stay the same length.
                let steps = out.iter().map(|g| g.generated_ids.len()).max().unwrap_or(0);
                let mut flat = Vec::new();
                for (r, g) in out.iter().enumerate() {
                    flat.extend(std::iter::repeat_n(pad_id, batch.pad[r]));
                    flat.extend(&g.prompt_ids);
                    flat.extend(&g.generated_ids);
                    flat.extend(std::iter::repeat_n(pad_id, steps - g.generated_ids.len()));
                }
                let t = flat.len() / b;
                let full = Batch {
                    ids: Tensor::from_vec(flat, (b, t), model.device())?,
                    pad: batch.pad.clone(),
                    lens: vec![],
                };
                // Interventions apply to every position again; the capture cache keeps the
                // last full forward only (it covers the whole sequence).
                hooks.cache.clear();
                model.forward(&full, None, hooks, LogitsAt::Last)?
            }
        }
        .ok_or_else(|| EngineError::InvalidArgument("no logits".into()))?;
    }
    Ok(out)
}
