//! Where tensors come from: a GGUF file or (sharded) safetensors. Architectures ask for tensors by
//! name; this module dequantizes (default, f32), casts (`--dtype`) or keeps GGUF blocks
//! (`--quantized`) and wraps matrices as [`Linear`].

use crate::error::{EngineError, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Precision the weights are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Dense weights in this dtype (F32 is the default and what the golden set uses).
    Dense(DType),
    /// GGUF blocks kept as they are in memory.
    Quantized(QuantKernel),
}

/// How a quantized matrix is multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKernel {
    /// Blocks are dequantized chunk by chunk into f32 and multiplied with f32 activations:
    /// weight memory stays quantized, activations are as exact as the f32 model's.
    Exact,
    /// candle's quantized kernels (llama.cpp numerics: activations are quantized to 8 bits for
    /// the dot products). Fastest for token-by-token generation, slightly less exact.
    Native,
}

impl Precision {
    pub fn describe(&self) -> String {
        match self {
            Precision::Dense(d) => format!("{d:?}").to_lowercase(),
            Precision::Quantized(QuantKernel::Exact) => {
                "quantized (GGUF blocks, exact f32 activations)".into()
            }
            Precision::Quantized(QuantKernel::Native) => {
                "quantized (GGUF blocks, candle quantized kernels)".into()
            }
        }
    }
}

pub enum Source {
    Gguf {
        path: PathBuf,
        content: gguf_file::Content,
        file: Mutex<File>,
    },
    Safetensors {
        dir: PathBuf,
        st: candle_core::safetensors::MmapedSafetensors,
        /// Prefix found in front of `model.` (e.g. `language_model.` in Gemma3ForConditionalGeneration).
        prefix: String,
    },
}

pub struct Weights {
    pub source: Source,
    pub precision: Precision,
    pub device: Device,
    /// Bytes held by the weights loaded so far (reported by `inspect`).
    loaded_bytes: Mutex<usize>,
}

/// A quantized matrix `[rows, cols]` split into row chunks, so that it can be dequantized a
/// chunk at a time (bounded scratch memory) and so that rows can be read without a full copy.
pub struct QMatrix {
    pub chunks: Vec<(Arc<QTensor>, QMatMul)>,
    pub rows_per_chunk: usize,
    pub rows: usize,
    pub cols: usize,
    pub kernel: QuantKernel,
}

/// Elements dequantized at once (16 MiB of f32).
const CHUNK_ELEMS: usize = 4 << 20;

impl QMatrix {
    pub fn new(q: QTensor, kernel: QuantKernel) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        let dt = q.dtype();
        let row_bytes = cols / dt.block_size() * dt.type_size();
        let rows_per_chunk = (CHUNK_ELEMS / cols.max(1)).clamp(1, rows.max(1));
        let data = q.data()?;
        let dev = q.device();
        let mut chunks = Vec::new();
        let mut r0 = 0;
        while r0 < rows {
            let n = rows_per_chunk.min(rows - r0);
            let bytes = data[r0 * row_bytes..(r0 + n) * row_bytes].to_vec();
            let st = candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Owned(bytes),
                &dev,
                dt,
            )?;
            let qt = Arc::new(QTensor::new(st, (n, cols))?);
            let mm = QMatMul::from_arc(qt.clone())?;
            chunks.push((qt, mm));
            r0 += n;
        }
        Ok(QMatrix {
            chunks,
            rows_per_chunk,
            rows,
            cols,
            kernel,
        })
    }

    pub fn storage_bytes(&self) -> usize {
        self.chunks
            .iter()
            .map(|(q, _)| q.storage_size_in_bytes())
            .sum()
    }

    /// x: [n, cols] f32 -> [n, rows].
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(self.chunks.len());
        for (q, mm) in &self.chunks {
            outs.push(match self.kernel {
                QuantKernel::Exact => x.matmul(&q.dequantize(&q.device())?.t()?)?,
                QuantKernel::Native => mm.forward(x)?,
            });
        }
        Ok(if outs.len() == 1 {
            outs.pop().unwrap_or_else(|| unreachable!())
        } else {
            Tensor::cat(&outs, 1)?
        })
    }

    pub fn dequantize(&self) -> Result<Tensor> {
        let parts = self
            .chunks
            .iter()
            .map(|(q, _)| q.dequantize(&q.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Rows `ids` dequantized: [ids.len(), cols].
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            let id = id as usize;
            let (q, _) = &self.chunks[id / self.rows_per_chunk];
            let idx = Tensor::new(&[(id % self.rows_per_chunk) as u32], &q.device())?;
            out.push(q.embedding(&idx)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}

/// A matrix applied as `x @ W^T` (W stored `[out, in]` as in PyTorch).
#[derive(Clone)]
pub enum Linear {
    Dense(Tensor),
    Quantized(Arc<QMatrix>),
}

/// Output rows of a weight per parallel part of a few-row product with many outputs.
const VOCAB_PART_ROWS: usize = 16384;

impl Linear {
    /// x: [..., in] (f32) -> [..., out] (f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let last = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let x2 = x.reshape((rows, last))?;
        let y = match self {
            // Many outputs (the unembedding) and few rows (logits at the last position): gemm
            // runs such a product on one thread (its matrix-vector path), so the vocabulary is
            // split into parts computed in parallel. Each logit is the same dot product as in one
            // call, so the logits are bitwise the same (`unembedding_split_is_bitwise_exact`).
            Linear::Dense(w)
                if w.dtype() == x2.dtype() && rows <= 32 && w.dim(0)? >= 2 * VOCAB_PART_ROWS =>
            {
                use rayon::prelude::*;
                let n_out = w.dim(0)?;
                let parts = (0..n_out.div_ceil(VOCAB_PART_ROWS))
                    .into_par_iter()
                    .map(|i| {
                        let start = i * VOCAB_PART_ROWS;
                        let len = VOCAB_PART_ROWS.min(n_out - start);
                        x2.matmul(&w.narrow(0, start, len)?.t()?)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 1)?
            }
            Linear::Dense(w) => {
                if w.dtype() == x2.dtype() {
                    x2.matmul(&w.t()?)?
                } else {
                    x2.to_dtype(w.dtype())?
                        .matmul(&w.t()?)?
                        .to_dtype(x.dtype())?
                }
            }
            Linear::Quantized(q) => q.matmul(&x2.contiguous()?)?,
        };
        let out = y.dim(1)?;
        let mut od = dims[..dims.len() - 1].to_vec();
        od.push(out);
        Ok(y.reshape(od)?)
    }

    /// Rows `ids` of the weight as a dense tensor `[k, in]` (e.g. a few unembedding rows).
    pub fn dense_rows(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Linear::Dense(w) => w.index_select(ids, 0)?,
            Linear::Quantized(q) => q.dequantize()?.index_select(ids, 0)?,
        })
    }

    /// The weight as a dense f32 tensor `[out, in]` (dequantizing if needed: only for hooks that
    /// need per-head weights, such as `attn.hook_result`).
    pub fn dense_f32(&self) -> Result<Tensor> {
        Ok(match self {
            Linear::Dense(w) => w.to_dtype(DType::F32)?,
            Linear::Quantized(q) => q.dequantize()?,
        })
    }

    pub fn out_dim(&self) -> usize {
        match self {
            Linear::Dense(w) => w.dims()[0],
            Linear::Quantized(q) => q.rows,
        }
    }
}

/// Embedding table, dense or quantized (quantized rows are dequantized per lookup).
#[derive(Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QMatrix>),
}

impl Embedding {
    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(match self {
            Embedding::Dense(w) => {
                let flat = ids.flatten_all()?;
                w.index_select(&flat, 0)?
                    .to_dtype(DType::F32)?
                    .reshape((b, t, w.dim(1)?))?
            }
            Embedding::Quantized(q) => q
                .rows(&ids.flatten_all()?.to_vec1::<u32>()?)?
                .reshape((b, t, q.cols))?,
        })
    }
    /// The same table used as the unembedding (tied weights): shared, not copied.
    pub fn as_linear(&self) -> Result<Linear> {
        Ok(match self {
            Embedding::Dense(w) => Linear::Dense(w.clone()),
            Embedding::Quantized(q) => Linear::Quantized(q.clone()),
        })
    }
    pub fn vocab_size(&self) -> Result<usize> {
        Ok(match self {
            Embedding::Dense(w) => w.dim(0)?,
            Embedding::Quantized(q) => q.rows,
        })
    }
}

fn gguf_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::BadGguf {
        path: path.to_path_buf(),
        reason: e
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// Reads the header and metadata of a GGUF file (no tensor data).
pub fn read_gguf_header(path: &Path) -> Result<(gguf_file::Content, File)> {
    if !path.exists() {
        return Err(EngineError::MissingFile(path.to_path_buf()));
    }
    let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| gguf_err(path, crate::error::candle_message(&e)))?;
    // A truncated file can have a complete header: check that every tensor's data fits.
    let len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
    for (name, info) in content.tensor_infos.iter() {
        let bytes =
            info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let end = content.tensor_data_offset + info.offset + bytes as u64;
        if end > len {
            return Err(gguf_err(
                path,
                format!("tensor '{name}' ends at byte {end} but the file has only {len} bytes"),
            ));
        }
    }
    Ok((content, file))
}

impl Weights {
    pub fn from_gguf(
        path: &Path,
        content: gguf_file::Content,
        file: File,
        precision: Precision,
        device: &Device,
    ) -> Self {
        Weights {
            source: Source::Gguf {
                path: path.to_path_buf(),
                content,
                file: Mutex::new(file),
            },
            precision,
            device: device.clone(),
            loaded_bytes: Mutex::new(0),
        }
    }

    /// Memory-maps `model.safetensors` or every shard listed in `model.safetensors.index.json`.
    pub fn from_safetensors_dir(dir: &Path, precision: Precision, device: &Device) -> Result<Self> {
        if matches!(precision, Precision::Quantized(_)) {
            return Err(EngineError::InvalidArgument(
                "quantized weights need a GGUF file; for a safetensors checkpoint use a dense dtype (bf16 or f16)"
                    .into(),
            ));
        }
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| EngineError::MissingField {
                    file: index.display().to_string(),
                    field: "weight_map".into(),
                })?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|s| s.as_str().map(String::from))
                .collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| EngineError::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            v.sort();
            v
        };
        if files.is_empty() {
            return Err(EngineError::MissingFile(dir.join("model.safetensors")));
        }
        for f in &files {
            if !f.exists() {
                return Err(EngineError::Safetensors(format!(
                    "shard {} listed in the index is missing (re-download the checkpoint)",
                    f.display()
                )));
            }
        }
        // SAFETY: the files are memory-mapped read-only; we never write to them while mapped.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| EngineError::Safetensors(format!("{}: {e}", dir.display())))?;
        let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        let prefix = ["", "language_model.", "model.language_model."]
            .iter()
            .find(|p| {
                names.iter().any(|n| {
                    n.starts_with(&format!("{p}model.embed_tokens"))
                        || (p.starts_with("model.") && n.starts_with(&format!("{p}embed_tokens")))
                })
            })
            .map(|s| s.to_string())
            .unwrap_or_default();
        Ok(Weights {
            source: Source::Safetensors {
                dir: dir.to_path_buf(),
                st,
                prefix,
            },
            precision,
            device: device.clone(),
            loaded_bytes: Mutex::new(0),
        })
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self.source, Source::Gguf { .. })
    }

    pub fn loaded_bytes(&self) -> usize {
        *self.loaded_bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, t: &Tensor) {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        *self.loaded_bytes.lock().unwrap_or_else(|p| p.into_inner()) += bytes;
    }

    fn st_name(prefix: &str, hf: &str) -> String {
        if prefix == "model.language_model." {
            // transformers >= 4.52 layout: model.language_model.layers.* / lm_head.*
            match hf.strip_prefix("model.") {
                Some(rest) => format!("{prefix}{rest}"),
                None => hf.to_string(),
            }
        } else {
            format!("{prefix}{hf}")
        }
    }

    pub fn has(&self, hf_name: &str, gguf_name: &str) -> bool {
        match &self.source {
            Source::Gguf { content, .. } => content.tensor_infos.contains_key(gguf_name),
            Source::Safetensors { st, prefix, .. } => {
                st.get(&Self::st_name(prefix, hf_name)).is_ok()
            }
        }
    }

    fn qtensor(&self, gguf_name: &str) -> Result<QTensor> {
        match &self.source {
            Source::Gguf {
                path,
                content,
                file,
            } => {
                if !content.tensor_infos.contains_key(gguf_name) {
                    return Err(EngineError::MissingWeight(gguf_name.into()));
                }
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                content
                    .tensor(&mut *f, gguf_name, &self.device)
                    .map_err(|e| gguf_err(path, crate::error::candle_message(&e)))
            }
            Source::Safetensors { .. } => {
                Err(EngineError::InvalidArgument("not a GGUF source".into()))
            }
        }
    }

    /// A tensor as f32, dequantized (norm weights, biases, and everything in the default mode).
    pub fn f32(&self, hf_name: &str, gguf_name: &str) -> Result<Tensor> {
        let t = match &self.source {
            Source::Gguf { .. } => self.qtensor(gguf_name)?.dequantize(&self.device)?,
            Source::Safetensors { st, prefix, .. } => {
                let name = Self::st_name(prefix, hf_name);
                let t = st
                    .load(&name, &self.device)
                    .map_err(|_| EngineError::MissingWeight(name.clone()))?;
                match t.dtype() {
                    DType::F32 | DType::F16 | DType::BF16 => t.to_dtype(DType::F32)?,
                    other => {
                        return Err(EngineError::Safetensors(format!(
                            "tensor '{name}' has dtype {other:?}; supported: f32, f16, bf16"
                        )))
                    }
                }
            }
        };
        Ok(t)
    }

    /// A safetensors tensor already stored in the working dtype (e.g. a bf16 checkpoint loaded
    /// with `--dtype bf16`): copied once out of the memory map, with no f32 round trip, so a 4B
    /// bf16 model loads without a transient full-size f32 copy of each matrix.
    fn native_dense(&self, hf_name: &str) -> Result<Option<Tensor>> {
        let (Source::Safetensors { st, prefix, .. }, Precision::Dense(dt)) =
            (&self.source, self.precision)
        else {
            return Ok(None);
        };
        let name = Self::st_name(prefix, hf_name);
        match st.get(&name) {
            // Compared by name: candle and this crate may link different safetensors versions.
            Ok(view) if dt != DType::F32 && format!("{:?}", view.dtype()) == format!("{dt:?}") => {
                let t = st
                    .load(&name, &self.device)
                    .map_err(|_| EngineError::MissingWeight(name.clone()))?;
                self.count(&t);
                Ok(Some(t))
            }
            _ => Ok(None),
        }
    }

    /// A weight held in the working precision (dense dtype), after `transform` on the f32 value.
    fn dense(&self, t: Tensor) -> Result<Tensor> {
        let t = match self.precision {
            Precision::Dense(dt) if dt != DType::F32 => t.to_dtype(dt)?,
            _ => t,
        };
        self.count(&t);
        Ok(t)
    }

    /// A projection matrix `[out, in]`. `row_perm`, if given, reorders output rows (llama.cpp's q/k
    /// rotary permutation undone); for quantized weights rows are moved block-wise, losslessly.
    pub fn linear(
        &self,
        hf_name: &str,
        gguf_name: &str,
        row_perm: Option<&[usize]>,
    ) -> Result<Linear> {
        if let (Precision::Quantized(kernel), true) = (self.precision, self.is_gguf()) {
            let q = self.qtensor(gguf_name)?;
            let q = match row_perm {
                Some(p) => permute_qtensor_rows(&q, p)?,
                None => q,
            };
            let m = QMatrix::new(q, kernel)?;
            *self.loaded_bytes.lock().unwrap_or_else(|p| p.into_inner()) += m.storage_bytes();
            return Ok(Linear::Quantized(Arc::new(m)));
        }
        if row_perm.is_none() {
            if let Some(t) = self.native_dense(hf_name)? {
                return Ok(Linear::Dense(t));
            }
        }
        let mut t = self.f32(hf_name, gguf_name)?;
        if let Some(p) = row_perm {
            let idx = Tensor::from_vec(
                p.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                p.len(),
                &self.device,
            )?;
            t = t.index_select(&idx, 0)?;
        }
        Ok(Linear::Dense(self.dense(t)?))
    }

    /// A fused projection (`qkv_proj`, `gate_up_proj`) split along its output rows into parts of
    /// `sizes` rows each; quantized blocks are split as byte ranges, without requantizing.
    pub fn linear_split(
        &self,
        hf_name: &str,
        gguf_name: &str,
        sizes: &[usize],
    ) -> Result<Vec<Linear>> {
        let total: usize = sizes.iter().sum();
        let ranges = sizes.iter().scan(0, |start, &n| {
            let r = *start..*start + n;
            *start += n;
            Some(r)
        });
        if let (Precision::Quantized(kernel), true) = (self.precision, self.is_gguf()) {
            let q = self.qtensor(gguf_name)?;
            check_rows(gguf_name, q.shape().dims2()?.0, total)?;
            return ranges
                .map(|r| {
                    let rows: Vec<usize> = r.collect();
                    let m = QMatrix::new(select_qtensor_rows(&q, &rows)?, kernel)?;
                    *self.loaded_bytes.lock().unwrap_or_else(|p| p.into_inner()) +=
                        m.storage_bytes();
                    Ok(Linear::Quantized(Arc::new(m)))
                })
                .collect();
        }
        let t = match self.native_dense(hf_name)? {
            Some(t) => t,
            None => self.f32(hf_name, gguf_name)?,
        };
        check_rows(hf_name, t.dim(0)?, total)?;
        ranges
            .map(|r| {
                let part = t.narrow(0, r.start, r.len())?.contiguous()?;
                Ok(Linear::Dense(self.dense(part)?))
            })
            .collect()
    }

    /// A dense matrix `[out, in]` the architecture built itself (split or transposed), held in
    /// the working dtype.
    pub fn dense_linear(&self, t: Tensor) -> Result<Linear> {
        Ok(Linear::Dense(self.dense(t)?))
    }

    /// The token embedding table `[vocab, d_model]`.
    pub fn embedding(&self, hf_name: &str, gguf_name: &str) -> Result<Embedding> {
        if let (Precision::Quantized(kernel), true) = (self.precision, self.is_gguf()) {
            let m = QMatrix::new(self.qtensor(gguf_name)?, kernel)?;
            *self.loaded_bytes.lock().unwrap_or_else(|p| p.into_inner()) += m.storage_bytes();
            return Ok(Embedding::Quantized(Arc::new(m)));
        }
        if let Some(t) = self.native_dense(hf_name)? {
            return Ok(Embedding::Dense(t));
        }
        let t = self.f32(hf_name, gguf_name)?;
        Ok(Embedding::Dense(self.dense(t)?))
    }

    /// A small f32 vector (norm weights), counted in the memory total.
    pub fn vector(&self, hf_name: &str, gguf_name: &str) -> Result<Tensor> {
        let t = self.f32(hf_name, gguf_name)?;
        self.count(&t);
        Ok(t)
    }

    /// The unembedding: `lm_head.weight` / `output.weight` when the checkpoint has its own
    /// (GGUF: present; HF: present and `tie_word_embeddings` false), else the embedding table,
    /// shared. Returns it and whether it is tied.
    pub fn unembedding(
        &self,
        embed: &Embedding,
        tie_word_embeddings: bool,
    ) -> Result<(Linear, bool)> {
        let untied = if self.is_gguf() {
            self.has("", "output.weight")
        } else {
            !tie_word_embeddings && self.has("lm_head.weight", "")
        };
        Ok(if untied {
            (self.linear("lm_head.weight", "output.weight", None)?, false)
        } else {
            (embed.as_linear()?, true)
        })
    }

    /// GGUF quantization types by count (for `inspect`).
    pub fn quant_types(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        match &self.source {
            Source::Gguf { content, .. } => {
                for info in content.tensor_infos.values() {
                    *m.entry(format!("{:?}", info.ggml_dtype)).or_insert(0) += 1;
                }
            }
            Source::Safetensors { st, .. } => {
                for (_, v) in st.tensors() {
                    *m.entry(format!("{:?}", v.dtype())).or_insert(0) += 1;
                }
            }
        }
        m
    }

    pub fn location(&self) -> PathBuf {
        match &self.source {
            Source::Gguf { path, .. } => path.clone(),
            Source::Safetensors { dir, .. } => dir.clone(),
        }
    }
}

fn check_rows(name: &str, rows: usize, want: usize) -> Result<()> {
    if rows != want {
        return Err(EngineError::InvalidArgument(format!(
            "fused tensor '{name}' has {rows} rows; the config's heads and sizes need {want}"
        )));
    }
    Ok(())
}

/// Reorders the rows of a quantized matrix. Blocks run along the input dimension, so a row is a
/// whole number of blocks and rows can move as byte ranges without requantizing.
fn permute_qtensor_rows(q: &QTensor, perm: &[usize]) -> Result<QTensor> {
    let (rows, _) = q.shape().dims2()?;
    if perm.len() != rows {
        return Err(EngineError::InvalidArgument(format!(
            "row permutation of length {} for a matrix with {rows} rows",
            perm.len()
        )));
    }
    select_qtensor_rows(q, perm)
}

/// The rows `rows` of a quantized matrix, in that order, as a new quantized matrix.
fn select_qtensor_rows(q: &QTensor, perm: &[usize]) -> Result<QTensor> {
    let (_, cols) = q.shape().dims2()?;
    let dt: GgmlDType = q.dtype();
    let row_bytes = cols / dt.block_size() * dt.type_size();
    let data = q.data()?;
    let mut out = vec![0u8; perm.len() * row_bytes];
    for (dst, &src) in perm.iter().enumerate() {
        out[dst * row_bytes..(dst + 1) * row_bytes]
            .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage =
        candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(out), &q.device(), dt)?;
    Ok(QTensor::new(storage, (perm.len(), cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The vocabulary split of a few-row product against one plain gemm call over the whole
    /// weight: bitwise equal for the last-position row (batch 1) and for 16 rows (batch 16).
    #[test]
    fn unembedding_split_is_bitwise_exact() -> Result<()> {
        let dev = Device::Cpu;
        let n_out = 2 * VOCAB_PART_ROWS + 1234; // a ragged last part
        let w = Tensor::randn(0f32, 1.0, (n_out, 640), &dev)?;
        let head = Linear::Dense(w.clone());
        for rows in [1usize, 16] {
            let x = Tensor::randn(0f32, 1.0, (rows, 640), &dev)?;
            let split = head.forward(&x)?;
            let whole = x.matmul(&w.t()?)?;
            assert_eq!(split.dims(), &[rows, n_out]);
            let diff = (split - whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(
                diff, 0.0,
                "{rows} rows: split differs from one call by {diff}"
            );
        }
        Ok(())
    }
}
