//! Resolving `--model` (GGUF file, HF directory, known short name, hub id) and loading a model:
//! config, weights, tokenizer, architecture.

use crate::config::{Architecture, GgufMeta, ModelConfig};
use crate::decoder::Decoder;
use crate::error::{EngineError, Result};
use crate::hooks::Hooks;
use crate::layers::{KvCache, LogitsAt};
use crate::tokenizer::Tokenizer;
use crate::weights::{read_gguf_header, Precision, Weights};
use crate::{arch, Batch};
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The default model of the study.
pub const DEFAULT_MODEL: &str = "gemma-3-270m";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

/// Where models are looked up by short name: `--models-dir`, else `$PERSONA_LENS_MODELS`, else `./models`.
pub fn models_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os("PERSONA_LENS_MODELS") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("models"),
    }
}

/// Turns a `--model` argument into a file or directory to load.
pub fn resolve(spec: &str, models_dir: &Path) -> Result<ModelSource> {
    let p = Path::new(spec);
    if p.is_file() {
        // A weights file of a HF checkpoint stands for its directory.
        if p.extension()
            .is_some_and(|x| x == "safetensors" || x == "json")
        {
            if let Some(dir) = p.parent().filter(|d| d.join("config.json").exists()) {
                return Ok(ModelSource::HfDir(dir.to_path_buf()));
            }
        }
        return Ok(ModelSource::Gguf(p.to_path_buf()));
    }
    if p.is_dir() {
        if p.join("config.json").exists() {
            return Ok(ModelSource::HfDir(p.to_path_buf()));
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| EngineError::io(p, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.extension().is_some_and(|x| x == "gguf"))
            .collect();
        return match ggufs.as_slice() {
            [one] => Ok(ModelSource::Gguf(one.clone())),
            [] => Err(EngineError::MissingFile(p.join("config.json"))),
            _ => Err(EngineError::InvalidArgument(format!(
                "{} holds several .gguf files; pass one of them",
                p.display()
            ))),
        };
    }
    if let Some(entry) = crate::registry::lookup(spec) {
        if let Some(file) = &entry.file {
            let f = models_dir.join(file);
            if f.is_file() {
                return Ok(ModelSource::Gguf(f));
            }
        }
        return match (&entry.hub, &entry.file) {
            // Fetched by `make models`, and the hub copy is not cached either.
            (Some(hub), Some(_)) => resolve_hub(hub).map_err(|_| EngineError::UnknownShortName {
                name: spec.into(),
                dir: models_dir.to_path_buf(),
            }),
            (Some(hub), None) => resolve_hub(hub),
            (None, _) => Err(EngineError::UnknownShortName {
                name: spec.into(),
                dir: models_dir.to_path_buf(),
            }),
        };
    }
    if spec.ends_with(".gguf") || spec.starts_with('.') || spec.starts_with('/') {
        return Err(EngineError::MissingFile(p.to_path_buf()));
    }
    let parts: Vec<&str> = spec.split('/').collect();
    if parts.len() == 2 && parts.iter().all(|s| !s.is_empty()) {
        return resolve_hub(spec);
    }
    Err(EngineError::UnresolvableModel(
        spec.into(),
        crate::registry::names(),
    ))
}

/// A hub id from the local Hugging Face cache (`$HF_HOME/hub`, or `$HF_HUB_CACHE`), downloading
/// with hf-hub only when it is not cached and `HF_HUB_OFFLINE` is not set.
fn hub_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => hf_hub::Cache::new(PathBuf::from(p)),
        None => hf_hub::Cache::from_env(),
    }
}

/// The snapshot directory of a hub id in the local Hugging Face cache, if it is there (no
/// network).
pub fn hub_cached(id: &str) -> Option<PathBuf> {
    let cfg = hub_cache().model(id.to_string()).get("config.json")?;
    cfg.parent().map(Path::to_path_buf)
}

fn resolve_hub(id: &str) -> Result<ModelSource> {
    let cache = hub_cache();
    if let Some(dir) = hub_cached(id) {
        return Ok(ModelSource::HfDir(dir));
    }
    let cache_path = cache.path().display().to_string();
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    if offline {
        return Err(EngineError::HubUnavailable {
            id: id.into(),
            cache: cache_path,
            reason: "HF_HUB_OFFLINE is set".into(),
        });
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(false)
        .build()
        .map_err(|e| EngineError::HubUnavailable {
            id: id.into(),
            cache: cache_path.clone(),
            reason: e.to_string(),
        })?;
    let r = api.model(id.to_string());
    let fail = |e: hf_hub::api::sync::ApiError| {
        EngineError::HubUnavailable {
        id: id.into(),
        cache: cache_path.clone(),
        reason: format!("{e} (download it where the hub is reachable, e.g. `huggingface-cli download {id}`, and copy the cache)"),
    }
    };
    let cfg = r.get("config.json").map_err(fail)?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let _ = r.get(f);
    }
    match r.get("model.safetensors.index.json") {
        Ok(idx) => {
            let v: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&idx).map_err(|e| EngineError::io(&idx, e))?,
            )?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                r.get(&s).map_err(fail)?;
            }
        }
        Err(_) => {
            r.get("model.safetensors").map_err(fail)?;
        }
    }
    Ok(ModelSource::HfDir(
        cfg.parent().map(Path::to_path_buf).unwrap_or_default(),
    ))
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub precision: Precision,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            precision: Precision::Dense(candle_core::DType::F32),
            device: Device::Cpu,
        }
    }
}

/// Facts about a loaded model, for `inspect` and provenance.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub name: String,
    pub path: String,
    pub format: String,
    pub precision: String,
    pub weight_bytes: usize,
    pub tensor_types: BTreeMap<String, usize>,
    pub general_name: Option<String>,
}

pub struct Model {
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    if !path.exists() {
        return Err(EngineError::MissingFile(path.to_path_buf()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::BadField {
        file: path.display().to_string(),
        field: "(json)".into(),
        reason: e.to_string(),
    })
}

impl Model {
    /// Loads `spec` (see [`resolve`]).
    pub fn load(spec: &str, models_dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let src = resolve(spec, models_dir)?;
        let mut m = Self::load_source(&src, opts)?;
        m.info.name = spec.to_string();
        Ok(m)
    }

    pub fn load_source(src: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        match src {
            ModelSource::Gguf(path) => Self::load_gguf(path, opts),
            ModelSource::HfDir(dir) => Self::load_hf_dir(dir, opts),
        }
    }

    pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Self> {
        crate::runtime::tune_cpu_pools();
        let (content, file) = read_gguf_header(path)?;
        let meta = GgufMeta {
            md: &content.metadata,
            file: path.display().to_string(),
        };
        let arch_name = meta.string("general.architecture")?;
        let cfg = match arch_name.as_str() {
            "gemma2" => arch::gemma2::config_from_gguf(&meta)?,
            "gemma3" => arch::gemma3::config_from_gguf(&meta)?,
            "llama" => arch::llama::config_from_gguf(&meta)?,
            "gpt2" => arch::gpt2::config_from_gguf(&meta)?,
            "qwen2" => arch::qwen2::config_from_gguf(&meta)?,
            "qwen3" => arch::qwen3::config_from_gguf(&meta)?,
            "phi3" => arch::phi3::config_from_gguf(&meta)?,
            "olmo2" => arch::olmo2::config_from_gguf(&meta)?,
            other => return Err(EngineError::UnsupportedArchitecture(other.into())),
        };
        let tokenizer = if meta.has("tokenizer.ggml.model") {
            Tokenizer::from_gguf(&meta)?
        } else {
            // Files written without a vocabulary (test conversions): token ids only.
            let vocab = content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| EngineError::MissingWeight("token_embd.weight".into()))?;
            Tokenizer::ids_only(vocab)?
        };
        let general_name = meta.string("general.name").ok();
        let weights = Weights::from_gguf(path, content, file, opts.precision, &opts.device);
        Self::build(cfg, weights, tokenizer, "gguf", general_name)
    }

    pub fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        crate::runtime::tune_cpu_pools();
        let cfg_path = dir.join("config.json");
        let v = read_json(&cfg_path)?;
        let file = cfg_path.display().to_string();
        let archs: Vec<String> = v
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
        let cfg = match (archs.first().map(String::as_str), model_type) {
            (Some("Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration"), _)
            | (None, "gemma3" | "gemma3_text") => arch::gemma3::config_from_hf(&v, &file)?,
            (Some("Gemma2ForCausalLM"), _) | (None, "gemma2") => {
                arch::gemma2::config_from_hf(&v, &file)?
            }
            (Some("LlamaForCausalLM"), _) | (None, "llama") => {
                arch::llama::config_from_hf(&v, &file)?
            }
            (Some("GPT2LMHeadModel" | "GPT2Model"), _) | (None, "gpt2") => {
                arch::gpt2::config_from_hf(&v, &file)?
            }
            (Some("Qwen2ForCausalLM"), _) | (None, "qwen2") => {
                arch::qwen2::config_from_hf(&v, &file)?
            }
            (Some("Qwen3ForCausalLM"), _) | (None, "qwen3") => {
                arch::qwen3::config_from_hf(&v, &file)?
            }
            (Some("MistralForCausalLM"), _) | (None, "mistral") => {
                arch::mistral::config_from_hf(&v, &file)?
            }
            (Some("Phi3ForCausalLM"), _) | (None, "phi3") => arch::phi3::config_from_hf(&v, &file)?,
            (Some("Olmo2ForCausalLM"), _) | (None, "olmo2") => {
                arch::olmo2::config_from_hf(&v, &file)?
            }
            (Some(a), _) => return Err(EngineError::UnsupportedArchitecture(a.into())),
            (None, "") => {
                return Err(EngineError::MissingField {
                    file,
                    field: "architectures".into(),
                })
            }
            (None, t) => return Err(EngineError::UnsupportedArchitecture(t.into())),
        };
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Tokenizer::from_hf_dir(dir, Some(&v))?
        } else {
            // Tiny test checkpoints ship no tokenizer: ids only.
            Tokenizer::ids_only(cfg.vocab_size)?
        };
        let weights = Weights::from_safetensors_dir(dir, opts.precision, &opts.device)?;
        Self::build(cfg, weights, tokenizer, "safetensors", None)
    }

    fn build(
        cfg: ModelConfig,
        weights: Weights,
        tokenizer: Tokenizer,
        format: &str,
        general_name: Option<String>,
    ) -> Result<Self> {
        if cfg.n_layers == 0 {
            return Err(EngineError::InvalidArgument(
                "the model's config has 0 layers (num_hidden_layers / block_count): nothing to run"
                    .into(),
            ));
        }
        let decoder = match cfg.arch {
            Architecture::Gemma2 => arch::gemma2::load(cfg, &weights)?,
            Architecture::Gemma3 => arch::gemma3::load(cfg, &weights)?,
            Architecture::Llama => arch::llama::load(cfg, &weights)?,
            Architecture::Gpt2 => arch::gpt2::load(cfg, &weights)?,
            Architecture::Qwen2 => arch::qwen2::load(cfg, &weights)?,
            Architecture::Qwen3 => arch::qwen3::load(cfg, &weights)?,
            Architecture::Mistral => arch::mistral::load(cfg, &weights)?,
            Architecture::Phi3 => arch::phi3::load(cfg, &weights)?,
            Architecture::Olmo2 => arch::olmo2::load(cfg, &weights)?,
        };
        let info = ModelInfo {
            name: String::new(),
            path: weights.location().display().to_string(),
            format: format.into(),
            precision: weights.precision.describe(),
            weight_bytes: weights.loaded_bytes(),
            tensor_types: weights.quant_types().into_iter().collect(),
            general_name,
        };
        Ok(Model {
            decoder,
            tokenizer,
            info,
        })
    }

    /// [`crate::resolve_hooks`] for this model: `hook_pos_embed` exists only where positions are
    /// learned (GPT-2); a glob silently skips it elsewhere, an explicit request is an error.
    pub fn resolve_hooks(&self, pattern: &str) -> Result<Vec<crate::HookName>> {
        let mut names = crate::resolve_hooks(pattern, self.config().n_layers)?;
        if self.decoder.pos_embed.is_none() {
            let pe = crate::HookName::global(crate::HookPoint::PosEmbed);
            let explicit = pattern.split(',').any(|p| p.trim() == "hook_pos_embed");
            if explicit {
                return Err(EngineError::InvalidArgument(format!(
                    "hook_pos_embed exists only for models with learned positions (GPT-2); {} uses rotary positions",
                    self.config().arch.name()
                )));
            }
            names.retain(|n| *n != pe);
        } else {
            // Learned positions: no rotary, so no hook_rot_q / hook_rot_k.
            let rot = |p: crate::HookPoint| {
                matches!(p, crate::HookPoint::AttnRotQ | crate::HookPoint::AttnRotK)
            };
            let explicit = names
                .iter()
                .any(|n| rot(n.point) && pattern.split(',').any(|p| p.trim() == n.to_string()));
            if explicit {
                return Err(EngineError::InvalidArgument(format!(
                    "attn.hook_rot_q / attn.hook_rot_k exist only for models with rotary positions; {} uses learned positions (attn.hook_q / attn.hook_k are its queries and keys)",
                    self.config().arch.name()
                )));
            }
            names.retain(|n| !rot(n.point));
        }
        Ok(names)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.decoder.cfg
    }

    pub fn device(&self) -> &Device {
        &self.decoder.device
    }

    /// One forward call (see [`Decoder::forward`]).
    pub fn forward(
        &self,
        batch: &Batch,
        kv: Option<&mut KvCache>,
        hooks: &mut Hooks,
        logits: LogitsAt,
    ) -> Result<Option<Tensor>> {
        self.decoder
            .forward(&batch.ids, &batch.pad, kv, hooks, logits)
    }

    /// Adds an intervention to every later forward of this model, until [`Model::reset_hooks`]
    /// (TransformerLens's permanent hooks): analyses that build their own hooks run on the
    /// edited model unchanged. Every thread using this model sees them: edit a private copy.
    pub fn add_hook(&self, hook: crate::HookName, op: crate::Op, sel: crate::Selector) {
        self.decoder.standing.add(hook, op, sel);
    }

    /// Removes every intervention added by [`Model::add_hook`].
    pub fn reset_hooks(&self) {
        self.decoder.standing.clear();
    }

    /// Stops work on this model from another thread: from now on every forward (whole, KV-cached
    /// step, or patching's block-by-block run) fails with [`EngineError::Interrupted`] at its
    /// next block, until `interrupt(false)`. What a front end does on Ctrl-C.
    pub fn interrupt(&self, on: bool) {
        self.decoder.standing.set_interrupted(on);
    }

    /// Token ids of a prompt: raw text with BOS per the model's metadata, or (chat) the chat
    /// template rendered as one user turn with the generation prompt, tokenized without adding
    /// BOS (the template writes its own special tokens).
    pub fn encode_prompt(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        if text.trim().is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let ids = if chat {
            let rendered = self
                .tokenizer
                .apply_chat_template(&[crate::tokenizer::ChatMessage::user(text)], true)?;
            self.tokenizer.encode(&rendered, false)?
        } else {
            self.tokenizer.encode(text, true)?
        };
        if ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        Ok(ids)
    }

    /// [`Model::encode_prompt`] plus, for each byte span `[start, end)` of `text`, the token
    /// positions `[first, last + 1)` that overlap it (None if no token does). Positions count
    /// from the first id (BOS included), as everywhere in persona-lens.
    pub fn encode_prompt_spans(
        &self,
        text: &str,
        chat: bool,
        spans: &[(usize, usize)],
    ) -> Result<(Vec<u32>, Vec<Option<crate::tokenizer::Span>>)> {
        if text.trim().is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let (rendered, base) = if chat {
            let r = self
                .tokenizer
                .apply_chat_template(&[crate::tokenizer::ChatMessage::user(text)], true)?;
            let base = r.find(text).ok_or_else(|| {
                EngineError::InvalidArgument(
                    "the chat template changed the prompt text; cannot locate spans".into(),
                )
            })?;
            (r, base)
        } else {
            (text.to_string(), 0)
        };
        let (ids, offs) = self.tokenizer.encode_with_offsets(&rendered, !chat)?;
        if ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let out = spans
            .iter()
            .map(|&(s, e)| {
                let (s, e) = (s + base, e + base);
                let hit: Vec<usize> = offs
                    .iter()
                    .enumerate()
                    .filter(|(_, &(a, b))| b > a && a < e && b > s)
                    .map(|(i, _)| i)
                    .collect();
                Some((*hit.first()?, *hit.last()? + 1))
            })
            .collect();
        Ok((ids, out))
    }

    /// Whether prompts should get the chat template by default: the model has one and its
    /// name marks it as instruction-tuned (`-it`, `instruct`, `chat`). Base models such as
    /// gemma-3-270m ship a template in their GGUF but were not trained on it.
    pub fn is_chat_model(&self) -> bool {
        if self.tokenizer.chat_template.is_none() {
            return false;
        }
        if let Some(e) = crate::registry::lookup(&self.info.name) {
            return e.chat;
        }
        let names = format!(
            "{} {} {}",
            self.info.name,
            self.info.path,
            self.info.general_name.clone().unwrap_or_default()
        )
        .to_lowercase();
        ["instruct", "-it", "_it", " it", "chat"]
            .iter()
            .any(|k| names.contains(k))
    }

    /// A padding id for batches (its value never matters: padding is masked).
    pub fn pad_id(&self) -> u32 {
        self.tokenizer
            .pad_id
            .or(self.tokenizer.eos_ids.first().copied())
            .unwrap_or(0)
    }
}

impl Tokenizer {
    /// A tokenizer-less model (tiny test checkpoints): every id decodes as `<id N>`.
    pub fn ids_only(vocab: usize) -> Result<Self> {
        let vocab_json: serde_json::Map<String, serde_json::Value> = (0..vocab)
            .map(|i| (format!("<id {i}>"), serde_json::json!(i)))
            .collect();
        let j = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab_json, "unk_token": "<id 0>"}});
        let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&j)?)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(Tokenizer {
            inner,
            bos_id: None,
            add_bos: false,
            eos_ids: vec![],
            pad_id: Some(0),
            chat_template: None,
            bos_token: None,
            eos_token: None,
            kind: "ids-only".into(),
        })
    }
}
