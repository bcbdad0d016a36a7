//! persona-lens engine: real transformer weights (GGUF, Hugging Face safetensors), tokenizers and
//! chat templates, and a forward pass with TransformerLens-style hook points that capture and
//! intervene, batched with left padding, with a KV cache for generation.
//!
//! ```no_run
//! use persona_lens_engine::{Model, LoadOptions, Hooks, HookName, HookPoint, Batch, LogitsAt};
//! let model = Model::load("gemma-3-270m", std::path::Path::new("models"), &LoadOptions::default())?;
//! let ids = model.encode_prompt("The capital of Japan is", false)?;
//! let batch = Batch::left_padded(&[ids], model.pad_id(), model.device())?;
//! let mut hooks = Hooks::new();
//! hooks.capture(HookName::block(3, HookPoint::ResidPost));
//! let logits = model.forward(&batch, None, &mut hooks, LogitsAt::Last)?;
//! let resid = hooks.cache.get(&HookName::block(3, HookPoint::ResidPost))?; // [1, t, d_model]
//! # Ok::<(), persona_lens_engine::EngineError>(())
//! ```

pub mod arch;
pub mod config;
pub mod decoder;
pub mod error;
pub mod generate;
pub mod hooks;
pub mod io;
pub mod layers;
pub mod mkl;
pub mod model;
pub mod prefix;
pub mod registry;
pub mod run_cache;
pub mod runtime;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use error::{EngineError, Result};
pub use generate::{generate, generate_after_prefix, GenerateOptions, Generation, Sampling};
pub use hooks::{
    all_hooks, interrupt_all, resolve_hooks, ActivationCache, HookCtx, HookFn, HookName, HookPoint,
    Hooks, Intervention, Op, Selector,
};
pub use layers::{KvCache, LogitsAt};
pub use model::{models_dir, resolve, LoadOptions, Model, ModelInfo, ModelSource, DEFAULT_MODEL};
pub use prefix::{common_prefix_len, SharedPrefix, MIN_SHARED_PREFIX};
pub use registry::{registry, RegistryEntry};
pub use run_cache::{CachePositions, OwnedActivation};
pub use runtime::tune_cpu_pools;
pub use tokenizer::{read_token_ids, ChatMessage, Tokenizer};
pub use weights::{Precision, QuantKernel};

use candle_core::{Device, Tensor};

/// Token ids for one forward call: `[b, t]`, rows left padded to the longest.
#[derive(Debug, Clone)]
pub struct Batch {
    pub ids: Tensor,
    /// Left padding of each row.
    pub pad: Vec<usize>,
    /// Real length of each row.
    pub lens: Vec<usize>,
}

impl Batch {
    pub fn left_padded(seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        if seqs.is_empty() || seqs.iter().any(|s| s.is_empty()) {
            return Err(EngineError::EmptyPrompt);
        }
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(seqs.len() * t);
        let mut pad = Vec::with_capacity(seqs.len());
        for s in seqs {
            let p = t - s.len();
            pad.push(p);
            flat.extend(std::iter::repeat_n(pad_id, p));
            flat.extend_from_slice(s);
        }
        Ok(Batch {
            ids: Tensor::from_vec(flat, (seqs.len(), t), device)?,
            pad,
            lens: seqs.iter().map(Vec::len).collect(),
        })
    }

    pub fn size(&self) -> usize {
        self.pad.len()
    }
}
