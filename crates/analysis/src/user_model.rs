//! The model's picture of its user over a conversation: probes saved as a loadable artifact
//! (`probe_weights.json`), their read-outs at every token of a multi-turn conversation
//! ([`trajectory`]), belief revision after a contradicting cue ([`belief_revision`]), and
//! generation that reports the read-outs token by token with steering along persona directions
//! ([`ChatRun`], what the dashboard streams).

use crate::probe::{LogReg, ProbeReport};
use crate::steering::{add_steering, SteerOp, SteerPositions};
use crate::{AnalysisError, Result};
use candle_core::{DType, Tensor};
use persona_lens_engine::tokenizer::ChatMessage;
use persona_lens_engine::{
    Batch, HookCtx, HookName, Hooks, KvCache, LogitsAt, Model, Op, Selector,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `format` of a probe weights file.
pub const PROBE_WEIGHTS_FORMAT: &str = "persona-lens-probe-weights/1";
/// The file `probe` writes beside `probe.json`.
pub const PROBE_WEIGHTS_FILE: &str = "probe_weights.json";

/// One residual row's probe, fitted on every training prompt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SavedProbe {
    pub hook: String,
    pub fit: LogReg,
    /// Mean raw activation per class (`[class][d]`) over the training prompts.
    pub class_means: Vec<Vec<f64>>,
    /// Stratified CV accuracy on every prompt (from `probe.json`).
    pub cv_accuracy: f64,
    /// CV accuracy within the selection split (what chose `selected_hook`), if the dataset
    /// had splits.
    pub select_accuracy: Option<f64>,
}

impl SavedProbe {
    /// Class probabilities of one activation row.
    pub fn proba(&self, row: &[f32]) -> Vec<f64> {
        let r: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        self.fit.proba(&r)
    }

    /// The persona direction of this row: last class mean minus first class mean (raw units).
    pub fn persona_direction(&self) -> Vec<f32> {
        let (first, last) = (
            &self.class_means[0],
            &self.class_means[self.class_means.len() - 1],
        );
        last.iter()
            .zip(first)
            .map(|(a, b)| (a - b) as f32)
            .collect()
    }
}

/// A user attribute's probes for every residual row (`probe_weights.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeWeights {
    pub format: String,
    /// What the probes read, e.g. `novice/expert`.
    pub attribute: String,
    pub classes: Vec<String>,
    pub model: String,
    /// Width of the residual rows the probes read.
    pub d_model: usize,
    pub position_rule: String,
    /// Whether the training prompts were rendered with the chat template.
    pub chat: bool,
    pub dataset_hash: String,
    /// The row a read-out uses unless told otherwise: the best CV accuracy within the
    /// selection split (or over all prompts when the dataset had no split).
    pub selected_hook: String,
    pub selected_by: String,
    pub probes: Vec<SavedProbe>,
}

impl ProbeWeights {
    /// The artifact of a probe run (every row's full fit and class means).
    pub fn from_report(r: &ProbeReport, chat: bool) -> Result<Self> {
        let mut probes = Vec::new();
        for l in &r.layers {
            let fit = l.fit.clone().ok_or_else(|| {
                AnalysisError::Invalid(format!(
                    "the probe of {} has no fitted weights (a probe.json read back?)",
                    l.hook
                ))
            })?;
            probes.push(SavedProbe {
                hook: l.hook.clone(),
                fit,
                class_means: l.class_means.clone(),
                cv_accuracy: l.cv.accuracy,
                select_accuracy: l.generalization.select_cv.as_ref().map(|m| m.accuracy),
            });
        }
        let by_select = probes.iter().all(|p| p.select_accuracy.is_some());
        let score = |p: &SavedProbe| {
            if by_select {
                p.select_accuracy.unwrap_or(0.0)
            } else {
                p.cv_accuracy
            }
        };
        // The first row among equals: the earliest layer that reads the attribute this well.
        let best = probes
            .iter()
            .fold(None::<&SavedProbe>, |b, p| match b {
                Some(b) if score(b) >= score(p) => Some(b),
                _ => Some(p),
            })
            .ok_or_else(|| AnalysisError::Invalid("a probe run with no rows".into()))?;
        Ok(ProbeWeights {
            format: PROBE_WEIGHTS_FORMAT.into(),
            attribute: r.classes.join("/"),
            classes: r.classes.clone(),
            model: r.model.clone(),
            d_model: best.fit.d,
            position_rule: r.position_rule.clone(),
            chat,
            dataset_hash: r.dataset_hash.clone(),
            selected_hook: best.hook.clone(),
            selected_by: if by_select {
                "cv accuracy within the selection split".into()
            } else {
                "cv accuracy over all prompts (the dataset had no selection split)".into()
            },
            probes,
        })
    }

    /// Reads and checks a probe weights file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            AnalysisError::Invalid(format!("cannot read probe weights {}: {e}", path.display()))
        })?;
        let w: ProbeWeights = serde_json::from_str(&text).map_err(|e| {
            AnalysisError::Invalid(format!(
                "{} is not a probe weights file ({e}); write one with `persona-lens probe`",
                path.display()
            ))
        })?;
        w.check().map_err(|e| {
            AnalysisError::Invalid(format!("probe weights {}: {e}", path.display()))
        })?;
        Ok(w)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.format != PROBE_WEIGHTS_FORMAT {
            return Err(format!(
                "format '{}', expected '{PROBE_WEIGHTS_FORMAT}'",
                self.format
            ));
        }
        let c = self.classes.len();
        if c < 2 {
            return Err("fewer than two classes".into());
        }
        for p in &self.probes {
            let f = &p.fit;
            let ok = f.n_classes == c
                && f.d == self.d_model
                && f.w.len() == c * f.d
                && f.b.len() == c
                && f.mean.len() == f.d
                && f.scale.len() == f.d
                && p.class_means.len() == c
                && p.class_means.iter().all(|m| m.len() == f.d);
            if !ok {
                return Err(format!("the probe of {} has inconsistent shapes", p.hook));
            }
            let finite =
                f.w.iter()
                    .chain(&f.b)
                    .chain(&f.mean)
                    .chain(&f.scale)
                    .all(|v| v.is_finite());
            if !finite || f.scale.contains(&0.0) {
                return Err(format!("the probe of {} has non-finite weights", p.hook));
            }
        }
        if self.at(&self.selected_hook).is_none() {
            return Err(format!("selected hook {} has no probe", self.selected_hook));
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::write_json(path, self)
    }

    pub fn at(&self, hook: &str) -> Option<&SavedProbe> {
        self.probes.iter().find(|p| p.hook == hook)
    }

    pub fn selected(&self) -> &SavedProbe {
        self.at(&self.selected_hook)
            .expect("checked when loaded or built")
    }
}

/// Every probe weights file at `path`: the file itself, or `probe_weights.json` in the folder
/// and in its direct subfolders (so `--probes out` finds `out/*/probe_weights.json`).
pub fn load_probe_dir(path: &Path) -> Result<Vec<ProbeWeights>> {
    if path.is_file() {
        return Ok(vec![ProbeWeights::load(path)?]);
    }
    if !path.is_dir() {
        return Err(AnalysisError::Invalid(format!(
            "probes {}: no such file or folder; point it at the output folder of a probe run",
            path.display()
        )));
    }
    let mut files: Vec<PathBuf> = vec![path.join(PROBE_WEIGHTS_FILE)];
    let mut subs: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| AnalysisError::Invalid(format!("reading {}: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .map(|p| p.join(PROBE_WEIGHTS_FILE))
        .collect();
    subs.sort();
    files.extend(subs);
    let out: Vec<ProbeWeights> = files
        .iter()
        .filter(|f| f.is_file())
        .map(|f| ProbeWeights::load(f))
        .collect::<Result<_>>()?;
    if out.is_empty() {
        return Err(AnalysisError::Invalid(format!(
            "probes {}: no {PROBE_WEIGHTS_FILE} there or one folder down; run the probes into {} first",
            path.display(),
            path.display()
        )));
    }
    Ok(out)
}

/// One attribute read at one row: what a read-out needs at run time.
#[derive(Debug, Clone)]
pub struct Reader {
    pub attribute: String,
    pub classes: Vec<String>,
    pub hook: HookName,
    pub probe: SavedProbe,
}

/// Attribute names as the page and the trajectory files show them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttributeInfo {
    pub attribute: String,
    pub classes: Vec<String>,
    pub hook: String,
    pub selected_by: String,
    /// The probes' training prompts used the chat template (a read-out of a chat conversation
    /// with probes trained on plain prompts is off their training distribution).
    pub trained_on_chat: bool,
}

impl Reader {
    /// Readers for these weights on `model`, at each file's selected row or at `hook`.
    pub fn for_model(
        model: &Model,
        weights: &[ProbeWeights],
        hook: Option<&str>,
    ) -> Result<Vec<(Reader, AttributeInfo)>> {
        let d = model.config().d_model;
        let mut names = BTreeSet::new();
        weights
            .iter()
            .map(|w| {
                if w.d_model != d {
                    return Err(AnalysisError::Invalid(format!(
                        "probes '{}' read {}-wide rows of {}, this model's rows are {d} wide: train them on this model",
                        w.attribute, w.d_model, w.model
                    )));
                }
                if !names.insert(w.attribute.clone()) {
                    return Err(AnalysisError::Invalid(format!(
                        "two probe files read the same attribute '{}': keep one",
                        w.attribute
                    )));
                }
                let probe = match hook {
                    Some(h) => w.at(h).ok_or_else(|| {
                        AnalysisError::Invalid(format!(
                            "probes '{}' have no row {h}; pick one of {}",
                            w.attribute,
                            w.probes.iter().map(|p| p.hook.as_str()).collect::<Vec<_>>().join(", ")
                        ))
                    })?,
                    None => w.selected(),
                };
                let hook_name = HookName::parse(&probe.hook, model.config().n_layers)?;
                Ok((
                    Reader {
                        attribute: w.attribute.clone(),
                        classes: w.classes.clone(),
                        hook: hook_name,
                        probe: probe.clone(),
                    },
                    AttributeInfo {
                        attribute: w.attribute.clone(),
                        classes: w.classes.clone(),
                        hook: probe.hook.clone(),
                        selected_by: if hook.is_some() {
                            "chosen by the user".into()
                        } else {
                            w.selected_by.clone()
                        },
                        trained_on_chat: w.chat,
                    },
                ))
            })
            .collect()
    }
}

/// Class probabilities per attribute for each position of one row of a forward's captures:
/// `[position][attribute][class]`.
fn read_rows(hooks: &Hooks, readers: &[Reader], row: usize) -> Result<Vec<Vec<Vec<f64>>>> {
    let mut per_reader: Vec<Vec<Vec<f64>>> = Vec::with_capacity(readers.len());
    for r in readers {
        let a = hooks.cache.get(&r.hook)?.get(row)?.to_dtype(DType::F32)?;
        let rows = a.to_vec2::<f32>()?;
        per_reader.push(rows.iter().map(|x| r.probe.proba(x)).collect());
    }
    let t = per_reader.first().map(Vec::len).unwrap_or(0);
    Ok((0..t)
        .map(|p| per_reader.iter().map(|v| v[p].clone()).collect())
        .collect())
}

// ---------------------------------------------------------------- conversations

/// A multi-turn conversation (the `conversations` dataset schema, one entry).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Conversation {
    pub id: String,
    pub turns: Vec<ChatMessage>,
    /// The user turn that contradicts what came before (e.g. "Actually, I'm a physicist"), for
    /// belief revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cue_turn: Option<usize>,
    /// The class the cue claims, for belief revision (a class of the attribute read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cue_class: Option<String>,
}

/// A conversations dataset file: `{"conversations": [{"id", "turns": [{"role", "content"}],
/// "cue_turn"?, "cue_class"?}]}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ConversationSet {
    pub conversations: Vec<Conversation>,
}

impl Conversation {
    /// Roles are system / user / assistant, no turn is empty, the cue is a user turn.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| {
            Err(AnalysisError::Dataset(format!(
                "conversation '{}': {m}",
                self.id
            )))
        };
        if self.turns.is_empty() {
            return bad("no turns".into());
        }
        for (i, t) in self.turns.iter().enumerate() {
            if !matches!(t.role.as_str(), "system" | "user" | "assistant") {
                return bad(format!(
                    "turn {i} has role '{}'; use system, user or assistant",
                    t.role
                ));
            }
            if t.content.trim().is_empty() {
                return bad(format!("turn {i} is empty"));
            }
        }
        if let Some(c) = self.cue_turn {
            match self.turns.get(c) {
                Some(t) if t.role == "user" => {}
                Some(_) => return bad(format!("cue_turn {c} is not a user turn")),
                None => return bad(format!("cue_turn {c} but only {} turns", self.turns.len())),
            }
        }
        Ok(())
    }
}

impl ConversationSet {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AnalysisError::Dataset(format!("cannot read {}: {e}", path.display())))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        let set: ConversationSet = serde_path_to_error::deserialize(de).map_err(|e| {
            AnalysisError::Dataset(format!(
                "{}: not a conversations file at {} ({}); expected {{\"conversations\": [{{\"id\", \"turns\": [{{\"role\", \"content\"}}]}}]}}",
                path.display(),
                e.path(),
                e.inner()
            ))
        })?;
        set.check()?;
        Ok(set)
    }

    pub fn check(&self) -> Result<()> {
        if self.conversations.is_empty() {
            return Err(AnalysisError::Dataset("no conversations".into()));
        }
        let mut ids = BTreeSet::new();
        for c in &self.conversations {
            c.check()?;
            if !ids.insert(&c.id) {
                return Err(AnalysisError::Dataset(format!(
                    "conversation id '{}' appears twice",
                    c.id
                )));
            }
        }
        Ok(())
    }
}

/// A conversation rendered with the chat template: token ids and, per token, its turn.
#[derive(Debug, Clone)]
pub struct RenderedConversation {
    pub ids: Vec<u32>,
    /// Index of the turn each token belongs to (tokens of the template's own framing after
    /// the last turn, such as the generation prompt, count as turn `turns.len()`).
    pub turn_of: Vec<usize>,
    /// First token of each turn.
    pub turn_starts: Vec<usize>,
}

/// Renders `turns` with the model's chat template (with the generation prompt when
/// `for_answer`) and maps each token to its turn by rendering the turns' prefixes: the
/// template must render a conversation's prefix as a prefix of its text.
pub fn render_conversation(
    model: &Model,
    turns: &[ChatMessage],
    for_answer: bool,
) -> Result<RenderedConversation> {
    let tk = &model.tokenizer;
    let full = tk.apply_chat_template(turns, for_answer)?;
    let mut bounds = Vec::with_capacity(turns.len());
    for k in 1..=turns.len() {
        let prefix = tk.apply_chat_template(&turns[..k], false)?;
        if !full.starts_with(&prefix) {
            return Err(AnalysisError::Invalid(
                "this chat template does not render a conversation's first turns as a prefix of the whole; turns cannot be told apart".into(),
            ));
        }
        bounds.push(prefix.len());
    }
    let (ids, offs) = tk.encode_with_offsets(&full, false)?;
    if ids.is_empty() {
        return Err(AnalysisError::Invalid(
            "the conversation renders to no tokens".into(),
        ));
    }
    let turn_of: Vec<usize> = offs
        .iter()
        .map(|&(a, _)| bounds.iter().position(|&b| a < b).unwrap_or(turns.len()))
        .collect();
    let turn_starts = (0..turns.len())
        .map(|k| turn_of.iter().position(|&t| t >= k).unwrap_or(ids.len()))
        .collect();
    Ok(RenderedConversation {
        ids,
        turn_of,
        turn_starts,
    })
}

/// Read-outs at every token of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trajectory {
    pub id: String,
    pub model: String,
    pub attributes: Vec<AttributeInfo>,
    /// Each token's text as the tokenizer writes it.
    pub tokens: Vec<String>,
    pub turn_of: Vec<usize>,
    pub turn_starts: Vec<usize>,
    pub roles: Vec<String>,
    /// `[position][attribute][class]` probabilities.
    pub proba: Vec<Vec<Vec<f64>>>,
}

/// The probes' read-outs at every token of `conv` (rendered with the chat template, one forward).
pub fn trajectory(
    model: &Model,
    conv: &Conversation,
    readers: &[(Reader, AttributeInfo)],
) -> Result<Trajectory> {
    conv.check()?;
    let r = render_conversation(model, &conv.turns, false)?;
    let rs: Vec<Reader> = readers.iter().map(|(r, _)| r.clone()).collect();
    let proba = read_positions(model, &r.ids, &rs, &mut Hooks::new())?;
    Ok(Trajectory {
        id: conv.id.clone(),
        model: model.info.name.clone(),
        attributes: readers.iter().map(|(_, a)| a.clone()).collect(),
        tokens: r
            .ids
            .iter()
            .map(|&i| model.tokenizer.id_to_token(i))
            .collect(),
        turn_of: r.turn_of.clone(),
        turn_starts: r.turn_starts.clone(),
        roles: conv.turns.iter().map(|t| t.role.clone()).collect(),
        proba,
    })
}

/// One forward over `ids` with `hooks`' interventions, the readers' rows captured:
/// `[position][attribute][class]`.
fn read_positions(
    model: &Model,
    ids: &[u32],
    readers: &[Reader],
    hooks: &mut Hooks,
) -> Result<Vec<Vec<Vec<f64>>>> {
    let batch = Batch::left_padded(&[ids.to_vec()], model.pad_id(), model.device())?;
    for r in readers {
        hooks.capture(r.hook);
    }
    model.forward(&batch, None, hooks, LogitsAt::None)?;
    let out = read_rows(hooks, readers, 0)?;
    hooks.cache.clear();
    Ok(out)
}

/// Log-odds of class `k` against the rest.
fn log_odds(p: &[f64], k: usize) -> f64 {
    let pk = p[k].clamp(1e-12, 1.0 - 1e-12);
    (pk / (1.0 - pk)).ln()
}

/// One residual row's share of the cue's effect on the final read-out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RowRestoration {
    pub hook: String,
    /// (patched − filler) / (cue − filler) of the read-out's log-odds for the cue's class
    /// at the conversation's last token.
    pub restored: f64,
}

/// How the read-out moves after a contradicting cue, and where the update travels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BeliefRevision {
    pub id: String,
    pub attribute: String,
    pub hook: String,
    pub cue_turn: usize,
    pub cue_class: String,
    /// Token span `[start, end)` of the cue turn.
    pub cue_span: (usize, usize),
    /// P(cue class) at the last token before the cue turn, and at the conversation's last token.
    pub before: f64,
    pub after: f64,
    /// Tokens from the cue turn's first token until the read-out names the cue's class (its
    /// most probable class) and keeps naming it to the end; None if it never settles there.
    pub tokens_to_crossover: Option<usize>,
    /// The same conversation with the cue's tokens replaced by a filler token: P(cue class)
    /// at the last token.
    pub after_filler: f64,
    /// The filler token.
    pub filler: String,
    /// Per residual row up to the probe's: the cue run's activations at the cue's positions
    /// patched into the filler run. Early rows restore all of the cue's effect while the
    /// information sits at the cue's tokens; the rows where restoration falls are where later
    /// positions have read it.
    pub rows: Vec<RowRestoration>,
}

/// Belief revision in `conv` (which names its `cue_turn` and `cue_class`) for one attribute.
pub fn belief_revision(
    model: &Model,
    conv: &Conversation,
    reader: &Reader,
    filler: &str,
) -> Result<BeliefRevision> {
    conv.check()?;
    let (Some(cue_turn), Some(cue_class)) = (conv.cue_turn, conv.cue_class.clone()) else {
        return Err(AnalysisError::Dataset(format!(
            "conversation '{}' names no cue_turn and cue_class: belief revision needs both",
            conv.id
        )));
    };
    let k = reader
        .classes
        .iter()
        .position(|c| *c == cue_class)
        .ok_or_else(|| {
            AnalysisError::Dataset(format!(
                "conversation '{}': cue_class '{cue_class}' is not a class of '{}' ({})",
                conv.id,
                reader.attribute,
                reader.classes.join(", ")
            ))
        })?;
    if cue_turn == 0 {
        return Err(AnalysisError::Dataset(format!(
            "conversation '{}': the cue is the first turn; it has nothing to revise",
            conv.id
        )));
    }
    let r = render_conversation(model, &conv.turns, false)?;
    let (start, end) = (
        r.turn_starts[cue_turn],
        r.turn_of
            .iter()
            .rposition(|&t| t == cue_turn)
            .map(|p| p + 1)
            .unwrap_or(0),
    );
    if end <= start {
        return Err(AnalysisError::Invalid(format!(
            "conversation '{}': the cue turn has no tokens of its own",
            conv.id
        )));
    }
    let readers = std::slice::from_ref(reader);
    // One forward of the cue run: the read-outs at every position, and every residual row up to
    // the probe's for the patches below.
    let probe_row = crate::probe::resid_index_of(&reader.probe.hook).ok_or_else(|| {
        AnalysisError::Invalid(format!(
            "belief revision patches residual rows; the probe reads {}",
            reader.probe.hook
        ))
    })?;
    let rows: Vec<HookName> = crate::resid_rows(model.config().n_layers)
        .into_iter()
        .take(probe_row + 1)
        .collect();
    let batch = Batch::left_padded(std::slice::from_ref(&r.ids), model.pad_id(), model.device())?;
    let mut cap = Hooks::new();
    cap.capture_all(&rows);
    cap.capture(reader.hook);
    model.forward(&batch, None, &mut cap, LogitsAt::None)?;
    let clean = read_rows(&cap, readers, 0)?;
    let p = |v: &Vec<Vec<Vec<f64>>>, pos: usize| v[pos][0][k];
    let last = r.ids.len() - 1;
    let is_cue_class = |pos: usize| {
        let q = &clean[pos][0];
        (0..q.len()).all(|j| q[j] <= q[k])
    };
    let tokens_to_crossover = (start..=last)
        .find(|&pos| (pos..=last).all(is_cue_class))
        .map(|pos| pos - start);

    let filler_ids = model.tokenizer.encode(filler, false)?;
    let &[filler_id] = filler_ids.as_slice() else {
        return Err(AnalysisError::Invalid(format!(
            "filler '{filler}' is {} tokens; give text that is one token",
            filler_ids.len()
        )));
    };
    let mut corrupt = r.ids.clone();
    corrupt[start..end].iter_mut().for_each(|t| *t = filler_id);
    let filler_run = read_positions(model, &corrupt, readers, &mut Hooks::new())?;

    let (m_clean, m_filler) = (
        log_odds(&clean[last][0], k),
        log_odds(&filler_run[last][0], k),
    );
    let mut out_rows = Vec::with_capacity(rows.len());
    for h in &rows {
        let src = cap.cache.get(h)?.narrow(1, start, end - start)?;
        let f = Arc::new(
            move |x: &Tensor, ctx: &HookCtx| -> candle_core::Result<Tensor> {
                // Whole-prompt forward: index i is position i.
                debug_assert_eq!(ctx.position(0, 0), Some(0));
                let t = x.dim(1)?;
                let mut parts = vec![x.narrow(1, 0, start)?, src.to_dtype(x.dtype())?];
                if end < t {
                    parts.push(x.narrow(1, end, t - end)?);
                }
                Tensor::cat(&parts, 1)
            },
        );
        let mut hooks = Hooks::new();
        hooks.intervene(*h, Op::Func(f), Selector::all());
        let patched = read_positions(model, &corrupt, readers, &mut hooks)?;
        let m = log_odds(&patched[last][0], k);
        out_rows.push(RowRestoration {
            hook: h.to_string(),
            restored: (m - m_filler) / (m_clean - m_filler),
        });
    }
    Ok(BeliefRevision {
        id: conv.id.clone(),
        attribute: reader.attribute.clone(),
        hook: reader.probe.hook.clone(),
        cue_turn,
        cue_class,
        cue_span: (start, end),
        before: p(&clean, start - 1),
        after: p(&clean, last),
        tokens_to_crossover,
        after_filler: p(&filler_run, last),
        filler: filler.to_string(),
        rows: out_rows,
    })
}

// ---------------------------------------------------------------- live generation

/// A steering vector on for a whole answer (prompt and generated positions, each once
/// through the KV cache).
#[derive(Debug, Clone)]
pub struct Steer {
    pub hook: HookName,
    pub vector: Vec<f32>,
}

/// Largest steering strength, in units of the row's mean residual norm.
pub const MAX_STRENGTH: f64 = 8.0;

/// Steering along an attribute's persona direction, as a dashboard slider or `conversation
/// --steer ATTRIBUTE=STRENGTH[@ROW]` gives it: `strength` times the row's mean residual norm
/// along the unit persona direction (towards the attribute's last class when positive).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SteerSpec {
    pub attribute: String,
    /// Residual row (default: the row the attribute is read at).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    pub strength: f64,
}

impl std::str::FromStr for SteerSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (attribute, rest) = s.rsplit_once('=').ok_or_else(|| {
            format!("steer '{s}': write ATTRIBUTE=STRENGTH[@ROW], e.g. novice/expert=-0.5@blocks.15.hook_resid_pre")
        })?;
        let (strength, hook) = match rest.split_once('@') {
            Some((v, h)) => (v, Some(h.to_string())),
            None => (rest, None),
        };
        let strength: f64 = strength
            .trim()
            .parse()
            .map_err(|_| format!("steer '{s}': strength '{strength}' is not a number"))?;
        let spec = SteerSpec {
            attribute: attribute.trim().to_string(),
            hook,
            strength,
        };
        spec.check_strength()?;
        Ok(spec)
    }
}

impl std::fmt::Display for SteerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.attribute, self.strength)?;
        if let Some(h) = &self.hook {
            write!(f, "@{h}")?;
        }
        Ok(())
    }
}

impl SteerSpec {
    pub fn check_strength(&self) -> std::result::Result<(), String> {
        if !self.strength.is_finite() || self.strength.abs() > MAX_STRENGTH {
            return Err(format!(
                "strength {} for '{}': give a number in [-{MAX_STRENGTH}, {MAX_STRENGTH}]",
                self.strength, self.attribute
            ));
        }
        Ok(())
    }
}

/// Prompts that measure the residual norm steering is scaled by (content-neutral).
pub const NORM_PROMPTS: &[&str] = &[
    "Can you tell me how rain forms?",
    "What is a good way to learn a new language?",
    "Explain why the sky looks blue.",
    "How do plants make their food?",
];

/// Mean residual norm at `hook` over [`NORM_PROMPTS`] (steering's unit).
pub fn steering_norm(model: &Model, hook: HookName) -> Result<f64> {
    let chat = model.is_chat_model();
    let prompts: Vec<Vec<u32>> = NORM_PROMPTS
        .iter()
        .map(|p| model.encode_prompt(p, chat))
        .collect::<std::result::Result<_, _>>()?;
    crate::steering::mean_resid_norm(model, &prompts, hook)
}

/// The vector of `spec` (None for strength 0); `norm` gives a row's mean residual norm.
pub fn steer_vector(
    model: &Model,
    weights: &[ProbeWeights],
    spec: &SteerSpec,
    norm: &mut dyn FnMut(HookName) -> Result<f64>,
) -> Result<Option<Steer>> {
    spec.check_strength().map_err(AnalysisError::Invalid)?;
    let w = weights
        .iter()
        .find(|w| w.attribute == spec.attribute)
        .ok_or_else(|| {
            AnalysisError::Invalid(format!(
                "no attribute '{}' to steer along; the probes know: {}",
                spec.attribute,
                weights
                    .iter()
                    .map(|w| w.attribute.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    if spec.strength == 0.0 {
        return Ok(None);
    }
    let row = spec.hook.clone().unwrap_or_else(|| w.selected_hook.clone());
    let probe = w.at(&row).ok_or_else(|| {
        AnalysisError::Invalid(format!(
            "'{}' has no persona direction at {row}; pick a row its probes read",
            spec.attribute
        ))
    })?;
    let hook = HookName::parse(&row, model.config().n_layers)?;
    let dir = probe.persona_direction();
    let n = crate::steering::l2(&dir);
    if n == 0.0 {
        return Err(AnalysisError::Invalid(format!(
            "'{}' has a zero persona direction at {row}",
            spec.attribute
        )));
    }
    let scale = spec.strength * norm(hook)? / n;
    Ok(Some(Steer {
        hook,
        vector: dir.iter().map(|&v| (v as f64 * scale) as f32).collect(),
    }))
}

/// An answer with the autorater's measures.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RatedAnswer {
    pub text: String,
    pub n_tokens: usize,
    /// Flesch-Kincaid grade of the text.
    pub grade: Option<f64>,
    /// Perplexity of the answer under the unsteered model.
    pub perplexity: Option<f64>,
    /// Whether the model ended its turn (else it ran out of new tokens).
    pub ended_turn: bool,
}

pub fn rate_answer(model: &Model, a: &Answer) -> Result<RatedAnswer> {
    Ok(RatedAnswer {
        text: a.text.clone(),
        n_tokens: a.ids.len(),
        grade: persona_lens_rate::readability::complexity_grade(&a.text),
        perplexity: persona_lens_rate::perplexity(model, &a.prompt_ids, &a.ids)
            .map_err(|e| AnalysisError::Invalid(format!("perplexity: {e}")))?
            .map(|(_nll, ppl)| ppl),
        ended_turn: a.stopped,
    })
}

/// One generated token with the read-outs at its own position (computed when it is fed back).
#[derive(Debug, Clone, Serialize)]
pub struct TokenStep {
    pub id: u32,
    /// The text this token adds to the answer.
    pub text: String,
    /// `[attribute][class]`.
    pub proba: Vec<Vec<f64>>,
}

/// A finished answer.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    pub text: String,
    /// `[prompt position][attribute][class]`.
    pub prompt_proba: Vec<Vec<Vec<f64>>>,
    pub steps: Vec<TokenStep>,
    pub stopped: bool,
}

/// What [`answer_with_readouts`] reports while it runs.
pub enum AnswerEvent<'a> {
    /// The rendered conversation and its read-outs (`[position][attribute][class]`), once.
    Prompt(&'a RenderedConversation, &'a [Vec<Vec<f64>>]),
    /// Each generated token.
    Token(&'a TokenStep),
}

/// Greedy generation of the assistant's next turn with read-outs at every position, calling
/// `on_event` with the prompt's read-outs and then after each token (return false to stop: a
/// closed connection).
pub fn answer_with_readouts(
    model: &Model,
    turns: &[ChatMessage],
    max_new_tokens: usize,
    steer: &[Steer],
    readers: &[Reader],
    on_event: &mut dyn FnMut(AnswerEvent) -> bool,
) -> Result<Answer> {
    let r = render_conversation(model, turns, true)?;
    let max_pos = model.config().max_position;
    if r.ids.len() + max_new_tokens > max_pos {
        return Err(AnalysisError::Invalid(format!(
            "the conversation is {} tokens; with {max_new_tokens} new tokens it passes the context of {max_pos}: start a new conversation",
            r.ids.len()
        )));
    }
    let mut hooks = Hooks::new();
    for s in steer {
        let v = Tensor::from_vec(s.vector.clone(), s.vector.len(), model.device())?;
        add_steering(
            &mut hooks,
            s.hook,
            SteerOp::Add(v),
            SteerPositions::All,
            vec![r.ids.len()],
        )?;
    }
    for rd in readers {
        hooks.capture(rd.hook);
    }
    let batch = Batch::left_padded(std::slice::from_ref(&r.ids), model.pad_id(), model.device())?;
    let mut kv = KvCache::new(model.config().n_layers, batch.pad.clone());
    let mut logits = model
        .forward(&batch, Some(&mut kv), &mut hooks, LogitsAt::Last)?
        .ok_or_else(|| AnalysisError::Invalid("no logits".into()))?;
    let prompt_proba = read_rows(&hooks, readers, 0)?;
    hooks.cache.clear();
    let mut go_on = on_event(AnswerEvent::Prompt(&r, &prompt_proba));
    let (mut ids, mut steps, mut text) = (Vec::new(), Vec::new(), String::new());
    let mut stopped = false;
    for _ in 0..max_new_tokens {
        if !go_on {
            break;
        }
        let row = logits.get(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let tok = persona_lens_engine::generate::greedy_token(&row);
        if model.tokenizer.eos_ids.contains(&tok) {
            stopped = true;
            break;
        }
        ids.push(tok);
        let now = model.tokenizer.decode(&ids, true)?;
        let piece = now.strip_prefix(text.as_str()).unwrap_or(&now).to_string();
        text = now;
        // Feed the token back: its own position's read-out, and the next logits.
        let next = Batch {
            ids: Tensor::from_vec(vec![tok], (1, 1), model.device())?,
            pad: batch.pad.clone(),
            lens: vec![1],
        };
        logits = model
            .forward(&next, Some(&mut kv), &mut hooks, LogitsAt::Last)?
            .ok_or_else(|| AnalysisError::Invalid("no logits".into()))?;
        let proba = read_rows(&hooks, readers, 0)?.pop().unwrap_or_default();
        hooks.cache.clear();
        let step = TokenStep {
            id: tok,
            text: piece,
            proba,
        };
        go_on = on_event(AnswerEvent::Token(&step));
        steps.push(step);
    }
    Ok(Answer {
        prompt_ids: r.ids,
        ids,
        text,
        prompt_proba,
        steps,
        stopped,
    })
}
