//! persona-lens analyses: the persona dataset, activation harvesting, per-layer probes, persona
//! directions, the logit lens, activation / path / attribution patching, head ranking and
//! ablation, steering and llama.cpp control vectors, the statistics and claims the study reports
//! (`stats`, `claims`), and the user model over conversations (`user_model`: saved probes,
//! read-out trajectories, belief revision, answers with streamed read-outs). Each analysis is a
//! function over an activation cache (or harvested activations) and calls the model only through
//! `forward` + hooks.

pub mod attribution;
pub mod claims;
pub mod control_vector;
pub mod dataset;
pub mod direction;
pub mod harvest;
pub mod heads;
pub mod lens;
pub mod npy;
pub mod patching;
pub mod path_patching;
pub mod probe;
pub mod stats;
pub mod steering;
pub mod user_model;

pub use dataset::{EncodedPrompt, GenOptions, PersonaDataset, PromptItem};
pub use harvest::{Harvest, HarvestSpec, PositionRule};

#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error(transparent)]
    Engine(#[from] persona_lens_engine::EngineError),
    #[error("dataset: {0}")]
    Dataset(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<candle_core::Error> for AnalysisError {
    fn from(e: candle_core::Error) -> Self {
        AnalysisError::Engine(persona_lens_engine::EngineError::from(e))
    }
}

pub type Result<T> = std::result::Result<T, AnalysisError>;

/// `Display` and `FromStr` through a type's `name()` and `parse()`: the one spelling the command
/// line (clap reads `FromStr`), the spec files (serde, the same names) and the results use.
macro_rules! named {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
        impl std::str::FromStr for $t {
            type Err = AnalysisError;
            fn from_str(s: &str) -> Result<Self> {
                Self::parse(s.trim())
            }
        }
    )*};
}
named!(
    steering::NormConvention,
    steering::SteerPositions,
    steering::SteerMode,
    patching::SweepKind,
    heads::AblationMode,
    direction::DirectionKind
);

/// The residual stream as rows, TransformerLens-style: row i < n_layers = `blocks.{i}.hook_resid_pre`
/// (row 0 = the embedding, row i = the output of block i-1 as block i reads it) and row n_layers
/// = `blocks.{n-1}.hook_resid_post`. This equals HF's `output_hidden_states` indexing except that
/// the last row is raw (before the final norm), as in the golden README. Rows are named by the
/// `resid_pre` hook so that an intervention at `blocks.{i}.hook_resid_pre` shows in row i.
pub fn resid_rows(n_layers: usize) -> Vec<persona_lens_engine::HookName> {
    use persona_lens_engine::{HookName, HookPoint};
    let mut v: Vec<HookName> = (0..n_layers)
        .map(|l| HookName::block(l, HookPoint::ResidPre))
        .collect();
    v.push(HookName::block(
        n_layers.saturating_sub(1),
        HookPoint::ResidPost,
    ));
    v
}

/// Writes JSON atomically.
pub fn write_json<T: serde::Serialize>(path: &std::path::Path, v: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(v)
        .map_err(|e| AnalysisError::Invalid(format!("serialising {}: {e}", path.display())))?;
    persona_lens_engine::io::write_atomic(path, &bytes)?;
    Ok(())
}
