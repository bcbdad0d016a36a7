//! One error type for the engine. Every variant renders as one line that names the problem and,
//! where there is one, what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file not found: {0} (check the path, or run `make models` to fetch the known models)")]
    MissingFile(PathBuf),
    #[error("model '{name}' is not in {dir} (run `scripts/fetch-models.sh {dir}` or `make models`, or give the folder it is in as models_dir)")]
    UnknownShortName { name: String, dir: PathBuf },
    #[error("'{0}' is neither a file, a model directory, a known model name ({1}) nor a hub id (org/name)")]
    UnresolvableModel(String, String),
    #[error("hub model '{id}' could not be loaded: not in the Hugging Face cache ({cache}) and the download failed: {reason}")]
    HubUnavailable {
        id: String,
        cache: String,
        reason: String,
    },
    #[error("invalid GGUF file {path}: {reason} (the file may be truncated or corrupt; re-run `make models`)")]
    BadGguf { path: PathBuf, reason: String },
    #[error("unsupported architecture '{0}' (supported: Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, LlamaForCausalLM, GPT2LMHeadModel; GGUF: gemma2, gemma3, llama, gpt2)")]
    UnsupportedArchitecture(String),
    #[error("{file}: missing field '{field}' needed to build the model")]
    MissingField { file: String, field: String },
    #[error("{file}: field '{field}' has an invalid value: {reason}")]
    BadField {
        file: String,
        field: String,
        reason: String,
    },
    #[error("weight '{0}' not found in the checkpoint (incomplete or mismatched checkpoint?)")]
    MissingWeight(String),
    #[error("safetensors: {0}")]
    Safetensors(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("unknown hook '{0}' (names look like blocks.3.hook_resid_post, blocks.*.attn.hook_z, hook_embed, ln_final.hook_normalized; `persona-lens inspect` lists them)")]
    UnknownHook(String),
    #[error("hook '{name}': layer {layer} is out of range (model has {n_layers} layers: 0..={max})", max = n_layers - 1)]
    LayerOutOfRange {
        name: String,
        layer: usize,
        n_layers: usize,
    },
    #[error("prompt is empty: give at least one token of text")]
    EmptyPrompt,
    #[error("prompt of {len} tokens is longer than the context window of {max} tokens")]
    PromptTooLong { len: usize, max: usize },
    #[error("a {prompt}-token prompt + {new_tokens} new tokens = {} positions, more than the model's context of {max}; ask for at most {} new tokens", prompt + new_tokens, max.saturating_sub(*prompt))]
    GenerationTooLong {
        prompt: usize,
        new_tokens: usize,
        max: usize,
    },
    /// An activation or the logits left the range f32 arithmetic can carry (NaN, inf, or values
    /// whose squares overflow in the next norm): an intervention too strong, bad weights.
    #[error("activations out of range at {hook}: {what}; {why}")]
    NonFinite {
        hook: String,
        what: String,
        why: String,
    },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("interrupted")]
    Interrupted,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Text given to a model without a vocabulary (every word would silently become id 0).
    #[error("this model has no tokenizer (no tokenizer.json / GGUF vocabulary): give token ids instead of text")]
    NoVocabulary,
    #[error("{0}")]
    Candle(String),
    #[error("io error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Write(#[from] persona_lens_atomic::WriteError),
}

pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
}

/// candle errors, without the backtrace candle attaches when RUST_BACKTRACE is set.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", candle_message(inner))
        }
        other => other
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Candle(candle_message(&e))
    }
}
