//! One loader for every supported dictionary layout; the layout is detected from the files.
//!
//! | layout | files |
//! |---|---|
//! | dictionary_learning (Hub mixin) | `config.json` + `model.safetensors` |
//! | dictionary_learning checkpoint | `*.pt` state dict (`encoder.weight` (n, d, F), ...) |
//! | open-source replication | `cfg.json` + `cc_weights.pt` (`W_enc` (n, d, F), `W_dec` (F, n, d)) |
//! | SAELens | `cfg.json` + `sae_weights.safetensors` |
//! | Gemma Scope | `params.npz` or `params.safetensors` |

use crate::crosscoder::{CrossCoder, Layout};
use crate::sae::Sae;
use crate::{invalid, Result};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub enum Dictionary {
    CrossCoder(Box<CrossCoder>),
    Sae(Box<Sae>),
}

impl Dictionary {
    pub fn describe(&self) -> String {
        match self {
            Dictionary::CrossCoder(c) => format!(
                "{} ({:?} layout): {} models x d={} -> F={}, code normalisation {}, sparsity {:?}, normaliser {}",
                c.dict_class(),
                c.layout,
                c.n_models(),
                c.activation_dim(),
                c.dict_size(),
                c.code_norm.name(),
                c.sparsity,
                if c.normaliser.is_some() { "yes" } else { "no" }
            ),
            Dictionary::Sae(s) => format!(
                "SAE ({}): d={} -> F={}, activation {:?}, hook {}",
                s.format,
                s.d(),
                s.dict_size(),
                s.activation,
                s.hook_name.as_deref().unwrap_or("?")
            ),
        }
    }
}

fn read_err(p: &Path, e: impl std::fmt::Display) -> crate::DiffError {
    // candle errors carry a backtrace after the first line: keep the message one line.
    let e = e.to_string();
    let first = e.lines().next().unwrap_or("").trim();
    crate::DiffError::Invalid(format!(
        "cannot read {}: {first} (the file is corrupt or not in a supported layout: dictionary_learning crosscoders, persona-lens crosscoders, SAEs)",
        p.display()
    ))
}

/// Reads a `torch.save`d state dict of plain tensors. Unlike `candle_core::pickle::read_all`,
/// this supports strided views (dictionary_learning's decoder weight is saved transposed) and
/// int32 buffers (BatchTopK's `k`), which candle skips.
fn read_pt(p: &Path) -> Result<HashMap<String, Tensor>> {
    use candle_core::pickle::{Object, Stack};
    use candle_core::DType;
    use std::io::Read;
    let file = std::fs::File::open(p).map_err(|e| read_err(p, e))?;
    let mut zip =
        zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| read_err(p, e))?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| read_err(p, "no data.pkl in the archive"))?;
    let dir = pkl.trim_end_matches("data.pkl").to_string();
    let obj = {
        let entry = zip.by_name(&pkl).map_err(|e| read_err(p, e))?;
        let mut reader = std::io::BufReader::new(entry);
        let mut stack = Stack::empty();
        stack.read_loop(&mut reader).map_err(|e| read_err(p, e))?;
        stack.finalize().map_err(|e| read_err(p, e))?
    };
    let entries = match obj {
        Object::Dict(kv) => kv,
        Object::Build { args, .. } => match *args {
            Object::Dict(kv) => kv,
            _ => return Err(read_err(p, "the pickle is not a state dict")),
        },
        _ => return Err(read_err(p, "the pickle is not a state dict")),
    };
    let as_usize = |o: &Object| -> Option<usize> {
        match o {
            Object::Int(i) => Some(*i as usize),
            Object::Long(i) => Some(*i as usize),
            _ => None,
        }
    };
    let as_usizes = |o: &Object| -> Option<Vec<usize>> {
        match o {
            Object::Tuple(v) | Object::List(v) => v.iter().map(as_usize).collect(),
            _ => None,
        }
    };
    let mut out = HashMap::new();
    for (k, v) in entries {
        let Object::Unicode(name) = k else { continue };
        let bad = |what: &str| read_err(p, format!("tensor '{name}': {what}"));
        let Object::Reduce { args, .. } = v else {
            continue; // non-tensor entries (e.g. _metadata)
        };
        let Object::Tuple(args) = *args else {
            return Err(bad("unexpected rebuild arguments"));
        };
        if args.len() < 4 {
            return Err(bad("unexpected rebuild arguments"));
        }
        let Object::PersistentLoad(pl) = &args[0] else {
            return Err(bad("no storage"));
        };
        let Object::Tuple(pl) = pl.as_ref() else {
            return Err(bad("no storage"));
        };
        let (dtype, key) = match (pl.get(1), pl.get(2)) {
            (Some(Object::Class { class_name, .. }), Some(Object::Unicode(key))) => {
                let dt = match class_name.as_str() {
                    "FloatStorage" => DType::F32,
                    "DoubleStorage" => DType::F64,
                    "HalfStorage" => DType::F16,
                    "BFloat16Storage" => DType::BF16,
                    "LongStorage" => DType::I64,
                    "IntStorage" => DType::I32,
                    "ByteStorage" | "BoolStorage" => DType::U8,
                    o => return Err(bad(&format!("unsupported storage {o}"))),
                };
                (dt, key.clone())
            }
            _ => return Err(bad("no storage")),
        };
        let offset = as_usize(&args[1]).ok_or_else(|| bad("bad offset"))?;
        let dims = as_usizes(&args[2]).ok_or_else(|| bad("bad size"))?;
        let strides = as_usizes(&args[3]).ok_or_else(|| bad("bad stride"))?;
        let mut bytes = Vec::new();
        zip.by_name(&format!("{dir}data/{key}"))
            .map_err(|e| read_err(p, e))?
            .read_to_end(&mut bytes)
            .map_err(|e| read_err(p, e))?;
        let size = dtype.size_in_bytes();
        let n_storage = bytes.len() / size;
        let storage = Tensor::from_raw_buffer(
            &bytes[..n_storage * size],
            dtype,
            &[n_storage],
            &Device::Cpu,
        )
        .map_err(|e| read_err(p, e))?;
        let numel: usize = dims.iter().product();
        // Element offsets of the view, in row-major order of its shape.
        let mut idx = Vec::with_capacity(numel);
        let mut pos = vec![0usize; dims.len()];
        for _ in 0..numel {
            let o: usize = offset + pos.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>();
            if o >= n_storage {
                return Err(bad("reads past its storage"));
            }
            idx.push(o as u32);
            for a in (0..dims.len()).rev() {
                pos[a] += 1;
                if pos[a] < dims[a] {
                    break;
                }
                pos[a] = 0;
            }
        }
        // index_select has no i32 kernel: gather int32 as f64 (exact) and cast back.
        let src = if dtype == DType::I32 {
            storage.to_dtype(DType::F64)?
        } else {
            storage
        };
        let idx = Tensor::from_vec(idx, numel, &Device::Cpu)?;
        let mut t = src.index_select(&idx, 0)?.reshape(dims)?;
        if dtype == DType::I32 {
            t = t.to_dtype(DType::I64)?;
        }
        out.insert(name, t);
    }
    Ok(out)
}

fn read_tensors(p: &Path) -> Result<(HashMap<String, Tensor>, BTreeMap<String, String>)> {
    let ext = p
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "safetensors" => {
            let bytes = std::fs::read(p).map_err(|e| read_err(p, e))?;
            let (_, md) =
                safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| read_err(p, e))?;
            let meta: BTreeMap<String, String> = md
                .metadata()
                .clone()
                .map(|m| m.into_iter().collect())
                .unwrap_or_default();
            let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
                .map_err(|e| read_err(p, e))?;
            Ok((t, meta))
        }
        "pt" | "pth" | "bin" => Ok((read_pt(p)?, BTreeMap::new())),
        "npz" => {
            let v = Tensor::read_npz(p).map_err(|e| read_err(p, e))?;
            Ok((v.into_iter().collect(), BTreeMap::new()))
        }
        _ => invalid(format!(
            "unknown dictionary format: {} (give a folder, or a .safetensors, .pt or .npz weights file)",
            p.display()
        )),
    }
}

fn read_json(p: &Path) -> Result<Option<serde_json::Value>> {
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(p).map_err(|e| read_err(p, e))?;
    let v = serde_json::from_str(&text).map_err(|e| read_err(p, e))?;
    Ok(Some(v))
}

/// Loads a crosscoder or SAE from a folder or a weights file of any supported layout.
pub fn load_dictionary(path: &Path) -> Result<Dictionary> {
    if !path.exists() {
        return invalid(format!(
            "{} does not exist (give a crosscoder/SAE folder or weights file)",
            path.display()
        ));
    }
    if path.is_dir() {
        let candidates = [
            "model.safetensors",
            "cc_weights.pt",
            "sae_weights.safetensors",
            "params.safetensors",
            "params.npz",
            "model_final.pt",
        ];
        for c in candidates {
            let p = path.join(c);
            if p.exists() {
                return load_file(&p);
            }
        }
        let pts: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| read_err(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "pt"))
            .collect();
        if pts.len() == 1 {
            return load_file(&pts[0]);
        }
        return invalid(format!(
            "{}: no dictionary found (expected one of {} or a single .pt checkpoint)",
            path.display(),
            candidates.join(", ")
        ));
    }
    load_file(path)
}

fn load_file(p: &Path) -> Result<Dictionary> {
    let (sd, meta) = read_tensors(p)?;
    let dir = p.parent().unwrap_or(Path::new("."));
    let src = p.display().to_string();
    let is_pt = p
        .extension()
        .is_some_and(|e| e != "safetensors" && e != "npz");
    if sd.contains_key("encoder.weight") || sd.contains_key("_orig_mod.encoder.weight") {
        // Python reads config.json only for the Hub layout, not for `.pt` checkpoints.
        let (cfg, layout) = if is_pt {
            (None, Layout::DictionaryLearningPt)
        } else {
            (
                read_json(&dir.join("config.json"))?,
                Layout::DictionaryLearning,
            )
        };
        let cc = CrossCoder::from_state_dict(sd, cfg.as_ref(), layout, meta, &src)?;
        return Ok(Dictionary::CrossCoder(Box::new(cc)));
    }
    if let Some(w) = sd.get("W_enc") {
        if w.rank() == 3 {
            return Ok(Dictionary::CrossCoder(Box::new(
                CrossCoder::from_replication(sd, &src)?,
            )));
        }
        let cfg = read_json(&dir.join("cfg.json"))?;
        let format = if cfg.is_some() {
            "saelens"
        } else {
            "gemma_scope"
        };
        return Ok(Dictionary::Sae(Box::new(Sae::from_tensors(
            sd,
            cfg.as_ref(),
            format,
            &src,
        )?)));
    }
    let mut keys: Vec<&String> = sd.keys().collect();
    keys.sort();
    invalid(format!(
        "{src}: unknown dictionary format (tensors: {}); expected dictionary_learning keys (encoder.weight, ...) or W_enc/W_dec",
        keys.iter().take(8).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    ))
}
