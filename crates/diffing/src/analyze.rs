//! `persona-lens diff analyze`: everything the crosscoder notebook asks for, in one pass, written
//! as `summary.json` (the notebook's fields plus provenance), plots and `report.md`.

use crate::corpus::{sycophancy_pairs, verification_prompts};
use crate::crosscoder::CrossCoder;
use crate::harvest::{harvest_paired, CorpusItem, PairedHarvestSpec};
use crate::metrics::{latent_scaling, DecoderMetrics, LatentClass, LatentScaling};
use crate::paired::{Alignment, PairedStore};
use crate::persona::{
    codes_for, consistency, direct_codes, max_activating, pair_differences, verify, Candidate,
    Example, Verification,
};
use crate::Result;
use persona_lens_analysis::PersonaDataset;
use persona_lens_engine::{HookName, Model};
use persona_lens_report::{save_bar_chart, save_histogram, Bar, BarChart, Histogram};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

pub struct AnalyzeSpec<'a> {
    pub hooks: [HookName; 2],
    pub chat_template: [bool; 2],
    pub alignment: Option<Alignment>,
    pub batch_size: usize,
    /// Crosscoder (None: the notebook's direct activation comparison).
    pub crosscoder: Option<(&'a CrossCoder, String)>,
    /// The training corpus store, for Latent Scaling and max-activating examples.
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
    #[serde(flatten)]
    pub candidate: Candidate,
    pub rel_norm_diff: Option<f64>,
    pub class: Option<LatentClass>,
    pub decoder_cosine: Option<f64>,
}

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
    pub plots: Vec<String>,
    pub seed: u64,
    pub tool: String,
}

pub fn rows_of(
    models: [&Model; 2],
    items: &[CorpusItem],
    spec: &AnalyzeSpec,
    dir: &Path,
) -> Result<candle_core::Tensor> {
    let hs = PairedHarvestSpec {
        hooks: spec.hooks,
        chat_template: spec.chat_template,
        // prompts are compared at their last token (the notebook's per-prompt vectors)
        alignment: Some(Alignment::Last),
        batch_size: spec.batch_size,
        shard_rows: 1 << 20,
        setup: [None, None],
    };
    harvest_paired(models, items, &hs, dir, &|_| {})?;
    let st = PairedStore::open(dir)?;
    let x = st.all()?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(x)
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

    // --- novice vs expert pairs
    progress("persona pairs");
    let items: Vec<&persona_lens_analysis::PromptItem> = ds
        .items
        .iter()
        .filter(|i| i.class == "novice" || i.class == "expert")
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
    if diffs.is_empty() {
        return crate::invalid("no novice/expert prompt pairs in the dataset (ids must differ only in their last /class part)");
    }
    let cands = consistency(&diffs, spec.top_k);
    let row = |c: &Candidate| CandidateRow {
        candidate: c.clone(),
        rel_norm_diff: metrics.as_ref().map(|m| m.rel_norm_diff[c.feature_idx]),
        class: metrics.as_ref().map(|m| m.class[c.feature_idx]),
        decoder_cosine: metrics.as_ref().map(|m| m.cosine[c.feature_idx]),
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
                "Top {feature_type}s more active for novice users (mean ± sd over {} pairs)",
                diffs.len()
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
        let v = verify(c.feature_idx, &vp, &acts);
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

    let summary = Summary {
        base_model: models[0].info.name.clone(),
        chat_model: models[1].info.name.clone(),
        hooks: spec.hooks.iter().map(|h| h.to_string()).collect(),
        chat_template: spec.chat_template.to_vec(),
        alignment: Alignment::Last,
        dataset: ds.source.clone(),
        dataset_hash: ds.hash(),
        n_pairs_analyzed: diffs.len(),
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
    persona_lens_engine::io::write_atomic(&out.join("report.md"), report_md(&summary).as_bytes())?;
    Ok(summary)
}

/// A short Markdown report written from the numbers.
pub fn report_md(s: &Summary) -> String {
    let mut r = String::new();
    r.push_str(&format!(
        "# Model diffing: {} (base) vs {} (chat)\n\nHooks {} / {}; {} novice/expert pairs; features: {}s ({}).\n\n",
        s.base_model, s.chat_model, s.hooks[0], s.hooks[1], s.n_pairs_analyzed, s.feature_type, s.units
    ));
    if let Some(c) = &s.latent_classes {
        r.push_str("## Latent classes\n\n| class | latents |\n|---|---:|\n");
        for (k, v) in &c.counts {
            r.push_str(&format!("| {k} | {v} |\n"));
        }
        if let Some(m) = c.shared_cosine_median {
            r.push_str(&format!(
                "\nShared latents' decoder cosine: median {m:.3}.\n"
            ));
        }
        let cs = s.latent_scaling.iter().filter(|l| l.chat_specific).count();
        r.push_str(&format!(
            "\nLatent Scaling over {} chat-only latents: {cs} chat-specific (|ν^ε| < 0.3 and |ν^r| < 0.3 with β_chat > 0, targets as in Minder et al.'s compute_scalers.py).\n\n",
            s.latent_scaling.len()
        ));
    }
    r.push_str(&format!("## Top candidate 'user is a novice' {}s\n\n| {} | mean (novice − expert) | sd | pairs > 0 | in top-k | t | Δ_norm | class |\n|---:|---:|---:|---:|---:|---:|---:|---|\n", s.feature_type, s.feature_type));
    for c in s.top_candidates.iter().take(10) {
        r.push_str(&format!(
            "| {} | {:.4} | {:.4} | {:.2} | {}/{} | {:.1} | {} | {} |\n",
            c.candidate.feature_idx,
            c.candidate.mean_score,
            c.candidate.std_score,
            c.candidate.frac_positive,
            c.candidate.n_pairs_top_k,
            c.candidate.n_pairs,
            c.candidate.t,
            c.rel_norm_diff
                .map(|v| format!("{v:.3}"))
                .unwrap_or("-".into()),
            c.class.map(|v| v.name().to_string()).unwrap_or("-".into()),
        ));
    }
    for v in &s.verification {
        r.push_str(&format!(
            "\n## Verification of {} #{}: {}/{} pass\n\n| expected | activation | pass | prompt |\n|---|---:|---|---|\n",
            s.feature_type, v.feature_idx, v.passed, v.checked
        ));
        for row in &v.rows {
            r.push_str(&format!(
                "| {} | {:.4} | {} | {} |\n",
                row.expected,
                row.activation,
                match row.pass {
                    Some(true) => "pass",
                    Some(false) => "FAIL",
                    None => "-",
                },
                row.prompt
            ));
        }
    }
    r.push_str(&format!(
        "\n## Sycophancy triggers ({} biased/neutral pairs)\n\n",
        s.n_sycophancy_pairs
    ));
    for c in s.sycophancy_top.iter().take(5) {
        r.push_str(&format!(
            "- {} {}: mean (biased − neutral) {:.4}, sd {:.4}, positive in {:.0} % of pairs\n",
            s.feature_type,
            c.feature_idx,
            c.mean_score,
            c.std_score,
            100.0 * c.frac_positive
        ));
    }
    r
}
