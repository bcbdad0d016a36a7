//! Persona directions per residual row: the difference of class means and the probe-weight
//! direction, signed so that the expert class projects higher.
//!
//! Layer numbering (`--layer L`): without `--align-probe-index`, L names block L's output
//! (`blocks.L.hook_resid_post` = residual row L + 1). With `--align-probe-index`, L is the index
//! the probe was trained on, counted like HF's `hidden_states` (row 0 = the embedding), so
//! L names `blocks.L.hook_resid_pre` (= row L, the input of block L): the seed's convention,
//! where the direction is applied at the same hidden-state index it was measured at.

use crate::harvest::Harvest;
use crate::probe::{labels_for, resid_index_of, LogReg};
use crate::{AnalysisError, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirectionMeta {
    pub model: String,
    pub hooks: Vec<String>,
    pub resid_index: Vec<Option<usize>>,
    pub position_rule: String,
    pub dataset_source: String,
    pub dataset_hash: String,
    pub novice_class: String,
    pub expert_class: String,
    /// L2 norm of each raw difference of means (stored unnormalised).
    pub diff_of_means_norm: Vec<f64>,
    /// Mean projection gap (expert - novice) on the unit diff-of-means direction, over the
    /// pooled within-class standard deviation: a separation d'.
    pub diff_of_means_dprime: Vec<f64>,
    /// Cosine between the two directions per row.
    pub cosine_probe_vs_means: Vec<f64>,
    pub convention: String,
    pub l2: f64,
    pub tool: String,
}

#[derive(Debug, Clone)]
pub struct DirectionSet {
    pub meta: DirectionMeta,
    /// `[rows][d]`: mean(expert) - mean(novice), raw.
    pub diff_of_means: Vec<Vec<f32>>,
    /// `[rows][d]`: unit probe-weight direction in raw activation space.
    pub probe: Vec<Vec<f32>>,
}

const CONVENTION: &str = "diff_of_means: raw mean(expert) - mean(novice) (norm in diff_of_means_norm); probe: unit-norm logistic-regression weight (expert minus novice) mapped back from standardised to raw activation space; both signed so that expert prompts project higher";

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Computes both directions for every hook in `hooks`.
pub fn compute(
    h: &Harvest,
    hooks: &[String],
    novice: &str,
    expert: &str,
    l2: f64,
) -> Result<DirectionSet> {
    let classes = vec![novice.to_string(), expert.to_string()];
    let lab = labels_for(h, &classes, false);
    // A direction is a selection: fitted on the selection split where the prompts carry splits,
    // never on lexical controls (they only test).
    let items = &h.meta.items;
    let any_split = items.iter().any(|i| i.split.is_some());
    let idx: Vec<usize> = (0..lab.len())
        .filter(|&i| {
            lab[i].is_some()
                && !items[i].lexical_control
                && (!any_split || items[i].split == Some(crate::dataset::Split::Select))
        })
        .collect();
    let y: Vec<usize> = idx.iter().filter_map(|&i| lab[i]).collect();
    for (ci, c) in classes.iter().enumerate() {
        if !y.contains(&ci) {
            return Err(AnalysisError::Dataset(format!(
                "class '{c}' has no prompts in this harvest"
            )));
        }
    }
    let mut meta = DirectionMeta {
        model: h.meta.model.clone(),
        hooks: hooks.to_vec(),
        resid_index: hooks.iter().map(|s| resid_index_of(s)).collect(),
        position_rule: h.meta.position_rule.to_string(),
        dataset_source: h.meta.dataset_source.clone(),
        dataset_hash: h.meta.dataset_hash.clone(),
        novice_class: novice.into(),
        expert_class: expert.into(),
        diff_of_means_norm: vec![],
        diff_of_means_dprime: vec![],
        cosine_probe_vs_means: vec![],
        convention: CONVENTION.into(),
        l2,
        tool: format!("persona-lens {}", env!("CARGO_PKG_VERSION")),
    };
    let mut dm_all = Vec::new();
    let mut pr_all = Vec::new();
    for hook in hooks {
        let (xall, _, d) = h.matrix(hook)?;
        let x: Vec<f64> = idx
            .iter()
            .flat_map(|&i| xall[i * d..(i + 1) * d].iter().copied())
            .collect();
        let n = y.len();
        let mut means = [vec![0.0; d], vec![0.0; d]];
        let mut counts = [0usize; 2];
        for r in 0..n {
            counts[y[r]] += 1;
            means[y[r]]
                .iter_mut()
                .zip(&x[r * d..(r + 1) * d])
                .for_each(|(m, v)| *m += v);
        }
        for c in 0..2 {
            means[c].iter_mut().for_each(|m| *m /= counts[c] as f64);
        }
        let dm: Vec<f64> = means[1].iter().zip(&means[0]).map(|(e, v)| e - v).collect();
        let dm_norm = norm(&dm);
        let unit: Vec<f64> = dm.iter().map(|v| v / dm_norm.max(1e-30)).collect();
        // d' of the projections.
        let proj: Vec<f64> = (0..n)
            .map(|r| {
                x[r * d..(r + 1) * d]
                    .iter()
                    .zip(&unit)
                    .map(|(a, b)| a * b)
                    .sum()
            })
            .collect();
        let mut pm = [0.0; 2];
        for r in 0..n {
            pm[y[r]] += proj[r] / counts[y[r]] as f64;
        }
        let var: f64 =
            (0..n).map(|r| (proj[r] - pm[y[r]]).powi(2)).sum::<f64>() / (n as f64 - 2.0).max(1.0);
        let all: Vec<usize> = (0..n).collect();
        let lr = LogReg::fit(&x, d, &y, &all, 2, l2);
        let mut pd = lr.raw_direction();
        let pn = norm(&pd).max(1e-30);
        pd.iter_mut().for_each(|v| *v /= pn);
        // Sign: expert must project higher (it does by construction; checked, not assumed).
        let gap: f64 = (0..n)
            .map(|r| {
                let p: f64 = x[r * d..(r + 1) * d]
                    .iter()
                    .zip(&pd)
                    .map(|(a, b)| a * b)
                    .sum();
                if y[r] == 1 {
                    p / counts[1] as f64
                } else {
                    -p / counts[0] as f64
                }
            })
            .sum();
        if gap < 0.0 {
            pd.iter_mut().for_each(|v| *v = -*v);
        }
        meta.diff_of_means_norm.push(dm_norm);
        meta.diff_of_means_dprime
            .push((pm[1] - pm[0]) / var.sqrt().max(1e-30));
        meta.cosine_probe_vs_means
            .push(pd.iter().zip(&unit).map(|(a, b)| a * b).sum());
        dm_all.push(dm.iter().map(|&v| v as f32).collect());
        pr_all.push(pd.iter().map(|&v| v as f32).collect());
    }
    Ok(DirectionSet {
        meta,
        diff_of_means: dm_all,
        probe: pr_all,
    })
}

/// Which direction kind to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectionKind {
    #[serde(alias = "mean")]
    DiffOfMeans,
    Probe,
}

impl DirectionKind {
    /// `mean` is read as `diff_of_means` (an older spelling).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "diff_of_means" | "mean" => Ok(Self::DiffOfMeans),
            "probe" => Ok(Self::Probe),
            o => Err(AnalysisError::Invalid(format!(
                "unknown direction kind '{o}'; use diff_of_means or probe"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::DiffOfMeans => "diff_of_means",
            Self::Probe => "probe",
        }
    }
}

/// Where a direction is read or applied: the output of a block, or a residual row counted like
/// HF's `hidden_states` (row 0 = the embeddings, row L + 1 = block L's output). Two numberings of
/// one stream; a bare `usize` cannot say which it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerRef {
    /// Block L's output (`blocks.L.hook_resid_post`, residual row L + 1): llama.cpp's
    /// control-vector convention and `--layer L`'s default.
    BlockOutput(usize),
    /// Residual row R (`blocks.R.hook_resid_pre`; the last row is the last block's output): the
    /// index the probes report, `--layer L --align-probe-index`.
    ResidRow(usize),
}

impl LayerRef {
    /// The layer a command line names: `--layer L`, with or without `--align-probe-index`.
    pub fn from_flag(layer: usize, align_probe_index: bool) -> Self {
        if align_probe_index {
            LayerRef::ResidRow(layer)
        } else {
            LayerRef::BlockOutput(layer)
        }
    }

    /// The residual row (HF `hidden_states` index).
    pub fn row(self) -> usize {
        match self {
            LayerRef::BlockOutput(l) => l + 1,
            LayerRef::ResidRow(r) => r,
        }
    }

    /// The block whose output this is (None for row 0, the embeddings).
    pub fn block(self) -> Option<usize> {
        self.row().checked_sub(1)
    }

    /// The hook that holds this row in a model of `n_layers` blocks (the names of
    /// [`crate::resid_rows`]), or an error that gives the valid range.
    pub fn hook(self, n_layers: usize) -> Result<persona_lens_engine::HookName> {
        crate::resid_rows(n_layers)
            .get(self.row())
            .copied()
            .ok_or_else(|| {
                AnalysisError::Invalid(format!(
                    "{self} is out of range: the model has {n_layers} blocks (block outputs 0..={}, residual rows 0..={n_layers})",
                    n_layers.saturating_sub(1)
                ))
            })
    }
}

impl std::fmt::Display for LayerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerRef::BlockOutput(l) => write!(f, "the output of block {l}"),
            LayerRef::ResidRow(r) => write!(f, "residual row {r}"),
        }
    }
}

impl DirectionSet {
    pub fn save(&self, path: &Path) -> Result<()> {
        let d = self.diff_of_means.first().map(Vec::len).unwrap_or(0);
        let r = self.diff_of_means.len();
        let flat = |v: &[Vec<f32>]| -> Vec<f32> { v.iter().flatten().copied().collect() };
        let dev = Device::Cpu;
        let tensors = vec![
            (
                "diff_of_means".to_string(),
                Tensor::from_vec(flat(&self.diff_of_means), (r, d), &dev)?,
            ),
            (
                "probe".to_string(),
                Tensor::from_vec(flat(&self.probe), (r, d), &dev)?,
            ),
        ];
        let mut md = HashMap::new();
        md.insert(
            "persona_lens".to_string(),
            serde_json::to_string(&self.meta).unwrap_or_default(),
        );
        persona_lens_engine::io::save_safetensors(&tensors, md, path)?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            AnalysisError::Invalid(format!("cannot read directions {}: {e}", path.display()))
        })?;
        let bad = |why: String| {
            AnalysisError::Invalid(format!(
                "{} is not a persona-lens directions file ({why}); make one with `persona-lens direction`",
                path.display()
            ))
        };
        let (_, st_meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta_s = st_meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("persona_lens").cloned())
            .ok_or_else(|| bad("no persona_lens metadata".into()))?;
        let meta: DirectionMeta = serde_json::from_str(&meta_s).map_err(|e| bad(e.to_string()))?;
        let ts = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let get = |k: &str| -> Result<Vec<Vec<f32>>> {
            ts.get(k)
                .ok_or_else(|| bad(format!("no tensor '{k}'")))?
                .to_vec2::<f32>()
                .map_err(|e| bad(e.to_string()))
        };
        Ok(DirectionSet {
            diff_of_means: get("diff_of_means")?,
            probe: get("probe")?,
            meta,
        })
    }

    /// The direction at residual row `row`: (hook name, vector).
    pub fn at_row(&self, row: usize, kind: DirectionKind) -> Result<(String, Vec<f32>)> {
        let i = self
            .meta
            .resid_index
            .iter()
            .position(|r| *r == Some(row))
            .ok_or_else(|| {
                AnalysisError::Invalid(format!(
                    "no direction at residual row {row} (rows available: {:?})",
                    self.meta.resid_index.iter().flatten().collect::<Vec<_>>()
                ))
            })?;
        let v = match kind {
            DirectionKind::DiffOfMeans => self.diff_of_means[i].clone(),
            DirectionKind::Probe => self.probe[i].clone(),
        };
        Ok((self.meta.hooks[i].clone(), v))
    }
}

/// Checks a direction: width, finite, non-zero.
pub fn check_direction(v: &[f32], d_model: usize) -> Result<()> {
    if v.len() != d_model {
        return Err(AnalysisError::Invalid(format!(
            "direction has width {} but the model's residual stream has {d_model}; use a direction computed on this model",
            v.len()
        )));
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(AnalysisError::Invalid(
            "direction contains NaN or infinite values; recompute it with `persona-lens direction`"
                .into(),
        ));
    }
    if v.iter().all(|&x| x == 0.0) {
        return Err(AnalysisError::Invalid(
            "direction is all zeros: it cannot steer; recompute it with `persona-lens direction`"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::LayerRef;

    /// Block L's output is residual row L + 1 and, in a 4-block model, `blocks.{L+1}.hook_resid_pre`
    /// (the last block's is its `hook_resid_post`); rows past the last are errors that give the
    /// range, without naming a command-line flag.
    #[test]
    fn block_outputs_and_residual_rows_are_one_stream() {
        let n = 4;
        assert_eq!(LayerRef::from_flag(2, false), LayerRef::BlockOutput(2));
        assert_eq!(LayerRef::from_flag(2, true), LayerRef::ResidRow(2));
        assert_eq!(LayerRef::BlockOutput(2).row(), 3);
        assert_eq!(LayerRef::ResidRow(2).row(), 2);
        assert_eq!(LayerRef::ResidRow(0).block(), None);
        assert_eq!(LayerRef::ResidRow(3).block(), Some(2));
        let hook = |l: LayerRef| l.hook(n).unwrap().to_string();
        assert_eq!(hook(LayerRef::BlockOutput(1)), "blocks.2.hook_resid_pre");
        assert_eq!(hook(LayerRef::ResidRow(2)), "blocks.2.hook_resid_pre");
        assert_eq!(hook(LayerRef::BlockOutput(3)), "blocks.3.hook_resid_post");
        assert_eq!(hook(LayerRef::ResidRow(4)), "blocks.3.hook_resid_post");
        let e = LayerRef::BlockOutput(4).hook(n).unwrap_err().to_string();
        assert!(e.contains("the output of block 4 is out of range"), "{e}");
        assert!(
            e.contains("block outputs 0..=3, residual rows 0..=4"),
            "{e}"
        );
        assert!(!e.contains("--"), "{e}");
    }
}
