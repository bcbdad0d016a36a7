//! Multi-turn analyses: the saved probes' read-outs at every token of each conversation of a
//! conversations file, and belief revision where a conversation names a contradicting cue.

use crate::engine_jobs::{load_model, progress};
use crate::ModelArgs;
use anyhow::Result;
use clap::Args;
use persona_lens_analysis::user_model::{
    answer_with_readouts, belief_revision, load_probe_dir, rate_answer, steer_vector,
    steering_norm, trajectory, AttributeInfo, BeliefRevision, ConversationSet, ProbeWeights,
    RatedAnswer, Reader, SteerSpec, Trajectory,
};
use persona_lens_analysis::write_json;
use persona_lens_engine::Model;
use persona_lens_report::{save_line_chart, LineChart, Series};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Args, Clone, Debug)]
pub struct ConversationArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Conversations file: {"conversations": [{"id", "turns": [{"role", "content"}],
    /// "cue_turn"?, "cue_class"?}]} (the dashboard's export writes one).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Probe weights: a probe_weights.json, or a folder holding one (or one per subfolder),
    /// as `persona-lens probe --out` writes.
    #[arg(long)]
    pub probes: PathBuf,
    /// Read at this residual row (e.g. blocks.10.hook_resid_pre) instead of each probe file's
    /// selected row.
    #[arg(long)]
    pub hook: Option<String>,
    /// One-token text that replaces the cue's tokens in belief revision's filler run.
    #[arg(long, default_value = ".")]
    pub filler: String,
    /// Also answer each conversation that ends with a user turn (greedy, the model's next
    /// turn), with the read-outs at every generated token: answers.json.
    #[arg(long)]
    pub answer: bool,
    /// Steer the answers along an attribute's persona direction: ATTRIBUTE=STRENGTH[@ROW]
    /// (strength in mean residual norms of the row; default row: the one the attribute is read
    /// at); repeatable. The unsteered answer is written beside each steered one.
    #[arg(long, requires = "answer")]
    pub steer: Vec<SteerSpec>,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 96, value_parser = crate::at_least_one)]
    pub max_new_tokens: usize,
    /// Output directory.
    #[arg(long, default_value = "out/conversation")]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// What `conversation` writes: `trajectories.json` and `belief_revision.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversationResult {
    pub model: String,
    pub attributes: Vec<AttributeInfo>,
    pub trajectories: Vec<Trajectory>,
    /// One per (conversation with a cue, attribute that has the cue's class).
    pub revisions: Vec<BeliefRevision>,
    /// With `--answer`: one per conversation that ends with a user turn.
    pub answers: Vec<ConversationAnswer>,
}

/// The model's answer to a conversation (the dashboard's answer, reproduced).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversationAnswer {
    pub id: String,
    pub steer: Vec<SteerSpec>,
    pub answer: RatedAnswer,
    /// `[generated token][attribute][class]`: the read-outs at each answer token's position.
    pub proba: Vec<Vec<Vec<f64>>>,
    /// The unsteered answer, when steered.
    pub unsteered: Option<RatedAnswer>,
}

/// The inputs, read and checked before any model loads.
pub struct ConversationInputs {
    pub set: ConversationSet,
    pub probes: Vec<ProbeWeights>,
}

pub fn read_inputs(a: &ConversationArgs) -> Result<ConversationInputs> {
    let set = ConversationSet::load(&a.dataset)?;
    let probes = load_probe_dir(&a.probes)?;
    for st in &a.steer {
        if !probes.iter().any(|w| w.attribute == st.attribute) {
            anyhow::bail!(
                "--steer {st}: no attribute '{}' in the probes; they know: {}",
                st.attribute,
                probes
                    .iter()
                    .map(|w| w.attribute.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    if a.answer
        && !set
            .conversations
            .iter()
            .any(|c| c.turns.last().is_some_and(|t| t.role == "user"))
    {
        anyhow::bail!(
            "--answer: no conversation ends with a user turn, so there is nothing to answer"
        );
    }
    persona_lens_engine::io::check_output_dir(&a.out)?;
    Ok(ConversationInputs { set, probes })
}

/// Trajectories of every conversation and belief revision of those with a cue.
pub fn run_conversation(
    model: &Model,
    a: &ConversationArgs,
    inputs: &ConversationInputs,
    quiet: bool,
) -> Result<ConversationResult> {
    let readers = Reader::for_model(model, &inputs.probes, a.hook.as_deref())?;
    let convs = &inputs.set.conversations;
    let pb = progress(convs.len() as u64, quiet, "conversations read");
    let mut trajectories = Vec::new();
    let mut revisions = Vec::new();
    for c in convs {
        trajectories.push(trajectory(model, c, &readers)?);
        if let (Some(_), Some(class)) = (c.cue_turn, &c.cue_class) {
            for (r, _) in readers.iter().filter(|(r, _)| r.classes.contains(class)) {
                revisions.push(belief_revision(model, c, r, &a.filler)?);
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let mut answers = Vec::new();
    if a.answer {
        let mut steer = Vec::new();
        for spec in &a.steer {
            steer.extend(steer_vector(model, &inputs.probes, spec, &mut |h| {
                steering_norm(model, h)
            })?);
        }
        let rs: Vec<Reader> = readers.iter().map(|(r, _)| r.clone()).collect();
        for c in convs
            .iter()
            .filter(|c| c.turns.last().is_some_and(|t| t.role == "user"))
        {
            let ans =
                answer_with_readouts(model, &c.turns, a.max_new_tokens, &steer, &rs, &mut |_| {
                    true
                })?;
            let unsteered = if steer.is_empty() {
                None
            } else {
                let plain =
                    answer_with_readouts(model, &c.turns, a.max_new_tokens, &[], &[], &mut |_| {
                        true
                    })?;
                Some(rate_answer(model, &plain)?)
            };
            answers.push(ConversationAnswer {
                id: c.id.clone(),
                steer: a.steer.clone(),
                answer: rate_answer(model, &ans)?,
                proba: ans.steps.iter().map(|s| s.proba.clone()).collect(),
                unsteered,
            });
        }
    }
    Ok(ConversationResult {
        model: model.info.name.clone(),
        attributes: readers.into_iter().map(|(_, i)| i).collect(),
        trajectories,
        revisions,
        answers,
    })
}

/// One line per attribute: P(last class) at every token, turn starts as the x ticks' story.
pub fn trajectory_plot(t: &Trajectory, stem: &Path) -> Result<Vec<PathBuf>> {
    let x: Vec<f64> = (0..t.tokens.len()).map(|p| p as f64).collect();
    let series = t
        .attributes
        .iter()
        .enumerate()
        .map(|(k, a)| Series {
            name: format!(
                "P({}) [{} @ {}]",
                a.classes[a.classes.len() - 1],
                a.attribute,
                a.hook
            ),
            x: x.clone(),
            y: t.proba.iter().map(|p| p[k][p[k].len() - 1]).collect(),
            ..Default::default()
        })
        .collect();
    let turns: Vec<String> = t
        .turn_starts
        .iter()
        .zip(&t.roles)
        .map(|(s, r)| format!("{r}@{s}"))
        .collect();
    let chart = LineChart {
        title: format!("User-model read-out over conversation '{}'", t.id),
        x_label: "token position (chat template)".into(),
        y_label: "probability".into(),
        series,
        y_range: Some((0.0, 1.02)),
        hline: Some((0.5, "0.5".into())),
        caption: format!("model {} | turns {}", t.model, turns.join(" ")),
    };
    Ok(save_line_chart(&chart, stem)?)
}

pub fn conversation(a: ConversationArgs) -> Result<()> {
    let inputs = read_inputs(&a)?;
    let model = load_model(&a.model)?;
    let quiet = a.quiet || a.model.json;
    let r = run_conversation(&model, &a, &inputs, quiet)?;
    write_json(&a.out.join("trajectories.json"), &r.trajectories)?;
    write_json(&a.out.join("belief_revision.json"), &r.revisions)?;
    if a.answer {
        write_json(&a.out.join("answers.json"), &r.answers)?;
    }
    for t in &r.trajectories {
        trajectory_plot(t, &a.out.join(format!("trajectory_{}", file_stem(&t.id))))?;
    }
    if a.model.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    for i in &r.attributes {
        println!(
            "attribute {} ({}) read at {} [{}]",
            i.attribute,
            i.classes.join(" vs "),
            i.hook,
            i.selected_by
        );
    }
    for t in &r.trajectories {
        let last = t.proba.last().cloned().unwrap_or_default();
        let reads: Vec<String> = r
            .attributes
            .iter()
            .zip(&last)
            .map(|(a, p)| {
                format!(
                    "P({})={:.3}",
                    a.classes[a.classes.len() - 1],
                    p[p.len() - 1]
                )
            })
            .collect();
        println!(
            "{}: {} tokens, {} turns; at the last token {}",
            t.id,
            t.tokens.len(),
            t.turn_starts.len(),
            reads.join(", ")
        );
    }
    for v in &r.revisions {
        let cross = v
            .tokens_to_crossover
            .map(|n| format!("{n} tokens after the cue starts"))
            .unwrap_or_else(|| "never (the read-out does not settle on it)".into());
        let half = v
            .rows
            .iter()
            .find(|x| x.restored < 0.5)
            .map(|x| x.hook.clone())
            .unwrap_or_else(|| "none".into());
        println!(
            "{} [{}]: P({}) {:.3} before the cue -> {:.3} at the end ({:.3} with the cue's tokens replaced by '{}'); crossover {cross}; first row where patching the cue's positions restores under half: {half}",
            v.id, v.attribute, v.cue_class, v.before, v.after, v.after_filler, v.filler
        );
    }
    for x in &r.answers {
        let g = |v: Option<f64>| v.map(|g| format!("{g:.1}")).unwrap_or_else(|| "n/a".into());
        println!(
            "{} answer ({} tokens, grade {}{}): {}",
            x.id,
            x.answer.n_tokens,
            g(x.answer.grade),
            x.unsteered
                .as_ref()
                .map(|u| format!(", unsteered grade {}", g(u.grade)))
                .unwrap_or_default(),
            x.answer.text.replace('\n', " ")
        );
    }
    println!(
        "wrote {}/trajectories.json, belief_revision.json{} and trajectory_*.png/.svg",
        a.out.display(),
        if a.answer { ", answers.json" } else { "" }
    );
    Ok(())
}

/// A conversation id as a file name part.
fn file_stem(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
