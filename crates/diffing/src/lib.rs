//! persona-lens diffing: crosscoders (dictionary_learning `CrossCoder` / `BatchTopKCrossCoder`
//! and the open-source replication layout) and single-model SAEs (SAELens, Gemma Scope), with
//! their exact encode/decode semantics; paired base-vs-chat activations; crosscoder training in
//! candle (`train`: the loop, checkpoints and resume; `step`: one step's loss and its gradients,
//! written out by hand; `adam`: the in-place update); and the model-diffing analyses (relative
//! decoder norms, Latent Scaling, persona latents).

pub mod adam;
pub mod analyze;
pub mod baselines;
pub mod corpus;
pub mod crosscoder;
pub mod harvest;
pub mod load;
pub mod metrics;
pub mod paired;
pub mod persona;
pub mod sae;
pub mod shards;
pub mod step;
pub mod train;

pub use crosscoder::{CodeNormalization, CrossCoder, Normaliser, Sparsity};
pub use load::{load_dictionary, Dictionary};
pub use sae::{Sae, SaeActivation};

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(transparent)]
    Engine(#[from] persona_lens_engine::EngineError),
    #[error(transparent)]
    Analysis(#[from] persona_lens_analysis::AnalysisError),
    #[error("{0}")]
    Invalid(String),
    /// A paired store that is not there (or has no readable manifest).
    #[error("cannot read {}: {reason} (harvest a paired store into {} first)", .dir.join(crate::paired::MANIFEST).display(), .dir.display())]
    NoStore {
        dir: std::path::PathBuf,
        reason: String,
    },
    /// A store folder without one finished part to join.
    #[error("{} holds no finished parts (harvest parts into it first)", .dir.display())]
    NoParts { dir: std::path::PathBuf },
    #[error(transparent)]
    Report(#[from] persona_lens_report::ReportError),
}

impl From<candle_core::Error> for DiffError {
    fn from(e: candle_core::Error) -> Self {
        DiffError::Engine(persona_lens_engine::EngineError::from(e))
    }
}

pub type Result<T> = std::result::Result<T, DiffError>;

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(DiffError::Invalid(msg.into()))
}
