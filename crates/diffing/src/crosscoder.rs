//! Crosscoders with the exact semantics of dictionary_learning's `CrossCoder` and
//! `BatchTopKCrossCoder` (science-of-finetuning fork), which the open-source replication layout
//! (`W_enc`, `W_dec`, `b_enc`, `b_dec`) is a special case of.
//!
//! Shapes: `x` is `(batch, n_models, d)`; index 0 is the base model, 1 the chat model.
//! - `encode(x)` = ReLU(Σ_l normalise(x)_l · W_enc[l] + b_enc), `(batch, F)`. For BatchTopK the
//!   ReLU output is then kept where its *scaled* value (× code normalisation) passes the learned
//!   threshold (`use_threshold`, inference) or is among the batch's top k·batch scaled values
//!   (training). The kept values are the unscaled ones, as in Python's `encode`.
//! - `get_activations(x)` = `encode(x)` × code normalisation (Python's `get_activations`).
//! - `decode(f)` = denormalise(Σ_f f · W_dec[l, f] + b_dec[l]), `(batch, n_models, d)`.
//! - code normalisation (per latent): CROSSCODER Σ_l ‖W_dec[l,f]‖, SAE ‖W_dec[:,f]‖ (concatenated),
//!   MIXED α_sae·SAE + α_cc·CROSSCODER, NONE 1, DECOUPLED per layer (summed in `get_activations`).
//! - the activation normaliser: `(x − mean) · g_l` with g_l = target_rms / sqrt(Σ_d std² + 1e-8)
//!   (keep_relative_variance, the default), inverted by `x / (g_l + 1e-8) + mean`.

use crate::{invalid, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CodeNormalization {
    Crosscoder,
    Sae,
    Mixed,
    None,
    Decoupled,
}

impl CodeNormalization {
    /// The Python enum's `auto()` value, stored as `code_normalization_id`.
    pub fn id(self) -> i64 {
        match self {
            Self::Crosscoder => 1,
            Self::Sae => 2,
            Self::Mixed => 3,
            Self::None => 4,
            Self::Decoupled => 5,
        }
    }
    pub fn from_id(id: i64) -> Result<Self> {
        Ok(match id {
            1 => Self::Crosscoder,
            2 => Self::Sae,
            3 => Self::Mixed,
            4 => Self::None,
            5 => Self::Decoupled,
            o => return invalid(format!("unknown code_normalization_id {o} (known: 1 CROSSCODER, 2 SAE, 3 MIXED, 4 NONE, 5 DECOUPLED)")),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Crosscoder => "CROSSCODER",
            Self::Sae => "SAE",
            Self::Mixed => "MIXED",
            Self::None => "NONE",
            Self::Decoupled => "DECOUPLED",
        }
    }
    pub fn from_name(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "CROSSCODER" => Self::Crosscoder,
            "SAE" => Self::Sae,
            "MIXED" => Self::Mixed,
            "NONE" => Self::None,
            "DECOUPLED" => Self::Decoupled,
            o => {
                return invalid(format!(
                "unknown code normalization '{o}' (use CROSSCODER, SAE, MIXED, NONE or DECOUPLED)"
            ))
            }
        })
    }
}

/// dictionary_learning's `NormalizableMixin` for `(n_models, d)` activations.
#[derive(Debug, Clone)]
pub struct Normaliser {
    /// `(n, d)`.
    pub mean: Tensor,
    /// `(n, d)`.
    pub std: Tensor,
    /// `(n,)`: target_rms / sqrt(Σ_d std² + 1e-8), as stored (Python uses the stored buffer).
    pub global_scale: Tensor,
    pub target_rms: f64,
    pub keep_relative_variance: bool,
}

impl Normaliser {
    /// From per-model, per-dimension mean and std, as Python's constructor computes it.
    pub fn from_stats(mean: Tensor, std: Tensor, target_rms: f64) -> Result<Self> {
        let total_var = std.sqr()?.sum(D::Minus1)?;
        let global_scale = ((total_var + 1e-8)?.sqrt()?.recip()? * target_rms)?;
        Ok(Self {
            mean,
            std,
            global_scale,
            target_rms,
            keep_relative_variance: true,
        })
    }

    fn scale3(&self) -> Result<Tensor> {
        let n = self.global_scale.dim(0)?;
        Ok(self.global_scale.reshape((1, n, 1))?)
    }

    pub fn normalize(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.broadcast_sub(&self.mean)?;
        if self.keep_relative_variance {
            Ok(c.broadcast_mul(&self.scale3()?)?)
        } else {
            Ok(c.broadcast_div(&(&self.std + 1e-8)?)?)
        }
    }

    pub fn denormalize(&self, x: &Tensor) -> Result<Tensor> {
        let y = if self.keep_relative_variance {
            x.broadcast_div(&(self.scale3()? + 1e-8)?)?
        } else {
            x.broadcast_mul(&(&self.std + 1e-8)?)?
        };
        Ok(y.broadcast_add(&self.mean)?)
    }
}

/// How latents are made sparse.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sparsity {
    /// ReLU only (L1-trained crosscoders, the replication layout).
    Relu,
    /// BatchTopK: k per example at training time, a learned threshold on scaled activations at
    /// inference (`threshold` < 0 means never set: everything positive passes).
    BatchTopK { k: usize, threshold: f64 },
}

/// Where a crosscoder came from (for messages and provenance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `config.json` + `model.safetensors` (the Hub mixin's `save_pretrained`).
    DictionaryLearning,
    /// `torch.save(state_dict)` `.pt` checkpoint.
    DictionaryLearningPt,
    /// Open-source replication: `cfg.json` + `cc_weights.pt` (`W_enc`, `W_dec`, `b_enc`, `b_dec`).
    Replication,
    /// Made in memory (training).
    Fresh,
}

#[derive(Debug, Clone)]
pub struct CrossCoder {
    /// `(n, d, F)`.
    pub w_enc: Tensor,
    /// `(F,)`.
    pub b_enc: Tensor,
    /// `(n, F, d)`.
    pub w_dec: Tensor,
    /// `(n, d)`.
    pub b_dec: Tensor,
    pub code_norm: CodeNormalization,
    pub alpha_sae: f64,
    pub alpha_cc: f64,
    pub normaliser: Option<Normaliser>,
    pub sparsity: Sparsity,
    pub layout: Layout,
    /// Provenance (models, hook, alignment, persona-lens version), kept in the safetensors
    /// metadata so Python's loader ignores it.
    pub metadata: BTreeMap<String, String>,
}

impl CrossCoder {
    pub fn n_models(&self) -> usize {
        self.w_enc.dims()[0]
    }
    pub fn activation_dim(&self) -> usize {
        self.w_enc.dims()[1]
    }
    pub fn dict_size(&self) -> usize {
        self.w_enc.dims()[2]
    }

    /// Checks shapes agree with each other (after loading).
    pub fn validate(&self) -> Result<()> {
        let (n, d, f) = self.w_enc.dims3()?;
        let want = [
            ("decoder weight", self.w_dec.dims().to_vec(), vec![n, f, d]),
            ("encoder bias", self.b_enc.dims().to_vec(), vec![f]),
            ("decoder bias", self.b_dec.dims().to_vec(), vec![n, d]),
        ];
        for (what, got, w) in want {
            if got != w {
                return invalid(format!(
                    "crosscoder {what} has shape {got:?} but the encoder weight (n={n}, d={d}, F={f}) implies {w:?}; the file is inconsistent or not a crosscoder"
                ));
            }
        }
        if let Some(nm) = &self.normaliser {
            if nm.mean.dims() != [n, d] || nm.std.dims() != [n, d] || nm.global_scale.dims() != [n]
            {
                return invalid(format!(
                    "crosscoder normaliser shapes (mean {:?}, std {:?}, scale {:?}) do not match (n={n}, d={d})",
                    nm.mean.dims(),
                    nm.std.dims(),
                    nm.global_scale.dims()
                ));
            }
        }
        if matches!(self.sparsity, Sparsity::BatchTopK { .. })
            && self.code_norm == CodeNormalization::Decoupled
        {
            return invalid("BatchTopK crosscoders with DECOUPLED code normalisation are not supported (per-layer codes); use CROSSCODER/SAE/MIXED/NONE");
        }
        Ok(())
    }

    /// Checks `x` is `(batch, n, d)` for this crosscoder, with a message that says what to do.
    pub fn check_input(&self, x: &Tensor) -> Result<()> {
        let (n, d) = (self.n_models(), self.activation_dim());
        match x.dims() {
            [_, xn, xd] if *xn == n && *xd == d => Ok(()),
            other => invalid(format!(
                "input has shape {other:?} but the crosscoder expects (batch, {n}, {d}) (batch, n_models, activation_dim); harvest activations at the hook it was trained on"
            )),
        }
    }

    pub fn normalize(&self, x: &Tensor) -> Result<Tensor> {
        match &self.normaliser {
            Some(n) => n.normalize(x),
            None => Ok(x.clone()),
        }
    }

    pub fn denormalize(&self, x: &Tensor) -> Result<Tensor> {
        match &self.normaliser {
            Some(n) => n.denormalize(x),
            None => Ok(x.clone()),
        }
    }

    /// ReLU(Σ_l x_l W_enc[l] + b_enc) of already-normalised `x`: `(batch, F)`.
    pub fn encode_pre_sparsity(&self, xn: &Tensor) -> Result<Tensor> {
        let (b, n, d) = xn.dims3()?;
        let w = self.w_enc.reshape((n * d, self.dict_size()))?;
        Ok(xn
            .reshape((b, n * d))?
            .matmul(&w)?
            .broadcast_add(&self.b_enc)?
            .relu()?)
    }

    /// Per-latent code normalisation: `(1, F)` (`(n, F)` for DECOUPLED), Python's
    /// `get_code_normalization`.
    pub fn code_normalization(&self) -> Result<Tensor> {
        let f = self.dict_size();
        let per_layer = self.w_dec.sqr()?.sum(D::Minus1)?.sqrt()?; // (n, F)
        let sae =
            || -> Result<Tensor> { Ok(self.w_dec.sqr()?.sum(D::Minus1)?.sum_keepdim(0)?.sqrt()?) };
        Ok(match self.code_norm {
            CodeNormalization::Crosscoder => per_layer.sum_keepdim(0)?,
            CodeNormalization::Sae => sae()?,
            CodeNormalization::Mixed => {
                ((sae()? * self.alpha_sae)? + (per_layer.sum_keepdim(0)? * self.alpha_cc)?)?
            }
            CodeNormalization::None => Tensor::ones((1, f), DType::F32, self.w_dec.device())?,
            CodeNormalization::Decoupled => per_layer,
        })
    }

    /// The `(1, F)` factor `get_activations` and `forward(output_features=True)` multiply by.
    pub fn feature_scale(&self) -> Result<Tensor> {
        let c = self.code_normalization()?;
        if self.code_norm == CodeNormalization::Decoupled {
            Ok(c.sum_keepdim(0)?)
        } else {
            Ok(c)
        }
    }

    /// Python's `encode(x, use_threshold=...)`: the raw (unscaled) latent activations `(batch, F)`.
    pub fn encode(&self, x: &Tensor, use_threshold: bool) -> Result<Tensor> {
        self.check_input(x)?;
        let f = self.encode_pre_sparsity(&self.normalize(x)?)?;
        match self.sparsity {
            Sparsity::Relu => Ok(f),
            Sparsity::BatchTopK { k, threshold } => {
                let scaled = f.broadcast_mul(&self.code_normalization()?)?;
                let mask = if use_threshold {
                    scaled.gt(threshold)?.to_dtype(DType::F32)?
                } else {
                    batch_topk_mask(&scaled, k)?
                };
                Ok((f * mask)?)
            }
        }
    }

    /// Python's `get_activations`: `encode(x) × code normalisation`, `(batch, F)`.
    pub fn get_activations(&self, x: &Tensor, use_threshold: bool) -> Result<Tensor> {
        Ok(self
            .encode(x, use_threshold)?
            .broadcast_mul(&self.feature_scale()?)?)
    }

    /// Python's `decode(f)`: `(batch, n, d)`, denormalised.
    pub fn decode(&self, f: &Tensor) -> Result<Tensor> {
        let (b, nf) = f.dims2()?;
        let (n, fd, d) = self.w_dec.dims3()?;
        if nf != fd {
            return invalid(format!(
                "latent codes have {nf} features but the crosscoder has {fd}"
            ));
        }
        // (F, n·d): one matmul for every model's decoder.
        let w = self.w_dec.transpose(0, 1)?.reshape((fd, n * d))?;
        let x = f
            .matmul(&w)?
            .reshape((b, n, d))?
            .broadcast_add(&self.b_dec)?;
        self.denormalize(&x)
    }

    /// Python's `forward(x)`: the reconstruction (BatchTopK uses the threshold, as Python does).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.decode(&self.encode(x, true)?)
    }

    /// Per-model decoder norms `(n, F)`.
    pub fn decoder_norms(&self) -> Result<Tensor> {
        Ok(self.w_dec.sqr()?.sum(D::Minus1)?.sqrt()?)
    }

    /// Loads a dictionary_learning state dict (from `model.safetensors` or a `.pt`), with the
    /// Hub mixin's `config.json` when there is one.
    pub fn from_state_dict(
        sd: HashMap<String, Tensor>,
        config: Option<&serde_json::Value>,
        layout: Layout,
        metadata: BTreeMap<String, String>,
        source: &str,
    ) -> Result<Self> {
        // torch.compile'd checkpoints prefix every key with `_orig_mod.`, which Python strips.
        let sd: HashMap<String, Tensor> = sd
            .into_iter()
            .map(|(k, v)| (k.replace("_orig_mod.", ""), v))
            .collect();
        let get = |k: &str| -> Result<Tensor> {
            match sd.get(k) {
                Some(t) => Ok(t.to_dtype(DType::F32)?),
                None => invalid(format!(
                    "{source}: missing tensor '{k}' (a dictionary_learning crosscoder has encoder.weight, encoder.bias, decoder.weight, decoder.bias)"
                )),
            }
        };
        let w_enc = get("encoder.weight")?;
        if w_enc.rank() != 3 {
            return invalid(format!(
                "{source}: encoder.weight has shape {:?}; a crosscoder's is (n_models, d, F) (for a single-model SAE use the SAE formats)",
                w_enc.dims()
            ));
        }
        let n = w_enc.dims()[0];
        let cfg_str = |k: &str| config.and_then(|c| c.get(k)).and_then(|v| v.as_str());
        let cfg_f64 = |k: &str| config.and_then(|c| c.get(k)).and_then(|v| v.as_f64());
        // Python's Hub loader builds the object from config.json, whose `code_normalization`
        // then governs (the loaded id buffer is not read back); `.pt` loading uses the id, and
        // an old checkpoint without one is taken as CROSSCODER.
        let code_norm = match (
            cfg_str("code_normalization"),
            sd.get("code_normalization_id"),
        ) {
            (Some(s), _) => CodeNormalization::from_name(s)?,
            (None, Some(t)) => CodeNormalization::from_id(scalar_f64(t)? as i64)?,
            (None, None) => CodeNormalization::Crosscoder,
        };
        let normaliser = match (sd.get("activation_mean"), sd.get("activation_std")) {
            (Some(m), Some(s)) => {
                let m = m.to_dtype(DType::F32)?;
                let s = s.to_dtype(DType::F32)?;
                if has_nan(&m)? || has_nan(&s)? {
                    None
                } else {
                    let target_rms = match sd.get("target_rms") {
                        Some(t) => scalar_f64(t)?,
                        None => cfg_f64("target_rms").unwrap_or(1.0),
                    };
                    let mut nm = Normaliser::from_stats(m, s, target_rms)?;
                    if let Some(g) = sd.get("activation_global_scale") {
                        nm.global_scale = g.to_dtype(DType::F32)?.reshape(n)?;
                    }
                    Some(nm)
                }
            }
            _ => None,
        };
        let is_topk = sd.contains_key("k")
            || config.and_then(|c| c.get("k")).is_some()
            || cfg_str("dict_class") == Some("BatchTopKCrossCoder");
        let sparsity = if is_topk {
            let k = match sd.get("k") {
                Some(t) => scalar_f64(t)? as usize,
                None => cfg_f64("k").unwrap_or(0.0) as usize,
            };
            if k == 0 {
                return invalid(format!(
                    "{source}: BatchTopK crosscoder without a positive k"
                ));
            }
            let threshold = match sd.get("threshold") {
                Some(t) => {
                    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                    if v.len() != 1 {
                        return invalid(format!("{source}: per-layer thresholds (decoupled BatchTopK) are not supported"));
                    }
                    v[0]
                }
                None => -1.0,
            };
            Sparsity::BatchTopK { k, threshold }
        } else {
            Sparsity::Relu
        };
        let cc = CrossCoder {
            w_enc: w_enc.contiguous()?,
            b_enc: get("encoder.bias")?,
            w_dec: get("decoder.weight")?.contiguous()?,
            b_dec: get("decoder.bias")?,
            code_norm,
            alpha_sae: cfg_f64("code_normalization_alpha_sae").unwrap_or(1.0),
            alpha_cc: cfg_f64("code_normalization_alpha_cc").unwrap_or(0.1),
            normaliser,
            sparsity,
            layout,
            metadata,
        };
        cc.validate()?;
        Ok(cc)
    }

    /// The replication layout: `W_enc` (n, d, F), `W_dec` (F, n, d), `b_enc` (F), `b_dec` (n, d);
    /// ReLU, no normaliser, L1 weighted by Σ_l ‖W_dec[f, l]‖ (= CROSSCODER code normalisation).
    pub fn from_replication(sd: HashMap<String, Tensor>, source: &str) -> Result<Self> {
        let get = |k: &str| -> Result<Tensor> {
            match sd.get(k) {
                Some(t) => Ok(t.to_dtype(DType::F32)?),
                None => invalid(format!(
                    "{source}: missing tensor '{k}' (the replication layout has W_enc, W_dec, b_enc, b_dec)"
                )),
            }
        };
        let w_dec = get("W_dec")?;
        if w_dec.rank() != 3 {
            return invalid(format!(
                "{source}: W_dec has shape {:?}; the replication layout's is (F, n_models, d)",
                w_dec.dims()
            ));
        }
        let cc = CrossCoder {
            w_enc: get("W_enc")?.contiguous()?,
            b_enc: get("b_enc")?,
            w_dec: w_dec.transpose(0, 1)?.contiguous()?,
            b_dec: get("b_dec")?,
            code_norm: CodeNormalization::Crosscoder,
            alpha_sae: 1.0,
            alpha_cc: 0.1,
            normaliser: None,
            sparsity: Sparsity::Relu,
            layout: Layout::Replication,
            metadata: BTreeMap::new(),
        };
        cc.validate()?;
        Ok(cc)
    }

    /// The state dict in dictionary_learning's key names (what `save_pretrained` writes).
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = Device::Cpu;
        let (n, d) = (self.n_models(), self.activation_dim());
        let (mean, std, scale, target_rms) = match &self.normaliser {
            Some(nm) => (
                nm.mean.clone(),
                nm.std.clone(),
                nm.global_scale.clone(),
                nm.target_rms,
            ),
            None => {
                let nan = Tensor::full(f32::NAN, (n, d), &dev)?;
                (nan.clone(), nan, Tensor::ones(n, DType::F32, &dev)?, 1.0)
            }
        };
        let mut v = vec![
            (
                "code_normalization_id".to_string(),
                Tensor::new(self.code_norm.id(), &dev)?,
            ),
            ("activation_global_scale".to_string(), scale),
            ("activation_mean".to_string(), mean),
            ("activation_std".to_string(), std),
            ("decoder.bias".to_string(), self.b_dec.clone()),
            ("decoder.weight".to_string(), self.w_dec.clone()),
            ("encoder.bias".to_string(), self.b_enc.clone()),
            ("encoder.weight".to_string(), self.w_enc.clone()),
            (
                "target_rms".to_string(),
                Tensor::new(target_rms as f32, &dev)?,
            ),
        ];
        if let Sparsity::BatchTopK { k, threshold } = self.sparsity {
            v.push((
                "threshold".to_string(),
                Tensor::new(threshold as f32, &dev)?,
            ));
            v.push((
                "k".to_string(),
                Tensor::new(k as i64, &dev)?.to_dtype(DType::I32)?,
            ));
        }
        Ok(v)
    }

    /// The Hub mixin's `config.json` (init kwargs only, as Python writes it).
    pub fn config_json(&self) -> serde_json::Value {
        let base = serde_json::json!({
            "activation_dim": self.activation_dim(),
            "activation_mean": null,
            "activation_std": null,
            "code_normalization": self.code_norm.name(),
            "dict_size": self.dict_size(),
            "num_layers": self.n_models(),
            "target_rms": self.normaliser.as_ref().map(|n| n.target_rms).unwrap_or(1.0),
        });
        let mut m = base.as_object().cloned().unwrap_or_default();
        match self.sparsity {
            Sparsity::Relu => {
                m.insert("code_normalization_alpha_cc".into(), self.alpha_cc.into());
                m.insert("code_normalization_alpha_sae".into(), self.alpha_sae.into());
                m.insert("encoder_layers".into(), serde_json::Value::Null);
                m.insert("init_with_transpose".into(), true.into());
                m.insert("latent_processor".into(), serde_json::Value::Null);
                m.insert("norm_init_scale".into(), serde_json::Value::Null);
                m.insert("num_decoder_layers".into(), serde_json::Value::Null);
                m.insert("same_init_for_all_layers".into(), false.into());
            }
            Sparsity::BatchTopK { k, .. } => {
                m.insert("k".into(), k.into());
                m.insert("norm_init_scale".into(), 1.0.into());
            }
        }
        serde_json::Value::Object(m)
    }

    /// Python's class name for this crosscoder.
    pub fn dict_class(&self) -> &'static str {
        match self.sparsity {
            Sparsity::Relu => "CrossCoder",
            Sparsity::BatchTopK { .. } => "BatchTopKCrossCoder",
        }
    }

    /// Saves `config.json` + `model.safetensors` into `dir` in dictionary_learning's layout, so
    /// `CrossCoder.from_pretrained(dir)` / `BatchTopKCrossCoder.from_pretrained(dir)` load it.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut md: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        md.insert("format".into(), "pt".into());
        md.insert("dict_class".into(), self.dict_class().into());
        persona_lens_engine::io::save_safetensors(
            &self.state_dict()?,
            md,
            &dir.join("model.safetensors"),
        )?;
        let bytes = serde_json::to_vec_pretty(&self.config_json())
            .map_err(|e| crate::DiffError::Invalid(e.to_string()))?;
        persona_lens_engine::io::write_atomic(&dir.join("config.json"), &bytes)?;
        Ok(())
    }
}

/// 1 where a value is among the `k · batch` largest of the whole `(batch, F)` matrix, else 0
/// (Python's flattened batch top-k; ties broken by position).
pub fn batch_topk_mask(scaled: &Tensor, k: usize) -> Result<Tensor> {
    let (b, f) = scaled.dims2()?;
    let vals: Vec<f32> = scaled.flatten_all()?.to_vec1()?;
    let keep = (k * b).min(vals.len());
    let mut mask = vec![0f32; vals.len()];
    if keep == vals.len() {
        mask.iter_mut().for_each(|m| *m = 1.0);
    } else if keep > 0 {
        let mut idx: Vec<usize> = (0..vals.len()).collect();
        idx.select_nth_unstable_by(keep - 1, |&a, &c| {
            vals[c].total_cmp(&vals[a]).then(a.cmp(&c))
        });
        for &i in &idx[..keep] {
            mask[i] = 1.0;
        }
    }
    Ok(Tensor::from_vec(mask, (b, f), scaled.device())?)
}

pub(crate) fn scalar_f64(t: &Tensor) -> Result<f64> {
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    match v.as_slice() {
        [x] => Ok(*x),
        _ => invalid(format!(
            "expected a scalar tensor, got shape {:?}",
            t.dims()
        )),
    }
}

fn has_nan(t: &Tensor) -> Result<bool> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .any(|x| x.is_nan()))
}
