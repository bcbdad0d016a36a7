//! Paired activations on disk: shards of `acts` `(rows, n_models, d)` f32 safetensors plus a
//! `paired.json` manifest. Training streams shards one at a time, so a store can be larger than
//! memory. Models of different widths are zero-padded to the larger width (`dims` records each
//! model's real width; the padded coordinates are always 0 and trainers keep their weights 0).
//! The on-disk types of a store harvested in parts (`ShardSpec`, `PartManifest`, `Sharding`) are
//! here too, with the format they extend; joining parts is `shards`.

use crate::{invalid, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub const MANIFEST: &str = "paired.json";

/// How rows of the two models are paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Alignment {
    /// One row per token: both models saw the same token ids.
    Tokens,
    /// One row per sample, at each model's last token (tokenizers or templates differ).
    Last,
}

/// One corpus sample's rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SampleInfo {
    pub id: String,
    /// `persona` / `corpus` / `self_sampled` / `verification`, or a dataset class.
    pub source: String,
    pub text: String,
    /// First row of this sample in the store, and how many rows it has.
    pub first_row: usize,
    pub n_rows: usize,
    /// The tokens of the rows (model 0's tokenizer), for max-activating examples.
    pub tokens: Vec<String>,
    /// The models (0 = base, 1 = chat) whose row was read from stored activations of the same
    /// model file, rendering and position (a probe harvest) instead of a forward
    /// ([`crate::harvest::PairedHarvestSpec::stored`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stored_rows: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub rows: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairedMeta {
    /// Model names, index 0 = base, 1 = chat.
    pub models: Vec<String>,
    pub model_paths: Vec<String>,
    pub hooks: Vec<String>,
    /// Whether each model's prompt went through its chat template.
    pub chat_template: Vec<bool>,
    /// Whether both models read the chat model's token ids (`PairedHarvestSpec::shared_ids`);
    /// None in stores written before it was recorded and in stores harvested with an
    /// intervention (a planted feature): an analysis then never reuses their rows in place of
    /// plain forwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_ids: Option<bool>,
    pub alignment: Alignment,
    /// Each model's real width; rows are padded to the max.
    pub dims: Vec<usize>,
    pub d: usize,
    pub rows: usize,
    pub shards: Vec<ShardInfo>,
    pub samples: Vec<SampleInfo>,
    pub corpus: String,
    pub tool: String,
    /// Set when the store was harvested in parts (`diff harvest --shard I/N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharding: Option<Sharding>,
}

/// Writes rows into shards of `shard_rows`, then the manifest (atomically, last).
pub struct PairedWriter {
    dir: PathBuf,
    /// Row files go under this folder of `dir` ("" = `dir` itself; a part's own folder).
    sub: String,
    shard_rows: usize,
    pending: Vec<Tensor>,
    pending_rows: usize,
    pub meta: PairedMeta,
}

impl PairedWriter {
    pub fn new(dir: &Path, shard_rows: usize, meta: PairedMeta) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            crate::DiffError::Invalid(format!("cannot create {}: {e}", dir.display()))
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            sub: String::new(),
            shard_rows: shard_rows.max(1),
            pending: Vec::new(),
            pending_rows: 0,
            meta,
        })
    }

    /// A writer of part `shard`: row files under the part's own folder.
    pub fn part(dir: &Path, shard_rows: usize, meta: PairedMeta, shard: ShardSpec) -> Result<Self> {
        let sub = shard.name();
        std::fs::create_dir_all(dir.join(&sub)).map_err(|e| {
            crate::DiffError::Invalid(format!("cannot create {}: {e}", dir.join(&sub).display()))
        })?;
        let mut w = Self::new(dir, shard_rows, meta)?;
        w.sub = format!("{sub}/");
        Ok(w)
    }

    /// Appends `(rows, n_models, d)` rows.
    pub fn push(&mut self, rows: Tensor) -> Result<()> {
        let (r, n, d) = rows.dims3()?;
        if n != self.meta.models.len() || d != self.meta.d {
            return invalid(format!(
                "paired rows have shape ({r}, {n}, {d}) but the store holds (rows, {}, {})",
                self.meta.models.len(),
                self.meta.d
            ));
        }
        self.pending.push(rows);
        self.pending_rows += r;
        self.meta.rows += r;
        while self.pending_rows >= self.shard_rows {
            self.flush(self.shard_rows)?;
        }
        Ok(())
    }

    fn flush(&mut self, take: usize) -> Result<()> {
        if take == 0 {
            return Ok(());
        }
        let all = Tensor::cat(&self.pending, 0)?;
        let shard = all.narrow(0, 0, take)?;
        let rest = all.dim(0)? - take;
        self.pending = if rest > 0 {
            vec![all.narrow(0, take, rest)?]
        } else {
            vec![]
        };
        self.pending_rows = rest;
        let file = format!(
            "{}shard_{:05}.safetensors",
            self.sub,
            self.meta.shards.len()
        );
        persona_lens_engine::io::save_safetensors(
            &[("acts".to_string(), shard.contiguous()?)],
            HashMap::new(),
            &self.dir.join(&file),
        )?;
        self.meta.shards.push(ShardInfo { file, rows: take });
        Ok(())
    }

    pub fn finish(mut self) -> Result<PairedMeta> {
        let rest = self.pending_rows;
        self.flush(rest)?;
        let bytes = serde_json::to_vec_pretty(&self.meta)
            .map_err(|e| crate::DiffError::Invalid(e.to_string()))?;
        persona_lens_engine::io::write_atomic(&self.dir.join(MANIFEST), &bytes)?;
        Ok(self.meta)
    }

    /// Ends part `shard` (samples `samples` of a corpus with hash `corpus_sha256`): flushes its
    /// rows, hashes its files and writes `part-IIIII-of-NNNNN.json` atomically, last.
    pub fn finish_part(
        mut self,
        shard: ShardSpec,
        samples: std::ops::Range<usize>,
        corpus_sha256: String,
        corpus_samples: usize,
    ) -> Result<PartManifest> {
        let rest = self.pending_rows;
        self.flush(rest)?;
        let files = self
            .meta
            .shards
            .iter()
            .map(|s| -> Result<PartFile> {
                Ok(PartFile {
                    file: s.file.clone(),
                    rows: s.rows,
                    sha256: file_sha256(&self.dir.join(&s.file))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let m = PartManifest {
            part: PartInfo {
                index: shard.index,
                count: shard.count,
                first_sample: samples.start,
                n_samples: samples.len(),
                rows: self.meta.rows,
                files,
            },
            meta: self.meta,
            corpus_sha256,
            corpus_samples,
        };
        let bytes =
            serde_json::to_vec_pretty(&m).map_err(|e| crate::DiffError::Invalid(e.to_string()))?;
        persona_lens_engine::io::write_atomic(
            &self.dir.join(format!("{}.json", shard.name())),
            &bytes,
        )?;
        Ok(m)
    }
}

/// A paired-activation store on disk.
#[derive(Debug, Clone)]
pub struct PairedStore {
    pub dir: PathBuf,
    pub meta: PairedMeta,
}

impl PairedStore {
    pub fn open(dir: &Path) -> Result<Self> {
        let p = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&p).map_err(|e| crate::DiffError::NoStore {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let meta: PairedMeta = serde_json::from_str(&text)
            .map_err(|e| crate::DiffError::Invalid(format!("{}: {e}", p.display())))?;
        if meta.rows == 0 || meta.shards.is_empty() {
            return invalid(format!("{}: the store has no rows", dir.display()));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
        })
    }

    pub fn n_models(&self) -> usize {
        self.meta.models.len()
    }

    /// Shard `i` as `(rows, n_models, d)`.
    pub fn shard(&self, i: usize) -> Result<Tensor> {
        let p = self.dir.join(&self.meta.shards[i].file);
        let mut t = candle_core::safetensors::load(&p, &Device::Cpu).map_err(|e| {
            crate::DiffError::Invalid(format!(
                "cannot read shard {}: {} (re-run `persona-lens diff harvest`)",
                p.display(),
                e.to_string().lines().next().unwrap_or("")
            ))
        })?;
        t.remove("acts").ok_or_else(|| {
            crate::DiffError::Invalid(format!("{} has no 'acts' tensor", p.display()))
        })
    }

    /// Every row, `(rows, n_models, d)` (for analyses of stores that fit in memory).
    pub fn all(&self) -> Result<Tensor> {
        let v: Vec<Tensor> = (0..self.meta.shards.len())
            .map(|i| self.shard(i))
            .collect::<Result<_>>()?;
        Ok(Tensor::cat(&v, 0)?)
    }

    /// Rows at the store indices `idx`, in that order, `(idx.len(), n_models, d)`; each shard
    /// is read once.
    pub fn rows_at(&self, idx: &[usize]) -> Result<Tensor> {
        if let Some(&bad) = idx.iter().find(|&&i| i >= self.meta.rows) {
            return invalid(format!(
                "row {bad} is outside the store ({} rows)",
                self.meta.rows
            ));
        }
        let mut picked: Vec<Option<Tensor>> = vec![None; idx.len()];
        let mut base = 0;
        for (si, s) in self.meta.shards.iter().enumerate() {
            let (lo, hi) = (base, base + s.rows);
            base = hi;
            let here: Vec<usize> = (0..idx.len())
                .filter(|&k| (lo..hi).contains(&idx[k]))
                .collect();
            if here.is_empty() {
                continue;
            }
            let shard = self.shard(si)?;
            for k in here {
                picked[k] = Some(shard.narrow(0, idx[k] - lo, 1)?);
            }
        }
        let rows: Vec<Tensor> = picked.into_iter().flatten().collect();
        if rows.len() != idx.len() {
            return invalid(format!(
                "{}: its shards hold fewer rows than its manifest's {}",
                self.dir.display(),
                self.meta.rows
            ));
        }
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Rows `[start, start + n)`.
    pub fn rows(&self, start: usize, n: usize) -> Result<Tensor> {
        let mut out = Vec::new();
        let mut base = 0;
        for (i, s) in self.meta.shards.iter().enumerate() {
            let (lo, hi) = (base, base + s.rows);
            base = hi;
            let a = start.max(lo);
            let b = (start + n).min(hi);
            if a < b {
                out.push(self.shard(i)?.narrow(0, a - lo, b - a)?);
            }
        }
        if out.is_empty() {
            return invalid(format!("rows {start}..{} are outside the store", start + n));
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}

// ---------------- parts of a store harvested in parts (see `shards`) ----------------

/// Part `index` of `count` (0-based), written `I/N` on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    pub index: usize,
    pub count: usize,
}

impl FromStr for ShardSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("'{s}' is not a shard; write I/N with 0 <= I < N, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl std::fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl ShardSpec {
    /// `part-IIIII-of-NNNNN`: the folder of the part's row files and the stem of its JSON.
    pub fn name(&self) -> String {
        format!("part-{:05}-of-{:05}", self.index, self.count)
    }

    /// The samples this part holds, on harvest-batch boundaries (see the module docs).
    pub fn sample_range(&self, n_samples: usize, batch_size: usize) -> Range<usize> {
        let bs = batch_size.max(1);
        let batches = n_samples.div_ceil(bs);
        let lo = self.index * batches / self.count * bs;
        let hi = ((self.index + 1) * batches / self.count * bs).min(n_samples);
        lo.min(n_samples)..hi
    }
}

/// One row file of a part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartFile {
    /// Relative to the store folder.
    pub file: String,
    pub rows: usize,
    pub sha256: String,
}

/// What one finished part holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    pub index: usize,
    pub count: usize,
    /// Samples `[first_sample, first_sample + n_samples)` of the corpus.
    pub first_sample: usize,
    pub n_samples: usize,
    pub rows: usize,
    pub files: Vec<PartFile>,
}

/// How a store was harvested in parts (`paired.json`'s `sharding`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sharding {
    pub count: usize,
    /// Of the whole corpus's ids, sources and texts: parts of different corpora never join.
    pub corpus_sha256: String,
    pub corpus_samples: usize,
    /// The finished parts, in part order.
    pub parts: Vec<PartInfo>,
    /// Parts not finished yet: the store is partial until this is empty.
    pub missing: Vec<usize>,
}

/// `part-IIIII-of-NNNNN.json`: a finished part (its rows and samples numbered from 0).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartManifest {
    pub meta: PairedMeta,
    pub part: PartInfo,
    pub corpus_sha256: String,
    pub corpus_samples: usize,
}

pub fn file_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path)
        .map_err(|e| crate::DiffError::Invalid(format!("cannot read {}: {e}", path.display())))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
