//! Crosscoder training: the loop, its batch order, checkpoints and resume (one step's loss and
//! gradients are in `step`, the Adam update in `adam`).
//!
//! - **L1** (Anthropic's "Sparse Crosscoders"): loss = Σ_l ‖x_l − x̂_l‖² + λ Σ_f f_i Σ_l ‖W_dec[l, i]‖
//!   (per example, averaged over the batch), λ warmed up linearly over the first 5 % of steps.
//! - **BatchTopK** (Minder, Dumas et al. 2025): keep the k·batch largest scaled activations
//!   (ReLU output × Σ_l ‖W_dec[l, i]‖) of the batch; loss = ‖x − x̂‖² + α · aux, where aux is the
//!   normalised error of reconstructing the residual from the top `aux_k` dead latents (no
//!   activation for `dead_after` examples); the inference threshold is an EMA (β = 0.99, from the
//!   end of the warm-up) of the smallest kept scaled activation per batch.
//! - Inputs are normalised first (dictionary_learning's normaliser, target RMS 1, statistics over
//!   the first `normaliser_rows` rows).
//! - Adam (β = 0.9, 0.999), linear LR warm-up then constant, linear decay to 0 over the last 20 %.
//! - The batch order is a pure function of (seed, step): the store's rows are cut into chunks of
//!   `chunk_rows` global rows (whatever files hold them, so a store harvested in parts by many
//!   workers trains exactly as the unsharded one); each epoch visits chunks in a seeded order and
//!   rows in a seeded order within each chunk, one chunk in memory at a time. Together
//!   with checkpoints of parameters, Adam moments, dead-latent counters, threshold and the loss
//!   log, a run killed and resumed reproduces the uninterrupted run's loss curve.

use crate::adam::AdamStep;
use crate::crosscoder::{CodeNormalization, CrossCoder, Layout, Normaliser, Sparsity};
use crate::paired::PairedStore;
use crate::step::{step as step_grads, zero_padding, StepObjective, StepParams};
use crate::{invalid, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Objective {
    L1 {
        l1_coeff: f64,
    },
    BatchTopK {
        k: usize,
        aux_k: usize,
        aux_alpha: f64,
        dead_after: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub objective: Objective,
    pub dict_size: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub seed: u64,
    pub checkpoint_every: usize,
    pub normaliser_rows: usize,
    pub target_rms: f64,
    /// Initial norm of each (model, latent) decoder vector.
    pub dec_init_norm: f64,
    /// Fraction of the store's samples (whole samples, chosen by a seeded hash of their ids)
    /// held out of training; FVE, L0 and dead fraction are reported on them. 0 = none.
    #[serde(default)]
    pub validation_fraction: f64,
    /// Rows in memory at a time: the sampler's unit (see the module docs).
    #[serde(default = "default_chunk_rows")]
    pub chunk_rows: usize,
}

fn default_chunk_rows() -> usize {
    DEFAULT_CHUNK_ROWS
}

/// The default `chunk_rows`: `diff harvest`'s default rows per file, so an unsharded store's
/// chunks are its files.
pub const DEFAULT_CHUNK_ROWS: usize = 50_000;

impl TrainConfig {
    pub fn default_l1() -> Self {
        Self {
            objective: Objective::L1 { l1_coeff: 1.0 },
            dict_size: 1024,
            batch_size: 256,
            steps: 2000,
            lr: 1e-3,
            warmup_steps: 100,
            seed: 0,
            checkpoint_every: 200,
            normaliser_rows: 20_000,
            target_rms: 1.0,
            dec_init_norm: 0.1,
            validation_fraction: 0.1,
            chunk_rows: DEFAULT_CHUNK_ROWS,
        }
    }
}

/// Whether sample `id` is held out for validation: a seeded hash of the id below `fraction`.
pub fn is_validation_sample(id: &str, fraction: f64, seed: u64) -> bool {
    use sha2::{Digest, Sha256};
    if fraction <= 0.0 {
        return false;
    }
    let h = Sha256::digest(format!("{seed}/{id}").as_bytes());
    let v = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    (v as f64 / u64::MAX as f64) < fraction
}

/// The store's rows cut into chunks of `chunk_rows` (global row ranges; the last may be shorter).
pub fn chunks(store: &PairedStore, chunk_rows: usize) -> Vec<std::ops::Range<usize>> {
    let c = chunk_rows.max(1);
    (0..store.meta.rows.div_ceil(c))
        .map(|i| i * c..((i + 1) * c).min(store.meta.rows))
        .collect()
}

/// The store's rows split by sample: training row offsets within each chunk, and the global
/// indices of the validation rows.
fn split_rows(
    store: &PairedStore,
    fraction: f64,
    seed: u64,
    chunk_rows: usize,
) -> (Vec<Vec<u32>>, Vec<usize>) {
    let mut is_val = vec![false; store.meta.rows];
    for s in &store.meta.samples {
        if is_validation_sample(&s.id, fraction, seed) {
            let end = (s.first_row + s.n_rows).min(store.meta.rows);
            is_val[s.first_row.min(end)..end].fill(true);
        }
    }
    let train = chunks(store, chunk_rows)
        .into_iter()
        .map(|c| {
            (0..c.len())
                .filter(|&r| !is_val[c.start + r])
                .map(|r| r as u32)
                .collect()
        })
        .collect();
    let val = (0..store.meta.rows).filter(|&r| is_val[r]).collect();
    (train, val)
}

/// The trained crosscoder on the held-out samples' rows (normalised units, as in training).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Validation {
    pub samples: usize,
    pub rows: usize,
    pub fve: f64,
    pub mse: f64,
    /// Mean active latents per row (inference encoding: the learned threshold for BatchTopK).
    pub l0: f64,
    /// Latents that never fire on the validation rows.
    pub dead_fraction: f64,
}

/// Evaluates `cc` on rows `rows` (global indices) of `store`.
pub fn validate(
    cc: &CrossCoder,
    store: &PairedStore,
    rows: &[usize],
) -> Result<Option<Validation>> {
    if rows.is_empty() {
        return Ok(None);
    }
    // contiguous runs of rows, read once each
    let mut parts = vec![];
    let mut i = 0;
    while i < rows.len() {
        let mut j = i + 1;
        while j < rows.len() && rows[j] == rows[j - 1] + 1 {
            j += 1;
        }
        parts.push(store.rows(rows[i], j - i)?);
        i = j;
    }
    let x = Tensor::cat(&parts, 0)?.to_dtype(DType::F32)?;
    let xn = cc.normalize(&x)?;
    let f = cc.encode(&x, true)?;
    let recon = cc.normalize(&cc.forward(&x)?)?;
    let n = x.dim(0)?;
    let mse = (&xn - &recon)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64 / n as f64;
    let active = f.gt(0f32)?.to_dtype(DType::F32)?;
    let l0 = active.sum_all()?.to_scalar::<f32>()? as f64 / n as f64;
    let fired: Vec<f32> = active.max(0)?.to_vec1()?;
    let dead_fraction =
        fired.iter().filter(|&&v| v == 0.0).count() as f64 / fired.len().max(1) as f64;
    let samples = store
        .meta
        .samples
        .iter()
        .filter(|s| rows.binary_search(&s.first_row).is_ok())
        .count();
    Ok(Some(Validation {
        samples,
        rows: n,
        fve: crate::metrics::fve(&xn, &recon)?,
        mse,
        l0,
        dead_fraction,
    }))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub mse: f64,
    /// L1 term (unweighted) or aux loss.
    pub penalty: f64,
    pub fve: f64,
    pub l0: f64,
    pub dead_fraction: f64,
    pub lr: f64,
}

/// The batch order: (seed, step) -> rows, visiting one chunk at a time.
struct Sampler {
    /// The chunks' global row ranges.
    chunks: Vec<std::ops::Range<usize>>,
    /// Training row offsets within each chunk (validation rows left out).
    keep: Vec<Vec<u32>>,
    total: usize,
    seed: u64,
    /// (epoch, chunk) loaded now, its permuted rows.
    loaded: Option<((usize, usize), Tensor)>,
}

impl Sampler {
    fn new(chunks: Vec<std::ops::Range<usize>>, keep: Vec<Vec<u32>>, seed: u64) -> Self {
        let total = keep.iter().map(Vec::len).sum();
        Self {
            chunks,
            keep,
            total,
            seed,
            loaded: None,
        }
    }

    fn shard_order(&self, epoch: usize) -> Vec<usize> {
        let mut o: Vec<usize> = (0..self.keep.len()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        o.shuffle(&mut rng);
        o
    }

    fn load(&mut self, store: &PairedStore, epoch: usize, shard: usize) -> Result<&Tensor> {
        if self.loaded.as_ref().map(|(k, _)| *k) != Some((epoch, shard)) {
            let c = &self.chunks[shard];
            let t = store.rows(c.start, c.len())?;
            let mut perm: Vec<u32> = self.keep[shard].clone();
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                self.seed
                    ^ ((epoch as u64) << 32)
                    ^ (shard as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
            );
            perm.shuffle(&mut rng);
            let idx = Tensor::from_vec(perm, self.keep[shard].len(), &Device::Cpu)?;
            self.loaded = Some(((epoch, shard), t.index_select(&idx, 0)?));
        }
        Ok(&self.loaded.as_ref().expect("just loaded").1)
    }

    /// Rows of step `step` (batch size `b`).
    fn batch(&mut self, store: &PairedStore, step: usize, b: usize) -> Result<Tensor> {
        let mut pos = step * b;
        let mut need = b;
        let mut parts = Vec::new();
        while need > 0 {
            let epoch = pos / self.total;
            let mut within = pos % self.total;
            let order = self.shard_order(epoch);
            let mut shard = order[0];
            for &s in &order {
                if within < self.keep[s].len() {
                    shard = s;
                    break;
                }
                within -= self.keep[s].len();
            }
            let take = need.min(self.keep[shard].len() - within);
            let t = self.load(store, epoch, shard)?;
            parts.push(t.narrow(0, within, take)?);
            pos += take;
            need -= take;
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// Mean and std per (model, dim) over the first `max_rows` rows, in f64; with `rows`, only
/// those row offsets of each chunk of `chunk_rows` (the training rows: validation samples must
/// not set the normalisation they are evaluated in).
pub fn activation_stats(
    store: &PairedStore,
    max_rows: usize,
    rows: Option<&[Vec<u32>]>,
    chunk_rows: usize,
) -> Result<(Tensor, Tensor)> {
    let (n, d) = (store.n_models(), store.meta.d);
    let mut sum = vec![0f64; n * d];
    let mut sq = vec![0f64; n * d];
    let mut count = 0usize;
    for (i, c) in chunks(store, chunk_rows).into_iter().enumerate() {
        if count >= max_rows {
            break;
        }
        let t = match rows {
            Some(r) if r[i].len() < c.len() => {
                if r[i].is_empty() {
                    continue;
                }
                let idx = Tensor::new(r[i].as_slice(), &Device::Cpu)?;
                store.rows(c.start, c.len())?.index_select(&idx, 0)?
            }
            _ => store.rows(c.start, c.len())?,
        };
        let take = t.dim(0)?.min(max_rows - count);
        let v: Vec<f32> = t.narrow(0, 0, take)?.flatten_all()?.to_vec1()?;
        for r in 0..take {
            for j in 0..n * d {
                let x = v[r * n * d + j] as f64;
                sum[j] += x;
                sq[j] += x * x;
            }
        }
        count += take;
    }
    let c = count.max(1) as f64;
    let mean: Vec<f32> = sum.iter().map(|s| (s / c) as f32).collect();
    // unbiased, as torch.std
    let std: Vec<f32> = sum
        .iter()
        .zip(&sq)
        .map(|(s, q)| {
            let m = s / c;
            (((q - c * m * m) / (c - 1.0).max(1.0)).max(0.0)).sqrt() as f32
        })
        .collect();
    Ok((
        Tensor::from_vec(mean, (n, d), &Device::Cpu)?,
        Tensor::from_vec(std, (n, d), &Device::Cpu)?,
    ))
}

struct Params {
    w_enc: Var,
    b_enc: Var,
    w_dec: Var,
    b_dec: Var,
}

impl Params {
    fn vars(&self) -> [&Var; 4] {
        [&self.w_enc, &self.b_enc, &self.w_dec, &self.b_dec]
    }
}

/// Everything a checkpoint holds besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointMeta {
    step: usize,
    config: TrainConfig,
    threshold: f64,
    log: Vec<StepLog>,
    store_rows: usize,
    /// A store harvested in parts: its finished parts (index, count, file hashes).
    #[serde(default)]
    store_parts: Vec<PartKey>,
}

type PartKey = (usize, usize, Vec<String>);

fn store_parts(store: &PairedStore) -> Vec<PartKey> {
    store.meta.sharding.as_ref().map_or(vec![], |s| {
        s.parts
            .iter()
            .map(|p| {
                (
                    p.index,
                    p.count,
                    p.files.iter().map(|f| f.sha256.clone()).collect(),
                )
            })
            .collect()
    })
}

pub struct TrainOutcome {
    pub crosscoder: CrossCoder,
    pub log: Vec<StepLog>,
    /// Step this run started from (0, or the checkpoint's).
    pub resumed_from: usize,
    /// Rows of the store the checkpoint was made on, when the store has gained parts since.
    pub store_grew_from: Option<usize>,
    /// Whether training reached `config.steps` (false when stopped by `stop_after`).
    pub finished: bool,
    pub seconds: f64,
    /// Rows training drew from (the store less the validation samples).
    pub train_rows: usize,
    /// The final crosscoder on the held-out samples (None without any).
    pub validation: Option<Validation>,
}

const CKPT_TENSORS: &str = "checkpoint.safetensors";
const CKPT_META: &str = "checkpoint.json";

/// Trains a crosscoder on `store`. With `resume`, continues from `ckpt_dir`'s checkpoint when
/// there is one with the same config. `stop_after` ends this run after that many steps (for
/// tests of resumption; a killed process is the same as a stop after its last checkpoint).
/// glibc's malloc by default serves each buffer over its (adaptive) threshold with a fresh
/// `mmap` and trims freed memory at the top of the heap, so a training step's dictionary-sized
/// tensors (5 MB each, a dozen per step) were new pages every step: the kernel's page faults
/// were a fifth of a step's samples. Buffers up to 32 MiB now come from the heap, and freed
/// memory under 1 GiB stays with the process for the next step (`diff train` 1.37x,
/// bench/README.md). Process-wide and set once; the forward measured no difference, so only
/// training sets it.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes the allocator's thresholds; glibc applies them under
            // its own lock, and both values are in the ranges it accepts.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}

pub fn train(
    store: &PairedStore,
    cfg: &TrainConfig,
    ckpt_dir: &Path,
    resume: bool,
    stop_after: Option<usize>,
    progress: &dyn Fn(&StepLog),
) -> Result<TrainOutcome> {
    // A step alternates MKL's products with candle's elementwise ops; MKL's OpenMP threads
    // spinning between products take the two cores those ops need (`diff train` on MKL: 8129
    // rows/s spinning, 9173 with `OMP_WAIT_POLICY=passive`, bench/README.md). libgomp reads
    // that variable when MKL loads, and a library cannot set the environment soundly once other
    // threads run, so the CLI sets it at start for `diff train`; other callers (Python) set it
    // themselves before MKL loads.
    persona_lens_engine::tune_cpu_pools();
    keep_freed_buffers();
    let t0 = std::time::Instant::now();
    let dev = Device::Cpu;
    let (n, d, f) = (store.n_models(), store.meta.d, cfg.dict_size);
    if cfg.batch_size == 0 || cfg.steps == 0 || f == 0 {
        return invalid("batch size, steps and dict size must be positive");
    }
    if let Objective::BatchTopK { k, .. } = cfg.objective {
        if k == 0 || k > f {
            return invalid(format!(
                "BatchTopK's k = {k} must be from 1 to the dictionary size {f}; give a smaller k or a larger dict_size"
            ));
        }
    }
    // Real-width masks: padded coordinates of a narrower model keep zero weights.
    let mut mask = vec![0f32; n * d];
    for (m, &dm) in store.meta.dims.iter().enumerate() {
        for j in 0..dm.min(d) {
            mask[m * d + j] = 1.0;
        }
    }
    let mask_nd = Tensor::from_vec(mask, (n, d), &dev)?;
    let (keep, val_rows) = split_rows(store, cfg.validation_fraction, cfg.seed, cfg.chunk_rows);
    if keep.iter().all(Vec::is_empty) {
        return invalid(format!(
            "no training rows left after holding out {:.0} % of the samples for validation; give a larger corpus or a smaller validation_fraction",
            100.0 * cfg.validation_fraction
        ));
    }
    let ckpt_t = ckpt_dir.join(CKPT_TENSORS);
    let ckpt_m = ckpt_dir.join(CKPT_META);
    let mut start = 0usize;
    let mut threshold = -1.0f64;
    let mut log: Vec<StepLog> = Vec::new();
    let mut tensors: Option<HashMap<String, Tensor>> = None;
    let mut store_grew_from = None;
    if resume && ckpt_m.exists() {
        let meta: CheckpointMeta = serde_json::from_str(
            &std::fs::read_to_string(&ckpt_m)
                .map_err(|e| crate::DiffError::Invalid(format!("{}: {e}", ckpt_m.display())))?,
        )
        .map_err(|e| crate::DiffError::Invalid(format!("{}: {e}", ckpt_m.display())))?;
        // A store harvested in parts may have gained parts since the checkpoint: training goes
        // on over the larger store (its batch order from here on is the larger store's) with
        // the checkpoint's normaliser.
        let parts_now = store_parts(store);
        let grew = !meta.store_parts.is_empty()
            && store.meta.rows > meta.store_rows
            && meta.store_parts.iter().all(|p| parts_now.contains(p));
        if meta.config != *cfg || !(meta.store_rows == store.meta.rows || grew) {
            return invalid(format!(
                "the checkpoint in {} was made with other settings or data; use the same settings and data, or start over without resuming",
                ckpt_dir.display()
            ));
        }
        if grew {
            store_grew_from = Some(meta.store_rows);
        }
        let t = candle_core::safetensors::load(&ckpt_t, &dev).map_err(|e| {
            crate::DiffError::Invalid(format!(
                "cannot read {}: {} (delete it to start over)",
                ckpt_t.display(),
                e.to_string().lines().next().unwrap_or("")
            ))
        })?;
        start = meta.step;
        threshold = meta.threshold;
        log = meta.log;
        tensors = Some(t);
    }
    let normaliser = match tensors
        .as_ref()
        .and_then(|t| Some((t.get("normaliser.mean")?, t.get("normaliser.std")?)))
    {
        Some((mean, std)) => Normaliser::from_stats(mean.clone(), std.clone(), cfg.target_rms)?,
        None => {
            let (mean, std) =
                activation_stats(store, cfg.normaliser_rows, Some(&keep), cfg.chunk_rows)?;
            Normaliser::from_stats(mean, std, cfg.target_rms)?
        }
    };
    let (params, mut adam_m, mut adam_v, mut since_fired) = match &tensors {
        Some(t) => {
            let g = |k: &str| -> Result<Tensor> {
                t.get(k).cloned().ok_or_else(|| {
                    crate::DiffError::Invalid(format!(
                        "checkpoint lacks '{k}'; delete it to start over"
                    ))
                })
            };
            let p = Params {
                w_enc: Var::from_tensor(&g("w_enc")?)?,
                b_enc: Var::from_tensor(&g("b_enc")?)?,
                w_dec: Var::from_tensor(&g("w_dec")?)?,
                b_dec: Var::from_tensor(&g("b_dec")?)?,
            };
            let names = ["w_enc", "b_enc", "w_dec", "b_dec"];
            let moments = |which: &str| -> Result<Vec<Vec<f32>>> {
                names
                    .iter()
                    .map(|k| {
                        Ok(g(&format!("{which}.{k}"))?
                            .flatten_all()?
                            .to_vec1::<f32>()?)
                    })
                    .collect()
            };
            let (m, v) = (moments("adam_m")?, moments("adam_v")?);
            (p, m, v, g("since_fired")?)
        }
        None => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
            use rand::Rng;
            // Gaussian init by Box-Muller from the seeded RNG (candle's randn is not seedable
            // on CPU), each (model, latent) decoder vector scaled to dec_init_norm; the encoder
            // starts as the decoder's transpose (as dictionary_learning does).
            let mut g = vec![0f32; n * f * d];
            for x in g.iter_mut() {
                let u1: f64 = rng.random::<f64>().max(1e-12);
                let u2: f64 = rng.random::<f64>();
                *x = ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32;
            }
            let w = Tensor::from_vec(g, (n, f, d), &dev)?.broadcast_mul(&mask_nd.unsqueeze(1)?)?;
            let norms = w.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
            let w_dec = (w.broadcast_div(&(norms + 1e-12)?)? * cfg.dec_init_norm)?;
            let w_enc = w_dec.transpose(1, 2)?.contiguous()?;
            let p = Params {
                w_enc: Var::from_tensor(&w_enc)?,
                b_enc: Var::from_tensor(&Tensor::zeros(f, DType::F32, &dev)?)?,
                w_dec: Var::from_tensor(&w_dec)?,
                b_dec: Var::from_tensor(&Tensor::zeros((n, d), DType::F32, &dev)?)?,
            };
            let m: Vec<Vec<f32>> = p
                .vars()
                .iter()
                .map(|v| vec![0f32; v.elem_count()])
                .collect();
            let v = m.clone();
            (p, m, v, Tensor::zeros(f, DType::F32, &dev)?)
        }
    };
    log.truncate(start);

    let mut sampler = Sampler::new(chunks(store, cfg.chunk_rows), keep, cfg.seed);
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let decay_start = cfg.steps - cfg.steps / 5;
    let end = match stop_after {
        Some(s) => (start + s).min(cfg.steps),
        None => cfg.steps,
    };
    let save_ckpt = |step: usize,
                     p: &Params,
                     m: &[Vec<f32>],
                     v: &[Vec<f32>],
                     since: &Tensor,
                     threshold: f64,
                     log: &[StepLog]|
     -> Result<()> {
        let names = ["w_enc", "b_enc", "w_dec", "b_dec"];
        let mut t: Vec<(String, Tensor)> = Vec::new();
        for (i, k) in names.iter().enumerate() {
            let var = p.vars()[i].as_tensor();
            t.push((k.to_string(), var.clone()));
            t.push((
                format!("adam_m.{k}"),
                Tensor::from_slice(&m[i], var.shape(), &dev)?,
            ));
            t.push((
                format!("adam_v.{k}"),
                Tensor::from_slice(&v[i], var.shape(), &dev)?,
            ));
        }
        t.push(("since_fired".into(), since.clone()));
        t.push(("normaliser.mean".into(), normaliser.mean.clone()));
        t.push(("normaliser.std".into(), normaliser.std.clone()));
        persona_lens_engine::io::save_safetensors(&t, HashMap::new(), &ckpt_t)?;
        // The meta file is written last: it names a step whose tensors are already on disk.
        let meta = CheckpointMeta {
            step,
            config: cfg.clone(),
            threshold,
            log: log.to_vec(),
            store_rows: store.meta.rows,
            store_parts: store_parts(store),
        };
        let bytes =
            serde_json::to_vec(&meta).map_err(|e| crate::DiffError::Invalid(e.to_string()))?;
        persona_lens_engine::io::write_atomic(&ckpt_m, &bytes)?;
        Ok(())
    };

    for step in start..end {
        let lr = if step < cfg.warmup_steps {
            cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64
        } else if step >= decay_start {
            cfg.lr * (cfg.steps - step) as f64 / (cfg.steps - decay_start).max(1) as f64
        } else {
            cfg.lr
        };
        let x = normaliser.normalize(&sampler.batch(store, step, cfg.batch_size)?)?;
        let bsz = x.dim(0)?;
        let xf = x.reshape((bsz, n * d))?;
        let objective = match cfg.objective {
            Objective::L1 { l1_coeff } => {
                let l1_warm = (cfg.steps / 20).max(1);
                StepObjective::L1 {
                    lambda: l1_coeff * ((step + 1) as f64 / l1_warm as f64).min(1.0),
                }
            }
            Objective::BatchTopK {
                k,
                aux_k,
                aux_alpha,
                dead_after,
            } => StepObjective::BatchTopK {
                k,
                aux_k,
                aux_alpha,
                dead_after,
            },
        };
        // Detached views of the weights: the step builds no autograd graph.
        let w = params.vars().map(|v| v.as_tensor().detach());
        let out = step_grads(
            &xf,
            &StepParams {
                w_enc: &w[0],
                b_enc: &w[1],
                w_dec: &w[2],
                b_dec: &w[3],
            },
            objective,
            &since_fired,
        )?;
        since_fired = out.since_fired;
        // EMA of the smallest kept scaled activation (the inference threshold), from the end of
        // the LR warm-up on (early batches' minima belong to a different model); β = 0.99 so
        // short runs converge too.
        if let Some(min_pos) = out.kept_min {
            if min_pos.is_finite() && step >= cfg.warmup_steps {
                threshold = if threshold < 0.0 {
                    min_pos as f64
                } else {
                    0.99 * threshold + 0.01 * min_pos as f64
                };
            }
        }
        let acts = out.acts;
        let adam = AdamStep::new(b1, b2, eps, (step + 1) as i32, lr);
        for (i, var) in params.vars().iter().enumerate() {
            adam.apply(var, &out.grads[i], &mut adam_m[i], &mut adam_v[i])?;
        }
        // keep padded coordinates at zero
        if store.meta.dims.iter().any(|&dm| dm < d) {
            zero_padding(
                params.w_enc.as_tensor(),
                params.w_dec.as_tensor(),
                &store.meta.dims,
            )?;
        }
        let mse_v = out.mse;
        let tot = xf
            .broadcast_sub(&(crate::step::col_sum(&xf)? * (1.0 / bsz as f64))?)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64
            / bsz as f64;
        let l0 = acts
            .gt(0f32)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()? as f64
            / bsz as f64;
        let dead_after = match cfg.objective {
            Objective::BatchTopK { dead_after, .. } => dead_after,
            Objective::L1 { .. } => 10 * cfg.batch_size.max(1000),
        };
        let dead_fraction = since_fired
            .ge(dead_after as f64)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()? as f64;
        let entry = StepLog {
            step,
            loss: out.loss,
            mse: mse_v,
            penalty: out.penalty,
            fve: if tot > 0.0 { 1.0 - mse_v / tot } else { 0.0 },
            l0,
            dead_fraction,
            lr,
        };
        progress(&entry);
        log.push(entry);
        let done = step + 1;
        if (cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0) || done == cfg.steps {
            save_ckpt(
                done,
                &params,
                &adam_m,
                &adam_v,
                &since_fired,
                threshold,
                &log,
            )?;
        }
    }

    let sparsity = match cfg.objective {
        Objective::L1 { .. } => Sparsity::Relu,
        Objective::BatchTopK { k, .. } => Sparsity::BatchTopK { k, threshold },
    };
    let mut metadata = BTreeMap::new();
    metadata.insert("persona_lens.models".into(), store.meta.models.join(","));
    metadata.insert("persona_lens.hooks".into(), store.meta.hooks.join(","));
    metadata.insert(
        "persona_lens.dims".into(),
        store
            .meta
            .dims
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(","),
    );
    metadata.insert(
        "persona_lens.alignment".into(),
        format!("{:?}", store.meta.alignment).to_lowercase(),
    );
    metadata.insert(
        "persona_lens.train_config".into(),
        serde_json::to_string(cfg).unwrap_or_default(),
    );
    metadata.insert("persona_lens.steps_done".into(), end.to_string());
    let cc = CrossCoder {
        w_enc: params.w_enc.as_tensor().clone(),
        b_enc: params.b_enc.as_tensor().clone(),
        w_dec: params.w_dec.as_tensor().clone(),
        b_dec: params.b_dec.as_tensor().clone(),
        code_norm: CodeNormalization::Crosscoder,
        alpha_sae: 1.0,
        alpha_cc: 0.1,
        normaliser: Some(normaliser),
        sparsity,
        layout: Layout::Fresh,
        metadata,
    };
    let validation = validate(&cc, store, &val_rows)?;
    Ok(TrainOutcome {
        crosscoder: cc,
        log,
        resumed_from: start,
        store_grew_from,
        finished: end == cfg.steps,
        seconds: t0.elapsed().as_secs_f64(),
        train_rows: sampler.total,
        validation,
    })
}
