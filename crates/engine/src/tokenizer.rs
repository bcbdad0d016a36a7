//! Tokenizers from GGUF metadata (SentencePiece-style BPE with byte fallback, as Gemma; GPT-2
//! style byte-level BPE, as SmolLM2) or from `tokenizer.json`, plus the model's own Jinja chat
//! template rendered with minijinja.
//!
//! The GGUF conversion reproduces what transformers' GGUF loader builds (its `tokenizer.json` is
//! kept in the golden set): the same vocabulary, merges in the same order, the same normalizer,
//! pre-tokenizer and decoder, control tokens as special added tokens.

use crate::config::GgufMeta;
use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A byte or token range `[start, end)`.
pub type Span = (usize, usize);

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    /// Whether `encode(.., add_special_tokens = true)` prepends BOS.
    pub add_bos: bool,
    pub eos_ids: Vec<u32>,
    pub pad_id: Option<u32>,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// "gguf:llama" / "gguf:gpt2" / "tokenizer.json"
    pub kind: String,
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

fn gguf_strings(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<Vec<String>> {
    let v = md.get(key).ok_or_else(|| EngineError::MissingField {
        file: "GGUF".into(),
        field: key.into(),
    })?;
    v.to_vec()
        .map_err(tok_err)?
        .iter()
        .map(|x| x.to_string().cloned().map_err(tok_err))
        .collect()
}

fn gguf_numbers(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<Option<Vec<f64>>> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let arr = v.to_vec().map_err(tok_err)?;
    Ok(Some(
        arr.iter()
            .map(|x| match x {
                gguf_file::Value::F32(f) => *f as f64,
                gguf_file::Value::I32(i) => *i as f64,
                gguf_file::Value::U32(i) => *i as f64,
                gguf_file::Value::I8(i) => *i as f64,
                gguf_file::Value::U8(i) => *i as f64,
                other => other.to_i64().map(|i| i as f64).unwrap_or(0.0),
            })
            .collect(),
    ))
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

/// SentencePiece BPE merges the way transformers derives them from a vocabulary: for every token
/// in id order, every split into two vocabulary pieces, longer left piece first.
fn spm_merges(tokens: &[String], vocab: &HashMap<&str, usize>) -> Vec<(String, String)> {
    let mut merges = Vec::new();
    for tok in tokens {
        let bounds: Vec<usize> = tok.char_indices().map(|(i, _)| i).skip(1).collect();
        for &k in bounds.iter().rev() {
            let (l, r) = tok.split_at(k);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merges.push((l.to_string(), r.to_string()));
            }
        }
    }
    merges
}

impl Tokenizer {
    pub fn from_gguf(m: &GgufMeta) -> Result<Self> {
        let md = m.md;
        let model = m.string("tokenizer.ggml.model")?;
        let mut tokens = gguf_strings(md, "tokenizer.ggml.tokens")?;
        let types: Vec<i64> = gguf_numbers(md, "tokenizer.ggml.token_type")?
            .unwrap_or_default()
            .into_iter()
            .map(|x| x as i64)
            .collect();
        let ttype = |i: usize| types.get(i).copied().unwrap_or(1);
        let id_opt = |k: &str| m.usize(k).ok().map(|x| x as u32);
        let bos_id = id_opt("tokenizer.ggml.bos_token_id");
        let eos_id = id_opt("tokenizer.ggml.eos_token_id");
        let pad_id = id_opt("tokenizer.ggml.padding_token_id");
        let unk_id = id_opt("tokenizer.ggml.unknown_token_id");
        let add_bos = m.bool_or("tokenizer.ggml.add_bos_token", model == "llama")?;
        let add_space_prefix = m.bool_or("tokenizer.ggml.add_space_prefix", false)?;

        let mut added = Vec::new();
        let tok_json = match model.as_str() {
            "llama" => {
                // SentencePiece pieces use U+2581 for spaces; user-defined whitespace tokens are
                // stored with real spaces and are mapped the same way.
                for t in tokens.iter_mut() {
                    if t.contains(' ') {
                        *t = t.replace(' ', "\u{2581}");
                    }
                }
                let vocab: HashMap<&str, usize> = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.as_str(), i))
                    .collect();
                let merges = spm_merges(&tokens, &vocab);
                let orig = gguf_strings(md, "tokenizer.ggml.tokens")?;
                for (i, t) in tokens.iter().enumerate() {
                    match ttype(i) {
                        TOKEN_TYPE_CONTROL => added.push(added_token(i, t, true)),
                        TOKEN_TYPE_USER_DEFINED if !orig[i].contains(' ') => {
                            added.push(added_token(i, t, false))
                        }
                        _ => {}
                    }
                }
                let vocab_json: serde_json::Map<String, Value> = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.clone(), json!(i)))
                    .collect();
                let merges_json: Vec<Value> =
                    merges.into_iter().map(|(a, b)| json!([a, b])).collect();
                let unk = unk_id.and_then(|i| tokens.get(i as usize).cloned());
                let normalizer = if add_space_prefix {
                    json!({"type": "Sequence", "normalizers": [
                        {"type": "Prepend", "prepend": "\u{2581}"},
                        {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]})
                } else {
                    json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})
                };
                let mut decoders = vec![
                    json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if add_space_prefix {
                    decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                json!({
                    "version": "1.0", "truncation": null, "padding": null,
                    "added_tokens": added,
                    "normalizer": normalizer,
                    "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
                    "post_processor": null,
                    "decoder": {"type": "Sequence", "decoders": decoders},
                    "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                              "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                              "ignore_merges": false, "vocab": vocab_json, "merges": merges_json}
                })
            }
            "gpt2" => {
                let merges = gguf_strings(md, "tokenizer.ggml.merges")?;
                for (i, t) in tokens.iter().enumerate() {
                    match ttype(i) {
                        TOKEN_TYPE_CONTROL => added.push(added_token(i, t, true)),
                        TOKEN_TYPE_USER_DEFINED => added.push(added_token(i, t, false)),
                        _ => {}
                    }
                }
                let vocab_json: serde_json::Map<String, Value> = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.clone(), json!(i)))
                    .collect();
                let merges_json: Vec<Value> = merges
                    .iter()
                    .map(|s| {
                        let (a, b) = s.split_once(' ').unwrap_or((s.as_str(), ""));
                        json!([a, b])
                    })
                    .collect();
                let pre = m.string("tokenizer.ggml.pre").unwrap_or_default();
                let pre_tokenizer = match pre.as_str() {
                    "llama-bpe" | "llama3" | "falcon3" => {
                        json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
                         "behavior": "Isolated", "invert": false},
                        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
                    }
                    _ => {
                        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
                    }
                };
                json!({
                    "version": "1.0", "truncation": null, "padding": null,
                    "added_tokens": added,
                    "normalizer": null,
                    "pre_tokenizer": pre_tokenizer,
                    "post_processor": null,
                    "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                    "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                              "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                              "ignore_merges": false, "vocab": vocab_json, "merges": merges_json}
                })
            }
            other => {
                return Err(EngineError::Tokenizer(format!(
                    "GGUF tokenizer model '{other}' is not supported (supported: llama, gpt2)"
                )))
            }
        };
        let inner =
            tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&tok_json)?).map_err(tok_err)?;
        let name_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        Ok(Tokenizer {
            bos_token: name_of(bos_id),
            eos_token: name_of(eos_id),
            inner,
            bos_id,
            add_bos,
            eos_ids: eos_id.into_iter().collect(),
            pad_id,
            chat_template: m.string("tokenizer.chat_template").ok(),
            kind: format!("gguf:{model}"),
        })
    }

    /// `tokenizer.json` (+ optional `tokenizer_config.json`, `chat_template.jinja`) in `dir`.
    pub fn from_hf_dir(dir: &Path, config: Option<&serde_json::Value>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::MissingFile(path));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc: Value = if tc_path.exists() {
            serde_json::from_str(
                &std::fs::read_to_string(&tc_path).map_err(|e| EngineError::io(&tc_path, e))?,
            )?
        } else {
            json!({})
        };
        let tok_str = |k: &str| -> Option<String> {
            match tc.get(k) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Object(o)) => {
                    o.get("content").and_then(|c| c.as_str()).map(String::from)
                }
                _ => None,
            }
        };
        let bos_token = tok_str("bos_token");
        let eos_token = tok_str("eos_token");
        let bos_id = bos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| {
                config
                    .and_then(|c| c.get("bos_token_id"))
                    .and_then(|x| x.as_u64())
                    .map(|x| x as u32)
            });
        let mut eos_ids: Vec<u32> = eos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .into_iter()
            .collect();
        if let Some(c) = config {
            match c.get("eos_token_id") {
                Some(Value::Number(n)) => eos_ids.extend(n.as_u64().map(|x| x as u32)),
                Some(Value::Array(a)) => {
                    eos_ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                }
                _ => {}
            }
        }
        eos_ids.sort();
        eos_ids.dedup();
        let pad_id = tok_str("pad_token").and_then(|t| inner.token_to_id(&t));
        // BOS insertion is whatever tokenizer.json's post-processor does.
        let add_bos = match bos_id {
            Some(b) => inner
                .encode("a", true)
                .map(|e| e.get_ids().first() == Some(&b))
                .unwrap_or(false),
            None => false,
        };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|x| x.as_str()).map(String::from)),
            _ => None,
        }
        .or_else(|| std::fs::read_to_string(&jinja).ok());
        Ok(Tokenizer {
            inner,
            bos_id,
            add_bos,
            eos_ids,
            pad_id,
            chat_template,
            bos_token,
            eos_token,
            kind: "tokenizer.json".into(),
        })
    }

    /// Token ids of `text`. Special tokens written in the text are parsed as their ids either way;
    /// `add_special_tokens` only controls BOS insertion (HF semantics).
    /// Refuses text for a model without a vocabulary, where every word would silently become
    /// id 0.
    fn require_vocabulary(&self) -> Result<()> {
        if self.kind == "ids-only" {
            return Err(EngineError::NoVocabulary);
        }
        Ok(())
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.require_vocabulary()?;
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.add_bos && self.inner.get_post_processor().is_none() {
            if let Some(b) = self.bos_id {
                ids.insert(0, b);
            }
        } else if add_special_tokens && self.inner.get_post_processor().is_some() {
            ids = self
                .inner
                .encode(text, true)
                .map_err(tok_err)?
                .get_ids()
                .to_vec();
        }
        Ok(ids)
    }

    /// Like [`Tokenizer::encode`], plus each token's byte range in `text` (`(0, 0)` for an
    /// inserted BOS): what maps a character span (a persona phrase) to token positions.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<Span>)> {
        self.require_vocabulary()?;
        let with_pp = add_special_tokens && self.inner.get_post_processor().is_some();
        let enc = self.inner.encode(text, with_pp).map_err(tok_err)?;
        let mut ids = enc.get_ids().to_vec();
        let mut offs = enc.get_offsets().to_vec();
        if add_special_tokens && self.add_bos && !with_pp {
            if let Some(b) = self.bos_id {
                ids.insert(0, b);
                offs.insert(0, (0, 0));
            }
        }
        Ok((ids, offs))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(tok_err)
    }

    pub fn id_to_token(&self, id: u32) -> String {
        self.inner
            .id_to_token(id)
            .unwrap_or_else(|| format!("<id {id}>"))
    }

    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders the model's chat template for `messages` (`[{role, content}]`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self.chat_template.as_deref().ok_or_else(|| {
            EngineError::ChatTemplate(
                "this model has no chat template (a base model?): give the plain prompt without the chat template".into(),
            )
        })?;
        render_chat_template(
            tpl,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }
}

pub fn render_chat_template(
    tpl: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
    let t = env
        .template_from_str(tpl)
        .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
    t.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos.unwrap_or(""),
        eos_token => eos.unwrap_or(""),
    })
    .map_err(|e| EngineError::ChatTemplate(e.to_string()))
}

/// Pre-tokenized input: a JSON file holding a list of token-id lists (`[[2, 651, 6037], ...]`),
/// for checkpoints without a tokenizer and for ids made elsewhere. Ids are used as given (no BOS
/// added); each list must be non-empty. Ids beyond the vocabulary are refused by the forward pass.
pub fn read_token_ids(path: &std::path::Path) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    let bad = |why: String| {
        EngineError::InvalidArgument(format!(
            "{}: {why} (expected a JSON list of token-id lists, e.g. [[2, 651, 6037], [2, 818]])",
            path.display()
        ))
    };
    let rows: Vec<Vec<u32>> = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if rows.is_empty() {
        return Err(bad("no sequences".into()));
    }
    if let Some(i) = rows.iter().position(Vec::is_empty) {
        return Err(bad(format!("sequence {i} is empty")));
    }
    Ok(rows)
}
