//! `persona-lens diff analyze`: everything the crosscoder notebook asks for, in one pass, written
//! as `summary.json` (the notebook's fields plus provenance), plots, and `report.md` +
//! `report.html` (the report crate's document model: one source, two renderings).

use crate::baselines::{pca_of_differences, per_token_kl, KlBaseline, PcaBaseline};
use crate::corpus::{sycophancy_pairs, verification_prompts};
use crate::crosscoder::CrossCoder;
use crate::harvest::{harvest_paired, CorpusItem, PairedHarvestSpec};
use crate::metrics::{latent_scaling, DecoderMetrics, LatentClass, LatentScaling};
use crate::paired::{Alignment, PairedMeta, PairedStore};
use crate::persona::{
    codes_for, consistency, direct_codes, max_activating, max_mean_null, pair_differences,
    pair_key, verify, Candidate, Example, MaxNull, PairDiff, Verification,
};
use crate::Result;
use persona_lens_analysis::claims::{adjust, clustered_test, Claim, Condition};
use persona_lens_analysis::dataset::Split;
use persona_lens_analysis::probe::dense_ids;
use persona_lens_analysis::PersonaDataset;
use persona_lens_engine::{HookName, Model};
use persona_lens_report::{save_bar_chart, save_histogram, Bar, BarChart, Document, Histogram};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub struct AnalyzeSpec<'a> {
    pub hooks: [HookName; 2],
    pub chat_template: [bool; 2],
    /// Both models read the chat model's ids (see [`PairedHarvestSpec::shared_ids`]).
    pub shared_ids: bool,
    pub alignment: Option<Alignment>,
    pub batch_size: usize,
    /// Crosscoder (None: the notebook's direct activation comparison).
    pub crosscoder: Option<(&'a CrossCoder, String)>,
    /// The training corpus store, for Latent Scaling and max-activating examples; the analysed
    /// prompts it holds are read from it instead of run again (see [`rows_of`]).
    pub store: Option<&'a PairedStore>,
    pub top_k: usize,
    /// Candidates to verify.
    pub n_verify: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassSummary {
    pub counts: BTreeMap<String, usize>,
    pub thresholds: String,
    pub shared_cosine_median: Option<f64>,
    pub shared_cosine_mean: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateRow {
    /// Ranked on the `select` split's pairs.
    #[serde(flatten)]
    pub candidate: Candidate,
    pub rel_norm_diff: Option<f64>,
    pub class: Option<LatentClass>,
    pub decoder_cosine: Option<f64>,
    /// The same latent on the held-out `evaluate` split's pairs.
    pub held_out: Option<HeldOut>,
}

/// A latent's novice − expert difference on held-out pairs: mean, bootstrap interval over
/// questions, one-sided sign-flip p by question.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOut {
    pub mean: f64,
    pub ci95: (f64, f64),
    pub p_value: f64,
    pub n_pairs: usize,
    pub n_clusters: usize,
}

/// The cheap diffing baselines on the persona prompts (see [`crate::baselines`]): computed
/// when both models read the same ids and have the same width, else `not_computed` says why.
#[derive(Debug, Clone, Serialize)]
pub struct Baselines {
    pub per_token_kl: Option<KlBaseline>,
    pub pca: Option<PcaBaseline>,
    pub not_computed: Option<String>,
}

/// Top examples kept per baseline.
const BASELINE_EXAMPLES: usize = 10;

/// Permutations / bootstrap draws behind the held-out tests and the max-over-latents null.
pub const REPS: usize = 2000;

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub base_model: String,
    pub chat_model: String,
    pub hooks: Vec<String>,
    pub chat_template: Vec<bool>,
    pub alignment: Alignment,
    pub dataset: String,
    pub dataset_hash: String,
    pub n_pairs_analyzed: usize,
    /// Pairs that ranked the latents (`select` questions and paraphrases) and pairs that tested
    /// them (`evaluate`); no question or paraphrase is in both.
    pub n_pairs_select: usize,
    pub n_pairs_evaluate: usize,
    /// The top latent's selection-split mean against the null of the maximum over all latents.
    pub top_null: Option<MaxNull>,
    /// Why the pair is exploratory (different architecture, width or tokenizer: latents cannot
    /// be read as chat tuning); None for a comparable base/chat pair.
    pub exploratory: Option<String>,
    /// "latent #k is a chat-only user-model latent", one per verified candidate, with its
    /// held-out test and conditions (Δ_norm, Latent Scaling, verification, a comparable pair).
    pub claims: Vec<Claim>,
    pub cross_coder_available: bool,
    pub crosscoder: Option<String>,
    pub feature_type: String,
    pub units: String,
    pub latent_classes: Option<ClassSummary>,
    pub latent_scaling: Vec<LatentScaling>,
    pub top_candidates: Vec<CandidateRow>,
    /// Candidates most active for expert prompts (most negative novice − expert).
    pub top_expert_candidates: Vec<CandidateRow>,
    pub verification: Vec<Verification>,
    pub sycophancy_top: Vec<Candidate>,
    pub n_sycophancy_pairs: usize,
    pub max_activating: BTreeMap<usize, Vec<Example>>,
    pub baselines: Baselines,
    pub plots: Vec<String>,
    pub seed: u64,
    pub tool: String,
}

/// Each item's paired row at its last token, `(items, 2, d)`. Samples the analysed store
/// already holds (same id and text, harvested from the same model files, hooks and rendering,
/// without interventions) are read from it: the analysis runs the models only on the rest.
pub fn rows_of(
    models: [&Model; 2],
    items: &[CorpusItem],
    spec: &AnalyzeSpec,
    dir: &Path,
) -> Result<candle_core::Tensor> {
    let store = spec.store.filter(|st| store_serves(&st.meta, models, spec));
    let stored_at: Vec<Option<usize>> = match store {
        Some(st) => {
            let last_row: HashMap<(&str, &str), usize> = st
                .meta
                .samples
                .iter()
                .filter(|s| s.n_rows > 0)
                .map(|s| ((s.id.as_str(), s.text.as_str()), s.first_row + s.n_rows - 1))
                .collect();
            items
                .iter()
                .map(|i| last_row.get(&(i.id.as_str(), i.text.as_str())).copied())
                .collect()
        }
        None => vec![None; items.len()],
    };
    let missing: Vec<CorpusItem> = items
        .iter()
        .zip(&stored_at)
        .filter(|(_, at)| at.is_none())
        .map(|(i, _)| i.clone())
        .collect();
    let stored_rows: Vec<usize> = stored_at.iter().flatten().copied().collect();
    let mut parts = vec![];
    if let (Some(st), false) = (store, stored_rows.is_empty()) {
        parts.push(st.rows_at(&stored_rows)?);
    }
    if !missing.is_empty() {
        let hs = PairedHarvestSpec {
            hooks: spec.hooks,
            chat_template: spec.chat_template,
            shared_ids: spec.shared_ids,
            // prompts are compared at their last token (the notebook's per-prompt vectors)
            alignment: Some(Alignment::Last),
            batch_size: spec.batch_size,
            shard_rows: 1 << 20,
            setup: [None, None],
            stored: [None, None],
        };
        harvest_paired(models, &missing, &hs, dir, &|_| {})?;
        parts.push(PairedStore::open(dir)?.all()?);
        let _ = std::fs::remove_dir_all(dir);
    }
    let x = candle_core::Tensor::cat(&parts, 0)?;
    if missing.is_empty() || stored_rows.is_empty() {
        return Ok(x);
    }
    // Back to the items' order: stored rows come first in `x`, computed ones after them.
    let (mut next_stored, mut next_computed) = (0u32, stored_rows.len() as u32);
    let order: Vec<u32> = stored_at
        .iter()
        .map(|at| {
            let slot = if at.is_some() {
                &mut next_stored
            } else {
                &mut next_computed
            };
            *slot += 1;
            *slot - 1
        })
        .collect();
    let order = candle_core::Tensor::from_vec(order, items.len(), x.device())?;
    Ok(x.index_select(&order, 0)?)
}

/// Whether `meta`'s rows are what [`rows_of`] would compute for `spec`: the same model files,
/// hooks and templates, and the same choice of token ids (the chat model's rendering fed to both,
/// or each its own).
fn store_serves(meta: &PairedMeta, models: [&Model; 2], spec: &AnalyzeSpec) -> bool {
    meta.shared_ids == Some(spec.shared_ids)
        && meta.model_paths.len() == 2
        && meta.model_paths[0] == models[0].info.path
        && meta.model_paths[1] == models[1].info.path
        && meta.hooks == [spec.hooks[0].to_string(), spec.hooks[1].to_string()]
        && meta.chat_template == spec.chat_template
}

/// Runs the analysis and writes `summary.json`, plots and `report.md` into `out`.
pub fn analyze(
    models: [&Model; 2],
    ds: &PersonaDataset,
    spec: &AnalyzeSpec,
    out: &Path,
    progress: &dyn Fn(&str),
) -> Result<Summary> {
    std::fs::create_dir_all(out)
        .map_err(|e| crate::DiffError::Invalid(format!("cannot create {}: {e}", out.display())))?;
    let prov = format!(
        "base {} vs chat {} | hooks {} / {} | last token | seed {}",
        models[0].info.name, models[1].info.name, spec.hooks[0], spec.hooks[1], spec.seed
    );
    let mut plots = vec![];
    // --- decoder metrics
    let (metrics, classes, scaling) = match &spec.crosscoder {
        Some((cc, _)) if cc.n_models() == 2 => {
            progress("decoder norms");
            let m = DecoderMetrics::compute(cc)?;
            let mut counts = BTreeMap::new();
            for c in [
                LatentClass::BaseOnly,
                LatentClass::ChatOnly,
                LatentClass::Shared,
                LatentClass::Other,
            ] {
                counts.insert(c.name().to_string(), m.count(c));
            }
            let mut cos: Vec<f64> = m
                .of_class(LatentClass::Shared)
                .iter()
                .map(|&j| m.cosine[j])
                .collect();
            cos.sort_by(f64::total_cmp);
            let cs = ClassSummary {
                counts,
                thresholds: "Δ_norm = ½((‖d_chat‖−‖d_base‖)/max+1): chat_only ≥ 0.9, base_only ≤ 0.1, shared 0.4–0.6".into(),
                shared_cosine_median: cos.get(cos.len() / 2).copied(),
                shared_cosine_mean: if cos.is_empty() { None } else { Some(cos.iter().sum::<f64>() / cos.len() as f64) },
            };
            plots.extend(save_histogram(
                &Histogram {
                    title: "Relative decoder norm Δ_norm per latent (0 = base-only, 1 = chat-only)"
                        .into(),
                    x_label: "Δ_norm".into(),
                    y_label: "latents (log10(1+count))".into(),
                    values: m.rel_norm_diff.clone(),
                    bins: 50,
                    range: (0.0, 1.0),
                    vlines: vec![
                        (0.1, "base-only ≤ 0.1".into()),
                        (0.9, "chat-only ≥ 0.9".into()),
                    ],
                    caption: format!("{prov} | F = {}", cc.dict_size()),
                    log_counts: true,
                },
                &out.join("rel_norm_hist"),
            )?);
            plots.extend(save_histogram(
                &Histogram {
                    title: "Decoder cosine (base vs chat) of shared latents".into(),
                    x_label: "cosine".into(),
                    y_label: "latents".into(),
                    values: cos.clone(),
                    bins: 40,
                    range: (-1.0, 1.0),
                    vlines: vec![],
                    caption: prov.clone(),
                    log_counts: false,
                },
                &out.join("shared_decoder_cosine"),
            )?);
            let scaling = match spec.store {
                Some(st) => {
                    progress("latent scaling");
                    let x = st.all()?;
                    latent_scaling(cc, &x, &m.of_class(LatentClass::ChatOnly))?
                }
                None => vec![],
            };
            (Some(m), Some(cs), scaling)
        }
        _ => (None, None, vec![]),
    };

    // --- novice vs expert pairs: rank on `select`, test on `evaluate`
    progress("persona pairs");
    let mut split_ds = ds.clone();
    split_ds.assign_splits(spec.seed);
    let items: Vec<&persona_lens_analysis::PromptItem> = split_ds
        .items
        .iter()
        .filter(|i| (i.class == "novice" || i.class == "expert") && i.split.is_some())
        .collect();
    // pair -> (split, question cluster)
    let questions: Vec<String> = items.iter().map(|i| i.question_key()).collect();
    let pair_info: BTreeMap<String, (Split, usize)> = items
        .iter()
        .zip(dense_ids(&questions))
        .filter_map(|(i, q)| Some((pair_key(&i.id), (i.split?, q))))
        .collect();
    let corpus: Vec<CorpusItem> = items
        .iter()
        .map(|i| CorpusItem {
            id: i.id.clone(),
            source: i.class.clone(),
            text: i.text.clone(),
        })
        .collect();
    let ids: Vec<(String, String)> = items
        .iter()
        .map(|i| (i.id.clone(), i.class.clone()))
        .collect();
    let tmp = out.join(".tmp_rows");
    let x = rows_of(models, &corpus, spec, &tmp)?;
    let chat_dim = models[1].config().d_model;
    let codes = match &spec.crosscoder {
        Some((cc, _)) => codes_for(cc, &x, &ids)?,
        None => direct_codes(&x, chat_dim, &ids)?,
    };
    let diffs = pair_differences(&codes, "novice", "expert");
    let in_split = |want: Split| -> (Vec<PairDiff>, Vec<usize>) {
        diffs
            .iter()
            .filter_map(|d| match pair_info.get(&d.pair) {
                Some(&(s, q)) if s == want => Some((d.clone(), q)),
                _ => None,
            })
            .unzip()
    };
    let (sel, sel_q) = in_split(Split::Select);
    let (eval, eval_q) = in_split(Split::Evaluate);
    if sel.len() < 2 {
        return too_few_pairs(sel.len(), diffs.len());
    }
    let cands = consistency(&sel, spec.top_k);
    let top_null = max_mean_null(&sel, &sel_q, REPS, spec.seed);
    let held_out = |j: usize| -> Option<HeldOut> {
        let d: Vec<(usize, f64)> = eval
            .iter()
            .zip(&eval_q)
            .map(|(p, &q)| (q, p.diff[j]))
            .collect();
        clustered_test(&d, REPS, spec.seed ^ j as u64).map(|t| HeldOut {
            mean: t.effect,
            ci95: t.ci95,
            p_value: t.p_value,
            n_pairs: t.n,
            n_clusters: t.n_clusters,
        })
    };
    let row = |c: &Candidate| CandidateRow {
        candidate: c.clone(),
        rel_norm_diff: metrics.as_ref().map(|m| m.rel_norm_diff[c.feature_idx]),
        class: metrics.as_ref().map(|m| m.class[c.feature_idx]),
        decoder_cosine: metrics.as_ref().map(|m| m.cosine[c.feature_idx]),
        held_out: held_out(c.feature_idx),
    };
    let top: Vec<CandidateRow> = cands.iter().take(20).map(row).collect();
    let top_expert: Vec<CandidateRow> = cands.iter().rev().take(10).map(row).collect();
    let feature_type = if spec.crosscoder.is_some() {
        "Latent"
    } else {
        "Dimension"
    };
    plots.extend(save_bar_chart(
        &BarChart {
            title: format!(
                "Top {feature_type}s more active for novice users (mean ± sd over {} selection-split pairs)",
                sel.len()
            ),
            x_label: format!(
                "mean differential score, novice − expert ({})",
                if spec.crosscoder.is_some() {
                    "scaled latent activation"
                } else {
                    "chat residual units"
                }
            ),
            bars: top
                .iter()
                .take(15)
                .map(|r| Bar {
                    label: format!(
                        "{feature_type} {}{}",
                        r.candidate.feature_idx,
                        r.class
                            .map(|c| format!(" [{}]", c.name()))
                            .unwrap_or_default()
                    ),
                    value: r.candidate.mean_score,
                    err: Some(r.candidate.std_score),
                    group: 0,
                })
                .collect(),
            groups: vec![],
            caption: prov.clone(),
        },
        &out.join("user_model_candidates"),
    )?);

    // --- cheap baselines on the same persona prompts
    let widths = [models[0].config().d_model, models[1].config().d_model];
    let baselines = if spec.shared_ids && widths[0] == widths[1] {
        progress("baselines: per-token KL, PCA of differences");
        let labels: Vec<(String, String, String)> = items
            .iter()
            .map(|i| (i.id.clone(), i.class.clone(), i.text.clone()))
            .collect();
        Baselines {
            per_token_kl: Some(per_token_kl(
                models,
                &corpus,
                spec.chat_template[1],
                [None, None],
                spec.batch_size,
                BASELINE_EXAMPLES,
            )?),
            pca: Some(pca_of_differences(
                &x,
                widths[0],
                &labels,
                ("novice", "expert"),
                3,
                BASELINE_EXAMPLES,
            )?),
            not_computed: None,
        }
    } else {
        Baselines {
            per_token_kl: None,
            pca: None,
            not_computed: Some(format!(
                "per-token KL and PCA of differences need both models to read the same token ids at the same width (a base/chat pair of one model); {}",
                match exploratory_reason(models) {
                    Some(why) => why,
                    None => "this run gave each model its own rendering".into(),
                }
            )),
        }
    };

    // --- verification
    progress("verification");
    let vp: Vec<(String, String)> = verification_prompts()
        .iter()
        .map(|(e, p)| (e.to_string(), p.to_string()))
        .collect();
    let vcorpus: Vec<CorpusItem> = vp
        .iter()
        .enumerate()
        .map(|(i, (e, p))| CorpusItem {
            id: format!("verify/{i}/{e}"),
            source: "verification".into(),
            text: p.clone(),
        })
        .collect();
    let vx = rows_of(models, &vcorpus, spec, &tmp)?;
    let vids: Vec<(String, String)> = vp.iter().map(|(e, p)| (p.clone(), e.clone())).collect();
    let vcodes = match &spec.crosscoder {
        Some((cc, _)) => codes_for(cc, &vx, &vids)?,
        None => direct_codes(&vx, chat_dim, &vids)?,
    };
    let mut verification = vec![];
    for c in cands.iter().take(spec.n_verify) {
        let acts: Vec<f64> = vcodes.iter().map(|p| p.values[c.feature_idx]).collect();
        let v = verify(c.feature_idx, &vp, &acts, spec.seed);
        plots.extend(save_bar_chart(
            &BarChart {
                title: format!(
                    "Verification: {feature_type} #{} as 'user is a novice' ({}/{} pass)",
                    c.feature_idx, v.passed, v.checked
                ),
                x_label: format!("{feature_type} #{} activation", c.feature_idx),
                bars: v
                    .rows
                    .iter()
                    .map(|r| Bar {
                        label: format!(
                            "{} {}",
                            if r.pass == Some(false) { "✗" } else { " " },
                            r.prompt.chars().take(55).collect::<String>()
                        ),
                        value: r.activation,
                        err: None,
                        group: match r.expected.as_str() {
                            "ACTIVATE" => 2,
                            "SILENT" => 1,
                            _ => 7,
                        },
                    })
                    .collect(),
                groups: vec![],
                caption: format!("{prov} | green ACTIVATE, red SILENT, grey NEUTRAL; ✗ = failed"),
            },
            &out.join(format!("feature_verification_{}", c.feature_idx)),
        )?);
        verification.push(v);
    }

    // --- sycophancy
    progress("sycophancy");
    let sp = sycophancy_pairs();
    let mut scorpus = vec![];
    let mut sids = vec![];
    for (i, (b, n)) in sp.iter().enumerate() {
        for (class, text) in [("biased", b), ("neutral", n)] {
            scorpus.push(CorpusItem {
                id: format!("syc_{i:03}/{class}"),
                source: class.into(),
                text: text.to_string(),
            });
            sids.push((format!("syc_{i:03}/{class}"), class.to_string()));
        }
    }
    let sx = rows_of(models, &scorpus, spec, &tmp)?;
    let scodes = match &spec.crosscoder {
        Some((cc, _)) => codes_for(cc, &sx, &sids)?,
        None => direct_codes(&sx, chat_dim, &sids)?,
    };
    let sdiffs = pair_differences(&scodes, "biased", "neutral");
    let sycophancy_top: Vec<Candidate> = consistency(&sdiffs, spec.top_k)
        .into_iter()
        .take(10)
        .collect();

    // --- max-activating examples
    let max_act = match (&spec.crosscoder, spec.store) {
        (Some((cc, _)), Some(st)) => {
            progress("max-activating examples");
            let lat: Vec<usize> = cands
                .iter()
                .take(spec.n_verify.max(3))
                .map(|c| c.feature_idx)
                .collect();
            max_activating(cc, st, &lat, 8)?
        }
        _ => BTreeMap::new(),
    };

    // --- claims: one per verified candidate, supported only when every diffing test agrees
    let exploratory = exploratory_reason(models);
    let mut claims = vec![];
    if let Some(m) = metrics.as_ref() {
        for v in &verification {
            let j = v.feature_idx;
            // the candidate's row already holds its held-out test (verified candidates are
            // among the top rows unless more than 20 are verified)
            let row_test = top
                .iter()
                .find(|r| r.candidate.feature_idx == j)
                .and_then(|r| r.held_out.clone());
            let Some(h) = row_test.or_else(|| held_out(j)) else {
                continue;
            };
            let ls = scaling.iter().find(|l| l.latent == j);
            let fmt = |x: f64| {
                if x.is_finite() {
                    format!("{x:.2}")
                } else {
                    "undefined".into()
                }
            };
            let conditions = vec![
                Condition {
                    what: match &exploratory {
                        None => "a comparable base/chat pair (same architecture, width and tokenizer)".into(),
                        Some(why) => format!("a comparable base/chat pair: no, {why}"),
                    },
                    holds: exploratory.is_none(),
                },
                Condition {
                    what: format!("chat-only decoder: Δ_norm {:.3} ≥ 0.9", m.rel_norm_diff[j]),
                    holds: m.class[j] == LatentClass::ChatOnly,
                },
                Condition {
                    what: match ls {
                        Some(l) => format!(
                            "Latent Scaling chat-specific: |ν^ε| = {} and |ν^r| = {} below 0.3",
                            fmt(l.nu_error.abs()),
                            fmt(l.nu_recon.abs())
                        ),
                        None => "Latent Scaling chat-specific: not computed (no paired store, or not a chat-only latent)".into(),
                    },
                    holds: ls.is_some_and(|l| l.chat_specific),
                },
                Condition {
                    what: format!(
                        "held-out verification prompts: {}/{} ACTIVATE above the NEUTRAL 95th percentile, {}/{} SILENT at or below, permutation p = {:.3}",
                        v.activate_passed, v.n_activate, v.silent_passed, v.n_silent, v.p_value
                    ),
                    holds: v.verified,
                },
            ];
            claims.push(Claim {
                id: format!("diff.latent_{j}.chat_only_user_model"),
                statement: format!(
                    "{}Latent #{j} is a chat-only user-model latent: it is more active for novice than for expert users on held-out persona pairs (mean difference {:.3}).",
                    if exploratory.is_some() { "Exploratory (not a base/chat pair of one model): " } else { "" },
                    h.mean
                ),
                analysis: "diff analyze (summary.json)".into(),
                test: format!(
                    "ranked on {} selection-split pairs, tested on {} held-out pairs ({} questions): sign-flip permutation by question of the mean novice − expert activation ({REPS} draws), bootstrap CI over questions; supported only when every condition holds",
                    sel.len(), h.n_pairs, h.n_clusters
                ),
                statistic: "mean novice − expert scaled latent activation on held-out pairs".into(),
                effect: h.mean,
                ci95: h.ci95,
                p_value: h.p_value,
                p_adjusted: h.p_value,
                supported: false,
                n_clusters: h.n_clusters,
                conditions,
            });
        }
        adjust(&mut claims);
    }

    let summary = Summary {
        base_model: models[0].info.name.clone(),
        chat_model: models[1].info.name.clone(),
        hooks: spec.hooks.iter().map(|h| h.to_string()).collect(),
        chat_template: spec.chat_template.to_vec(),
        alignment: Alignment::Last,
        dataset: ds.source.clone(),
        dataset_hash: ds.hash(),
        n_pairs_analyzed: sel.len() + eval.len(),
        n_pairs_select: sel.len(),
        n_pairs_evaluate: eval.len(),
        top_null,
        exploratory,
        claims,
        cross_coder_available: spec.crosscoder.is_some(),
        crosscoder: spec.crosscoder.as_ref().map(|(_, d)| d.clone()),
        feature_type: feature_type.into(),
        units: if spec.crosscoder.is_some() {
            "scaled latent activation (encode × Σ_l ‖W_dec[l]‖), last prompt token".into()
        } else {
            "chat model residual value at the hook, last prompt token".into()
        },
        latent_classes: classes,
        latent_scaling: scaling,
        top_candidates: top,
        top_expert_candidates: top_expert,
        verification,
        sycophancy_top,
        n_sycophancy_pairs: sdiffs.len(),
        max_activating: max_act,
        baselines,
        plots: plots
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .collect(),
        seed: spec.seed,
        tool: format!("persona-lens {}", env!("CARGO_PKG_VERSION")),
    };
    let bytes = serde_json::to_vec_pretty(&summary)
        .map_err(|e| crate::DiffError::Invalid(e.to_string()))?;
    persona_lens_engine::io::write_atomic(&out.join("summary.json"), &bytes)?;
    let doc = report(&summary);
    persona_lens_engine::io::write_atomic(&out.join("report.md"), doc.to_markdown().as_bytes())?;
    persona_lens_engine::io::write_atomic(&out.join("report.html"), doc.to_html(out)?.as_bytes())?;
    Ok(summary)
}

fn too_few_pairs<T>(n_select: usize, n_all: usize) -> Result<T> {
    crate::invalid(format!(
        "{n_select} novice/expert pairs in the selection split (of {n_all} in all): give more questions per topic or persona paraphrases so that both splits hold at least 2 pairs"
    ))
}

/// Checks, before any model runs, that `ds` splits into at least 2 novice/expert pairs to rank
/// latents on (the same split as [`analyze`]).
pub fn check_splits(ds: &PersonaDataset, seed: u64) -> Result<()> {
    let mut d = ds.clone();
    d.assign_splits(seed);
    let pairs = |want: Option<Split>| {
        let mut keys: Vec<String> = d
            .items
            .iter()
            .filter(|i| i.class == "novice" && (want.is_none() || i.split == want))
            .map(|i| pair_key(&i.id))
            .collect();
        keys.sort();
        keys.dedup();
        keys.len()
    };
    let n_select = pairs(Some(Split::Select));
    if n_select < 2 {
        return too_few_pairs(n_select, pairs(None));
    }
    Ok(())
}

/// How a pair reads its samples unless told otherwise: `(chat_template, shared_ids)`. A
/// base/chat pair of one model reads the chat model's template ids in both models, paired per
/// token (Minder et al.); any other pair reads each model's own rendering (the chat template
/// for an instruction-tuned model, raw text for a base model).
pub fn auto_rendering(models: [&Model; 2]) -> ([bool; 2], bool) {
    if exploratory_reason(models).is_none() {
        ([true, true], true)
    } else {
        (
            [models[0].is_chat_model(), models[1].is_chat_model()],
            false,
        )
    }
}

/// Why a pair of models cannot be read as base vs chat tuning of one model: a different
/// architecture, width or tokenizer. None for a comparable pair.
pub fn exploratory_reason(models: [&Model; 2]) -> Option<String> {
    let (a, b) = (models[0].config(), models[1].config());
    let mut why = vec![];
    if a.arch != b.arch {
        why.push(format!("architectures {:?} vs {:?}", a.arch, b.arch));
    }
    if a.d_model != b.d_model {
        why.push(format!("widths {} vs {}", a.d_model, b.d_model));
    }
    let probe = "Hello, I am a physicist. Why is the sky blue?";
    let same_tok = a.vocab_size == b.vocab_size
        && models[0].tokenizer.encode(probe, false).ok()
            == models[1].tokenizer.encode(probe, false).ok();
    if !same_tok {
        why.push("different tokenizers".into());
    }
    if why.is_empty() {
        None
    } else {
        Some(format!(
            "{} and {} differ ({}): each paired row holds different tokens in different models, so Δ_norm separates the models, not chat tuning",
            models[0].info.name,
            models[1].info.name,
            why.join(", ")
        ))
    }
}

/// The analysis as a document (`report.md`, and `report.html` with the plots embedded): the
/// report crate's model, so both renderings show the same strings.
pub fn report(s: &Summary) -> Document {
    let ft = s.feature_type.to_lowercase();
    let mut d = Document::new(format!(
        "Model diffing: {} (base) vs {} (chat)",
        s.base_model, s.chat_model
    ));
    d.p(format!(
        "Hooks {} / {}; {} novice/expert pairs ({} rank the {ft}s, {} held out to test them; no question or paraphrase in both); features: {}s ({}).",
        s.hooks[0], s.hooks[1], s.n_pairs_analyzed, s.n_pairs_select, s.n_pairs_evaluate,
        s.feature_type, s.units
    ));
    if let Some(why) = &s.exploratory {
        d.p(format!(
            "**Exploratory run.** {why}. No claim about chat tuning is made from it; diff a base model against its own chat version (e.g. smollm2-135m vs smollm2-135m-instruct) for that."
        ));
    }
    if !s.claims.is_empty() {
        d.h(1, "Claims");
        d.list(
            s.claims
                .iter()
                .map(|c| {
                    let conditions: String = c
                        .conditions
                        .iter()
                        .map(|k| format!("; {} {}", if k.holds { "✓" } else { "✗" }, k.what))
                        .collect();
                    format!(
                        "**{}** {} (held-out mean {:.4}, 95 % CI {:.4} to {:.4}, p = {:.4}, Holm-adjusted {:.4}){conditions}",
                        if c.supported { "Supported:" } else { "Not supported:" },
                        c.statement,
                        c.effect,
                        c.ci95.0,
                        c.ci95.1,
                        c.p_value,
                        c.p_adjusted
                    )
                })
                .collect(),
        );
    }
    if let Some(c) = &s.latent_classes {
        d.h(1, "Latent classes");
        d.table(
            vec!["class".into(), "latents".into()],
            c.counts
                .iter()
                .map(|(k, v)| vec![k.to_string(), v.to_string()])
                .collect(),
        );
        if let Some(m) = c.shared_cosine_median {
            d.p(format!("Shared latents' decoder cosine: median {m:.3}."));
        }
        let cs = s.latent_scaling.iter().filter(|l| l.chat_specific).count();
        d.p(format!(
            "Latent Scaling over {} chat-only latents: {cs} chat-specific (|ν^ε| < 0.3 and |ν^r| < 0.3 with β_chat > 0, targets as in Minder et al.'s compute_scalers.py).",
            s.latent_scaling.len()
        ));
    }
    if let Some(n) = &s.top_null {
        d.p(format!(
            "The top {ft} on the selection split (#{}, mean {:.4}) against the maximum over all {} {ft}s under sign flips by question: null 95th percentile {:.4}, p = {:.4} ({} draws, {} questions).",
            n.feature_idx, n.observed, n.n_features, n.null_q95, n.p_value, n.reps, n.n_clusters
        ));
    }
    d.h(
        1,
        format!("Top candidate 'user is a novice' {}s", s.feature_type),
    );
    d.p(format!(
        "Ranked on the selection split; the held-out columns test the same {ft} on the evaluate split."
    ));
    d.table(
        [
            s.feature_type.as_str(),
            "mean (novice − expert)",
            "sd",
            "pairs > 0",
            "in top-k",
            "t",
            "held-out mean [95 % CI]",
            "held-out p",
            "Δ_norm",
            "class",
        ]
        .map(String::from)
        .to_vec(),
        s.top_candidates
            .iter()
            .take(10)
            .map(|c| {
                let (ho, hp) = match &c.held_out {
                    Some(h) => (
                        format!("{:.4} [{:.4}, {:.4}]", h.mean, h.ci95.0, h.ci95.1),
                        format!("{:.4}", h.p_value),
                    ),
                    None => ("-".into(), "-".into()),
                };
                vec![
                    c.candidate.feature_idx.to_string(),
                    format!("{:.4}", c.candidate.mean_score),
                    format!("{:.4}", c.candidate.std_score),
                    format!("{:.2}", c.candidate.frac_positive),
                    format!("{}/{}", c.candidate.n_pairs_top_k, c.candidate.n_pairs),
                    format!("{:.1}", c.candidate.t),
                    ho,
                    hp,
                    c.rel_norm_diff
                        .map(|v| format!("{v:.3}"))
                        .unwrap_or("-".into()),
                    c.class.map(|v| v.name().to_string()).unwrap_or("-".into()),
                ]
            })
            .collect(),
    );
    for v in &s.verification {
        d.h(
            1,
            format!(
                "Verification of {} #{}: {} ({}/{} pass; bar {}; mean ACTIVATE − SILENT {:.4}, permutation p = {:.4})",
                s.feature_type,
                v.feature_idx,
                if v.verified { "verified" } else { "not verified" },
                v.passed,
                v.checked,
                v.threshold
                    .map(|t| format!("{t:.4}"))
                    .unwrap_or("none (no NEUTRAL prompts)".into()),
                v.statistic,
                v.p_value
            ),
        );
        d.p(format!("{}.", v.rule));
        d.table(
            ["expected", "activation", "pass", "prompt"]
                .map(String::from)
                .to_vec(),
            v.rows
                .iter()
                .map(|row| {
                    vec![
                        row.expected.to_string(),
                        format!("{:.4}", row.activation),
                        match row.pass {
                            Some(true) => "pass",
                            Some(false) => "FAIL",
                            None => "-",
                        }
                        .into(),
                        row.prompt.clone(),
                    ]
                })
                .collect(),
        );
    }
    baselines_section(&mut d, &s.baselines);
    d.h(
        1,
        format!(
            "Sycophancy triggers ({} biased/neutral pairs)",
            s.n_sycophancy_pairs
        ),
    );
    d.list(
        s.sycophancy_top
            .iter()
            .take(5)
            .map(|c| {
                format!(
                    "{} {}: mean (biased − neutral) {:.4}, sd {:.4}, positive in {:.0} % of pairs",
                    s.feature_type,
                    c.feature_idx,
                    c.mean_score,
                    c.std_score,
                    100.0 * c.frac_positive
                )
            })
            .collect(),
    );
    for png in s.plots.iter().filter(|p| p.ends_with(".png")) {
        d.image(png.clone(), png.clone(), png.clone());
    }
    d
}

/// `report.md`.
pub fn report_md(s: &Summary) -> String {
    report(s).to_markdown()
}

/// The report's section on the cheap baselines.
fn baselines_section(d: &mut Document, b: &Baselines) {
    d.h(1, "Cheap baselines (per-token KL, PCA of differences)");
    if let Some(why) = &b.not_computed {
        d.p(format!("Not computed: {why}."));
    }
    if let Some(k) = &b.per_token_kl {
        d.p(format!(
            "{} over {} positions of {} persona prompts: mean {:.4}; by class {}.",
            k.statistic,
            k.n_tokens,
            k.n_samples,
            k.mean_kl_nats,
            k.mean_kl_by_class
                .iter()
                .map(|(c, v)| format!("{c} {v:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        d.table(
            ["KL (nats)", "prompt", "class", "context (→ next token)"]
                .map(String::from)
                .to_vec(),
            k.top
                .iter()
                .map(|t| {
                    vec![
                        format!("{:.4}", t.kl_nats),
                        t.sample.to_string(),
                        t.class.to_string(),
                        t.context.replace('\n', "⏎"),
                    ]
                })
                .collect(),
        );
    }
    if let Some(p) = &b.pca {
        d.p(format!(
            "{} over {} prompts (total variance {:.4}):",
            p.statistic, p.n_rows, p.total_variance
        ));
        d.table(
            [
                "PC",
                "variance share",
                "mean projection by class",
                "top prompt",
            ]
            .map(String::from)
            .to_vec(),
            p.components
                .iter()
                .map(|c| {
                    vec![
                        (c.index + 1).to_string(),
                        format!("{:.3}", c.explained_variance_ratio),
                        c.mean_projection_by_class
                            .iter()
                            .map(|(k, v)| format!("{k} {v:.3}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        c.top_positive
                            .first()
                            .map(|e| format!("{} ({})", e.sample, e.class))
                            .unwrap_or_default(),
                    ]
                })
                .collect(),
        );
    }
}
