//! Each study step's compact results, typed: what `summary.json` holds under `steps.<name>`
//! and `<step>/step.json` under `data`. A step builds its struct from its typed results; the
//! summary reads the fields it needs back through the same structs (`StepOut::read`), never
//! through string keys. `StepOut::data` keeps them as one JSON value so that one `StepOut`
//! type serves every step and a resumed step reads back what it wrote; the key order in the
//! files is alphabetical, as it was before the data was typed.

use persona_lens_analysis::heads::HeadRole;
use persona_lens_diffing::analyze::Summary as DiffSummary;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `steps.probe`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeData {
    pub chance: f64,
    pub class_counts: BTreeMap<String, usize>,
    pub classes: Vec<String>,
    pub dataset_hash: String,
    pub dataset_source: String,
    /// The persona directions the steering step reads.
    pub direction: DirectionData,
    /// One entry per residual row probed.
    pub layers: Vec<ProbeRow>,
    pub n_prompts: usize,
    pub n_templates: usize,
    pub position: String,
}

/// The probe step's persona direction file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirectionData {
    pub file: String,
    /// Norm of the raw difference of means at each residual row.
    pub norms: Vec<f64>,
    /// The residual row exported as `persona_direction.npy`.
    pub resid_row: usize,
}

/// One residual row's probe accuracies (fractions correct).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeRow {
    /// Shuffled-label control.
    pub control: Option<f64>,
    pub cv: f64,
    /// Evaluation split (new questions and paraphrases).
    pub evaluate: Option<f64>,
    /// Held-out persona paraphrases.
    pub held_out: Option<f64>,
    pub lexical_controls: Option<f64>,
    /// 0 = embeddings, i = output of block i-1.
    pub row: Option<usize>,
    /// Cross-validated inside the selection split.
    pub select_cv: Option<f64>,
}

/// `steps.lens`.
#[derive(Debug, Clone, Serialize)]
pub struct LensData {
    /// The first row whose paired effect's 95 % lower bound stays above `min_effect` (selection
    /// split); none when no row does.
    pub decision_row: Option<usize>,
    pub expert_words: Vec<String>,
    pub metric: String,
    pub min_effect: f64,
    pub n_pairs: SplitCounts,
    /// Per residual row, evaluation split (with the sign-flip p-value).
    pub paired_effect_evaluate: Vec<Option<RowEffect>>,
    /// Per residual row, selection split.
    pub paired_effect_select: Vec<Option<RowEffect>>,
    pub personas: Vec<LensPersona>,
    pub prompts_from_probe_activations: usize,
    pub simple_words: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SplitCounts {
    pub evaluate: usize,
    pub select: usize,
}

/// A paired effect (logits) with its 95 % interval.
#[derive(Debug, Clone, Serialize)]
pub struct RowEffect {
    pub ci95: (f64, f64),
    pub effect: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p: Option<f64>,
}

/// One persona's mean readout per residual row (logits).
#[derive(Debug, Clone, Serialize)]
pub struct LensPersona {
    pub logit_diff_mean: Vec<f64>,
    pub n: usize,
    pub persona: String,
}

/// `steps.patch`.
#[derive(Debug, Clone, Serialize)]
pub struct PatchData {
    /// The head whose `attn.hook_z` at the last position restores most (a `z_last` sweep).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_head_z_last: Option<BestHead>,
    /// Metric of the clean run (logits).
    pub clean_metric: f64,
    pub corrupted_metric: f64,
    pub differing_positions: Vec<usize>,
    /// Fraction restored by patching `resid_pre` at the last position, per layer (a
    /// `resid_pre` sweep).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resid_pre_last_position: Option<Vec<f32>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BestHead {
    pub head: usize,
    pub layer: usize,
    /// Fraction of the clean behaviour restored.
    pub restored: f64,
}

/// `steps.heads`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadsData {
    /// The answer words of the logit difference (`answer_a`, `answer_b`).
    pub answers: (String, String),
    /// Their mean novice-minus-expert logit difference on the selection split (logits).
    pub answers_mean_gap_select: f64,
    pub circuit: Vec<CircuitHead>,
    pub n_pairs: usize,
    pub n_skipped: usize,
    pub roles: Vec<HeadRole>,
    pub top: Vec<String>,
}

/// A top head of the heads step with the role read from its attention.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CircuitHead {
    /// `L{layer}H{head}`.
    pub head: String,
    /// 95 % interval of the per-pair restoration ratios' mean.
    pub mean_ratio_ci95: (f64, f64),
    /// Share of the last position's attention on the persona tokens (absent when no persona
    /// span was found to inspect).
    pub persona_attention: Option<f64>,
    pub role: String,
    /// Pooled z-patching score (fraction restored).
    pub score: f64,
}

/// `steps.ablate`.
#[derive(Debug, Clone, Serialize)]
pub struct AblateData {
    /// Persona gap without ablation (logits).
    pub baseline_gap: f64,
    /// Grade gap of the generated answers without ablation (US grade levels).
    pub grade_gap: Option<f64>,
    /// The ablated heads, comma-separated.
    pub heads: String,
    pub summary: Vec<crate::patch_jobs::AblationModeSummary>,
}

/// `steps.steer`.
#[derive(Debug, Clone, Serialize)]
pub struct SteerData {
    pub alphas: Vec<f64>,
    pub cells: Vec<persona_lens_rate::CellSummary>,
    pub chosen: ChosenCell,
    /// The stand-alone command of the evaluation run.
    pub evaluation_command: Vec<String>,
    pub layers: Vec<usize>,
}

/// The sweep cell chosen on the selection split.
#[derive(Debug, Clone, Serialize)]
pub struct ChosenCell {
    pub alpha: f64,
    pub layer: usize,
    /// US grade levels.
    pub select_grade_change: f64,
    pub select_perplexity_ratio: f64,
}

/// `steps.diff`.
#[derive(Debug, Clone, Serialize)]
pub struct DiffData {
    pub alignment: persona_lens_diffing::paired::Alignment,
    pub baselines: persona_lens_diffing::analyze::Baselines,
    pub exploratory: Option<String>,
    pub final_step: persona_lens_diffing::train::StepLog,
    pub latent_classes: Option<persona_lens_diffing::analyze::ClassSummary>,
    pub n_pairs_evaluate: usize,
    pub n_pairs_select: usize,
    pub rows: usize,
    /// The study model's store rows read from the probe step's stored activations (the same
    /// prompts, model file, rendering and last token) instead of a forward.
    pub rows_from_probe_activations: usize,
    pub rows_per_latent: f64,
    /// The first five.
    pub top_candidates: Vec<persona_lens_diffing::analyze::CandidateRow>,
    pub top_null: Option<persona_lens_diffing::persona::MaxNull>,
    pub train_rows: usize,
    pub validation: Option<persona_lens_diffing::train::Validation>,
    pub verification: Vec<VerifiedLatent>,
}

impl DiffData {
    /// The analysis summary's parts the study keeps, with the store's size, alignment and
    /// reused rows.
    pub fn from_analysis(
        sm: &DiffSummary,
        store: &persona_lens_diffing::paired::PairedMeta,
        trained: &persona_lens_diffing::train::TrainOutcome,
        rows_per_latent: f64,
        final_step: persona_lens_diffing::train::StepLog,
    ) -> Self {
        DiffData {
            alignment: store.alignment,
            baselines: sm.baselines.clone(),
            exploratory: sm.exploratory.clone(),
            final_step,
            latent_classes: sm.latent_classes.clone(),
            n_pairs_evaluate: sm.n_pairs_evaluate,
            n_pairs_select: sm.n_pairs_select,
            rows: store.rows,
            rows_from_probe_activations: store
                .samples
                .iter()
                .filter(|s| !s.stored_rows.is_empty())
                .count(),
            rows_per_latent,
            top_candidates: sm.top_candidates.iter().take(5).cloned().collect(),
            top_null: sm.top_null.clone(),
            train_rows: trained.train_rows,
            validation: trained.validation.clone(),
            verification: sm
                .verification
                .iter()
                .map(|v| VerifiedLatent {
                    checked: v.checked,
                    latent: v.feature_idx,
                    p_value: v.p_value,
                    passed: v.passed,
                    verified: v.verified,
                })
                .collect(),
        }
    }
}

/// A top latent's verification on prompts it was never trained or ranked on.
#[derive(Debug, Clone, Serialize)]
pub struct VerifiedLatent {
    pub checked: usize,
    pub latent: usize,
    pub p_value: f64,
    pub passed: usize,
    pub verified: bool,
}
