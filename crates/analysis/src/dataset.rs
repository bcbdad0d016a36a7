//! The persona dataset: a built-in, versioned generator (persona pairs x topics x questions x
//! persona paraphrases, plus lexical controls and a belief family), its selection / evaluation
//! split, and a loader for user files in the schema of the crosscoder notes
//! (`prompt_pairs.expertise_level[]`, `prompt_pairs.sycophancy_triggers[]`).

use crate::{AnalysisError, Result};
use persona_lens_engine::Model;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

const BUILTIN: &str = include_str!("../data/persona_questions.json");

/// One prompt with everything an analysis needs to know about it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PromptItem {
    /// Unique id, e.g. `child-phd/physics/q03/p2/expert`.
    pub id: String,
    /// Persona pair (built-in) or the user file's pair id (`exp_001`).
    pub pair_id: String,
    pub topic: String,
    pub question_id: String,
    /// Persona paraphrase id (`p0`..; `c0`.. for lexical controls; `none` for bare questions),
    /// `user` for prompts from a file.
    pub template_id: String,
    /// `novice` | `expert` | `neutral` | `biased`.
    pub class: String,
    /// The persona's name (`child`, `phd`, ...; the class for file prompts).
    pub persona: String,
    pub text: String,
    /// Byte span of the persona phrase in `text` (None: no persona phrase, or unknown).
    pub persona_span: Option<(usize, usize)>,
    /// Byte span of the question in `text`.
    pub question_span: (usize, usize),
    /// A lexical control: keeps the other class's key tokens but means `class`
    /// ("I'm 5 years into my PhD" is an expert). Evaluation-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lexical_control: bool,
    /// The half this prompt belongs to after [`PersonaDataset::assign_splits`] (None: unassigned,
    /// or a cell of neither half).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
}

impl PromptItem {
    /// The question this prompt asks (`topic/question_id`): the cluster of every clustered test
    /// and the unit the splits halve.
    pub fn question_key(&self) -> String {
        format!("{}/{}", self.topic, self.question_id)
    }
}

/// Which half of the data an analysis looks at: `select` to fit, rank and choose, `evaluate` to
/// report. No question and no persona paraphrase is in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Select,
    Evaluate,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Select => "select",
            Split::Evaluate => "evaluate",
        })
    }
}

impl std::str::FromStr for Split {
    type Err = AnalysisError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "select" => Ok(Split::Select),
            "evaluate" => Ok(Split::Evaluate),
            other => Err(AnalysisError::Invalid(format!(
                "unknown split '{other}'; use select or evaluate"
            ))),
        }
    }
}

/// Half of `keys` (sorted, deduplicated, shuffled by `seed`; the first ceil(n/2)) for selection.
fn select_half(mut keys: Vec<String>, seed: u64) -> std::collections::HashSet<String> {
    use rand::{seq::SliceRandom, SeedableRng};
    keys.sort();
    keys.dedup();
    keys.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let half = keys.len().div_ceil(2);
    keys.into_iter().take(half).collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersonaDataset {
    /// `builtin:persona-lens-builtin-1` or the file path.
    pub source: String,
    pub items: Vec<PromptItem>,
}

impl PersonaDataset {
    /// sha256 of the items' canonical JSON: the dataset's identity in provenance records.
    pub fn hash(&self) -> String {
        let bytes = serde_json::to_vec(&self.items).unwrap_or_default();
        format!("{:x}", Sha256::digest(&bytes))[..16].to_string()
    }

    /// Items of the given classes (e.g. `["novice", "expert"]`), in order.
    pub fn with_classes(&self, classes: &[&str]) -> PersonaDataset {
        PersonaDataset {
            source: self.source.clone(),
            items: self
                .items
                .iter()
                .filter(|i| classes.contains(&i.class.as_str()))
                .cloned()
                .collect(),
        }
    }

    /// Marks every prompt with its split: questions (the cluster: topic + question id) are halved,
    /// and so are persona paraphrases when there are at least two; a prompt is `select` when both
    /// its question and its paraphrase are, `evaluate` when both are not, and in neither half
    /// otherwise. Lexical controls and bare questions follow their question, and only ever
    /// `evaluate` (they test, they never train).
    pub fn assign_splits(&mut self, seed: u64) {
        let question = PromptItem::question_key;
        // Bare questions (template `none`) and lexical controls only ever test.
        let plain = |i: &PromptItem| !i.lexical_control && i.template_id != "none";
        let q_sel = select_half(self.items.iter().map(question).collect(), seed);
        let paraphrases: Vec<String> = self
            .items
            .iter()
            .filter(|i| plain(i))
            .map(|i| i.template_id.clone())
            .collect();
        let n_para = {
            let mut p = paraphrases.clone();
            p.sort();
            p.dedup();
            p.len()
        };
        let p_sel = select_half(paraphrases, seed ^ 0x9e37_79b9);
        for it in &mut self.items {
            let q_in = q_sel.contains(&question(it));
            let p_in = if plain(it) && n_para >= 2 {
                Some(p_sel.contains(&it.template_id))
            } else if plain(it) {
                Some(q_in)
            } else {
                None
            };
            it.split = match (q_in, p_in) {
                (true, Some(true)) => Some(Split::Select),
                (false, Some(false)) | (false, None) => Some(Split::Evaluate),
                _ => None,
            };
        }
    }

    /// The prompts of one split (after [`Self::assign_splits`]).
    pub fn in_split(&self, split: Split) -> PersonaDataset {
        PersonaDataset {
            source: self.source.clone(),
            items: self
                .items
                .iter()
                .filter(|i| i.split == Some(split))
                .cloned()
                .collect(),
        }
    }

    pub fn class_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for i in &self.items {
            *m.entry(i.class.clone()).or_insert(0) += 1;
        }
        m
    }

    /// Fails unless each of `classes` has at least one item.
    pub fn require_classes(&self, classes: &[&str]) -> Result<()> {
        let counts = self.class_counts();
        for c in classes {
            if counts.get(*c).copied().unwrap_or(0) == 0 {
                return Err(AnalysisError::Dataset(format!(
                    "class '{c}' has no prompts in {} (classes present: {:?}); check the topics (pair_id), the persona pairs (persona_pair) or the file",
                    self.source,
                    counts.keys().collect::<Vec<_>>()
                )));
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct BuiltinFile {
    version: String,
    topics: BTreeMap<String, BuiltinTopic>,
    persona_pairs: BTreeMap<String, BuiltinPair>,
}
#[derive(Deserialize)]
struct BuiltinTopic {
    /// The topic's field word; no persona phrase may contain it (checked by the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    field: String,
    questions: Vec<String>,
}
#[derive(Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum PairKind {
    /// novice vs expert: generated unless pairs are named.
    Expertise,
    /// stated belief (`biased`) vs `neutral`: generated only when named.
    Belief,
}
#[derive(Deserialize)]
struct BuiltinPair {
    kind: PairKind,
    /// class -> persona; paraphrase k of every class shares its frame (placement, wording).
    personas: BTreeMap<String, BuiltinPersona>,
    lexical_controls: Vec<LexicalControl>,
}
#[derive(Deserialize)]
struct BuiltinPersona {
    name: String,
    /// Templates: `[persona phrase]` marks the persona span, `{question}` the question.
    paraphrases: Vec<String>,
}
/// A prompt that keeps the other class's key tokens but means `class`
/// ("I'm 5 years into my PhD" is an expert).
#[derive(Deserialize)]
struct LexicalControl {
    class: String,
    paraphrase: String,
}

fn builtin() -> BuiltinFile {
    serde_json::from_str(BUILTIN).expect("built-in dataset is valid JSON (checked by tests)")
}

/// What to generate from the built-in dataset.
#[derive(Debug, Clone, Default)]
pub struct GenOptions {
    /// Persona pairs (`child-phd`, ...); empty = every expertise pair (belief pairs only by name).
    pub persona_pairs: Vec<String>,
    /// Topics (`physics`, ...), the seed's `--pair-id`; empty = all.
    pub topics: Vec<String>,
    /// Questions per topic (0 = all).
    pub n_questions_per_pair: usize,
    /// Persona paraphrase indices (`--templates`); empty = all.
    pub templates: Vec<usize>,
    /// Also emit one `neutral` prompt (the bare question) per question of an expertise pair.
    pub include_neutral: bool,
    /// Also emit the lexical controls (marked `lexical_control`) per question.
    pub include_lexical_controls: bool,
}

/// Names of the built-in persona pairs, topics and the number of persona paraphrases
/// (the smallest over pairs and classes).
pub fn builtin_catalog() -> (String, Vec<String>, Vec<String>, usize) {
    let b = builtin();
    let n = n_paraphrases(&b);
    (
        b.version,
        b.persona_pairs.keys().cloned().collect(),
        b.topics.keys().cloned().collect(),
        n,
    )
}

/// Paraphrases every persona has (the smallest count over pairs and classes).
fn n_paraphrases(b: &BuiltinFile) -> usize {
    b.persona_pairs
        .values()
        .flat_map(|p| p.personas.values().map(|q| q.paraphrases.len()))
        .min()
        .unwrap_or(0)
}

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Fills a paraphrase template (`[persona]`, `{question}`), returning the text and the byte
/// spans of persona and question.
fn fill(template: &str, question: &str) -> (String, (usize, usize), (usize, usize)) {
    let mut text = String::new();
    let mut ps = (0, 0);
    let mut qs = (0, 0);
    let mut rest = template;
    loop {
        let next = [rest.find('['), rest.find("{question}")]
            .into_iter()
            .flatten()
            .min();
        let Some(i) = next else { break };
        text.push_str(&rest[..i]);
        if rest[i..].starts_with('[') {
            let j = rest[i..].find(']').map(|j| i + j).unwrap_or(rest.len());
            // Capitalise the persona phrase when it starts a sentence.
            let before = text.trim_end();
            let phrase = &rest[i + 1..j];
            let phrase = if before.is_empty() || before.ends_with(['.', '!', '?']) {
                upper_first(phrase)
            } else {
                phrase.to_string()
            };
            ps = (text.len(), text.len() + phrase.len());
            text.push_str(&phrase);
            rest = &rest[(j + 1).min(rest.len())..];
        } else {
            qs = (text.len(), text.len() + question.len());
            text.push_str(question);
            rest = &rest[i + "{question}".len()..];
        }
    }
    text.push_str(rest);
    (text, ps, qs)
}

/// Generates prompts from the built-in dataset.
pub fn generate(opts: &GenOptions) -> Result<PersonaDataset> {
    let b = builtin();
    let check = |what: &str, asked: &[String], known: Vec<&String>| -> Result<()> {
        for a in asked {
            if !known.contains(&a) {
                return Err(AnalysisError::Dataset(format!(
                    "unknown {what} '{a}'; known: {}",
                    known
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        Ok(())
    };
    check(
        "persona pair",
        &opts.persona_pairs,
        b.persona_pairs.keys().collect(),
    )?;
    check("topic (pair_id)", &opts.topics, b.topics.keys().collect())?;
    let n_paraphrases = n_paraphrases(&b);
    for &t in &opts.templates {
        if t >= n_paraphrases {
            return Err(AnalysisError::Dataset(format!(
                "paraphrase index {t} out of range (the built-in set has {n_paraphrases} persona paraphrases: 0..{})",
                n_paraphrases - 1
            )));
        }
    }
    let mut items = Vec::new();
    for (pair_id, pair) in &b.persona_pairs {
        let wanted = if opts.persona_pairs.is_empty() {
            pair.kind == PairKind::Expertise
        } else {
            opts.persona_pairs.contains(pair_id)
        };
        if !wanted {
            continue;
        }
        for (topic, t) in &b.topics {
            if !opts.topics.is_empty() && !opts.topics.contains(topic) {
                continue;
            }
            let nq = if opts.n_questions_per_pair == 0 {
                t.questions.len()
            } else {
                opts.n_questions_per_pair.min(t.questions.len())
            };
            for (qi, q) in t.questions.iter().take(nq).enumerate() {
                let qid = format!("q{qi:02}");
                let item =
                    |id: String, template_id: String, class: &str, persona: &str, tpl: &str| {
                        let (text, ps, qs) = fill(tpl, q);
                        PromptItem {
                            id,
                            pair_id: pair_id.clone(),
                            topic: topic.clone(),
                            question_id: qid.clone(),
                            template_id,
                            class: class.into(),
                            persona: persona.into(),
                            text,
                            persona_span: Some(ps),
                            question_span: qs,
                            lexical_control: false,
                            split: None,
                        }
                    };
                for ti in 0..n_paraphrases {
                    if !opts.templates.is_empty() && !opts.templates.contains(&ti) {
                        continue;
                    }
                    // Novice (or biased) first, as the pair's two classes are read in that order.
                    let mut classes: Vec<(&String, &BuiltinPersona)> =
                        pair.personas.iter().collect();
                    classes.sort_by_key(|(c, _)| !matches!(c.as_str(), "novice" | "biased"));
                    for (class, persona) in classes {
                        items.push(item(
                            format!("{pair_id}/{topic}/{qid}/p{ti}/{class}"),
                            format!("p{ti}"),
                            class,
                            &persona.name,
                            &persona.paraphrases[ti],
                        ));
                    }
                }
                if opts.include_lexical_controls {
                    for (ci, c) in pair.lexical_controls.iter().enumerate() {
                        let name = &pair.personas[&c.class].name;
                        let mut it = item(
                            format!("{pair_id}/{topic}/{qid}/c{ci}/{}", c.class),
                            format!("c{ci}"),
                            &c.class,
                            name,
                            &c.paraphrase,
                        );
                        it.lexical_control = true;
                        items.push(it);
                    }
                }
                if opts.include_neutral && pair.kind == PairKind::Expertise {
                    items.push(PromptItem {
                        id: format!("{pair_id}/{topic}/{qid}/neutral"),
                        pair_id: pair_id.clone(),
                        topic: topic.clone(),
                        question_id: qid.clone(),
                        template_id: "none".into(),
                        class: "neutral".into(),
                        persona: "neutral".into(),
                        text: q.clone(),
                        persona_span: None,
                        question_span: (0, q.len()),
                        lexical_control: false,
                        split: None,
                    });
                }
            }
        }
    }
    if items.is_empty() {
        return Err(AnalysisError::Dataset(
            "the selection matched no prompts; check the persona pairs (persona_pair) and topics (pair_id)".into(),
        ));
    }
    Ok(PersonaDataset {
        source: format!("builtin:{}", b.version),
        items,
    })
}

// ---- user files (schema of the crosscoder notes) ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFile {
    prompt_pairs: UserPairs,
}
#[derive(Deserialize)]
struct UserPairs {
    #[serde(default)]
    expertise_level: Vec<ExpertisePair>,
    #[serde(default)]
    sycophancy_triggers: Vec<SycophancyPair>,
}
#[derive(Deserialize)]
struct ExpertisePair {
    id: String,
    topic: String,
    novice: UserPrompt,
    expert: UserPrompt,
    #[serde(default)]
    neutral: Option<UserPrompt>,
}
#[derive(Deserialize)]
struct SycophancyPair {
    id: String,
    topic: String,
    biased: UserPrompt,
    neutral: UserPrompt,
}
/// `prompt` is required; `persona` / `question` (substrings of the prompt) are optional
/// persona-lens extensions that enable the `persona_mean` and `question_last_token` rules.
#[derive(Deserialize)]
struct UserPrompt {
    prompt: String,
    #[serde(default)]
    persona: Option<String>,
    #[serde(default)]
    question: Option<String>,
}

fn user_item(
    path: &str,
    pair_id: &str,
    topic: &str,
    class: &str,
    p: &UserPrompt,
    field: &str,
) -> Result<PromptItem> {
    if p.prompt.trim().is_empty() {
        return Err(AnalysisError::Dataset(format!(
            "{path}: {field}.prompt is empty"
        )));
    }
    let span = |sub: &Option<String>, name: &str| -> Result<Option<(usize, usize)>> {
        match sub {
            None => Ok(None),
            Some(s) => match p.prompt.find(s.as_str()) {
                Some(i) => Ok(Some((i, i + s.len()))),
                None => Err(AnalysisError::Dataset(format!(
                    "{path}: {field}.{name} '{s}' is not a substring of {field}.prompt"
                ))),
            },
        }
    };
    Ok(PromptItem {
        id: format!("{pair_id}/{class}"),
        pair_id: pair_id.into(),
        topic: topic.into(),
        question_id: pair_id.into(),
        template_id: "user".into(),
        class: class.into(),
        persona: class.into(),
        text: p.prompt.clone(),
        persona_span: span(&p.persona, "persona")?,
        question_span: span(&p.question, "question")?.unwrap_or((0, p.prompt.len())),
        lexical_control: false,
        split: None,
    })
}

/// Loads a user dataset file. Errors name the file and the JSON path of the bad field.
pub fn load_file(path: &Path) -> Result<PersonaDataset> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| AnalysisError::Dataset(format!("cannot read dataset {shown}: {e}")))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    let f: UserFile = serde_path_to_error::deserialize(de).map_err(|e| {
        AnalysisError::Dataset(format!("{shown}: field `{}`: {}", e.path(), e.inner()))
    })?;
    let mut items = Vec::new();
    for (i, p) in f.prompt_pairs.expertise_level.iter().enumerate() {
        let at = |c: &str| format!("prompt_pairs.expertise_level[{i}].{c}");
        items.push(user_item(
            &shown,
            &p.id,
            &p.topic,
            "novice",
            &p.novice,
            &at("novice"),
        )?);
        items.push(user_item(
            &shown,
            &p.id,
            &p.topic,
            "expert",
            &p.expert,
            &at("expert"),
        )?);
        if let Some(n) = &p.neutral {
            items.push(user_item(
                &shown,
                &p.id,
                &p.topic,
                "neutral",
                n,
                &at("neutral"),
            )?);
        }
    }
    for (i, p) in f.prompt_pairs.sycophancy_triggers.iter().enumerate() {
        let at = |c: &str| format!("prompt_pairs.sycophancy_triggers[{i}].{c}");
        items.push(user_item(
            &shown,
            &p.id,
            &p.topic,
            "biased",
            &p.biased,
            &at("biased"),
        )?);
        items.push(user_item(
            &shown,
            &p.id,
            &p.topic,
            "neutral",
            &p.neutral,
            &at("neutral"),
        )?);
    }
    let mut seen = std::collections::HashSet::new();
    for it in &items {
        if !seen.insert(it.id.clone()) {
            return Err(AnalysisError::Dataset(format!(
                "{shown}: duplicate pair id '{}'",
                it.pair_id
            )));
        }
    }
    if items.is_empty() {
        return Err(AnalysisError::Dataset(format!(
            "{shown}: no prompts (prompt_pairs.expertise_level and sycophancy_triggers are empty)"
        )));
    }
    Ok(PersonaDataset {
        source: shown,
        items,
    })
}

/// Keeps the items whose pair id or topic is in `ids` (the seed's `--pair-id physics`).
pub fn select_pairs(ds: PersonaDataset, ids: &[String]) -> Result<PersonaDataset> {
    if ids.is_empty() {
        return Ok(ds);
    }
    let mut topics: Vec<&str> = ds.items.iter().map(|i| i.topic.as_str()).collect();
    topics.sort();
    topics.dedup();
    let topics = topics.join(", ");
    let items: Vec<PromptItem> = ds
        .items
        .into_iter()
        .filter(|i| ids.contains(&i.pair_id) || ids.contains(&i.topic))
        .collect();
    if items.is_empty() {
        return Err(AnalysisError::Dataset(format!(
            "pair_id {} matched no prompt (it matches pair ids and topics; topics here: {topics})",
            ids.join(",")
        )));
    }
    Ok(PersonaDataset {
        source: ds.source,
        items,
    })
}

/// A prompt turned into token ids, with the positions that matter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncodedPrompt {
    pub ids: Vec<u32>,
    /// Token positions `[start, end)` of the persona phrase.
    pub persona_tokens: Option<(usize, usize)>,
    /// Position of the question's last token.
    pub question_last_token: usize,
    /// Position of the last prompt token (what the model reads before answering).
    pub last: usize,
}

/// Encodes an item: chat models get their chat template (`chat = true`), base models plain text.
pub fn encode_item(model: &Model, item: &PromptItem, chat: bool) -> Result<EncodedPrompt> {
    let spans: Vec<(usize, usize)> = [item.persona_span, Some(item.question_span)]
        .into_iter()
        .flatten()
        .collect();
    let (ids, tok) = model.encode_prompt_spans(&item.text, chat, &spans)?;
    let (persona_tokens, q) = if item.persona_span.is_some() {
        (tok[0], tok[1])
    } else {
        (None, tok[0])
    };
    let q = q.ok_or_else(|| {
        AnalysisError::Dataset(format!("prompt {}: the question maps to no token", item.id))
    })?;
    Ok(EncodedPrompt {
        last: ids.len() - 1,
        question_last_token: q.1 - 1,
        persona_tokens,
        ids,
    })
}

/// Novice/expert prompt pairs of a dataset (same topic, question and template); clean = novice.
type PairSlots = (Option<PromptItem>, Option<PromptItem>);

pub fn dataset_pairs(ds: &PersonaDataset) -> Vec<(PromptItem, PromptItem)> {
    let mut by_key: BTreeMap<(String, String, String, String), PairSlots> = BTreeMap::new();
    for it in &ds.items {
        let key = (
            it.pair_id.clone(),
            it.topic.clone(),
            it.question_id.clone(),
            it.template_id.clone(),
        );
        let e = by_key.entry(key).or_default();
        match it.class.as_str() {
            "novice" => e.0 = Some(it.clone()),
            "expert" => e.1 = Some(it.clone()),
            _ => {}
        }
    }
    by_key
        .into_values()
        .filter_map(|(n, e)| Some((n?, e?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_meets_the_size_floor_and_spans_are_exact() {
        let (_, pairs, topics, n_paraphrases) = builtin_catalog();
        assert!(pairs.len() >= 5 && topics.len() >= 8 && n_paraphrases >= 12);
        let ds = generate(&GenOptions {
            persona_pairs: pairs.clone(),
            include_lexical_controls: true,
            ..Default::default()
        })
        .unwrap();
        for t in &topics {
            let qs: std::collections::HashSet<_> = ds
                .items
                .iter()
                .filter(|i| &i.topic == t)
                .map(|i| &i.question_id)
                .collect();
            assert!(qs.len() >= 10, "{t}: {} questions", qs.len());
        }
        let b = builtin();
        let fields: Vec<String> = b
            .topics
            .iter()
            .flat_map(|(k, t)| [k.clone(), t.field.to_lowercase()])
            .collect();
        let mut phrases = std::collections::BTreeMap::<(String, String), Vec<String>>::new();
        for it in &ds.items {
            let (s, e) = it.persona_span.unwrap();
            let persona = it.text[s..e].to_lowercase();
            assert!(
                !persona.is_empty() && !persona.contains(['[', ']', '{']),
                "{}",
                it.id
            );
            for f in &fields {
                let words: Vec<&str> = persona
                    .split(|c: char| !c.is_alphanumeric())
                    .filter(|w| !w.is_empty())
                    .collect();
                assert!(
                    !f.split(' ').all(|w| words.contains(&w)),
                    "{}: persona phrase '{persona}' names the field '{f}'",
                    it.id
                );
            }
            let (qs, qe) = it.question_span;
            assert!(it.text[qs..qe].ends_with('?'), "{}", it.id);
            if !it.lexical_control {
                phrases
                    .entry((it.pair_id.clone(), it.class.clone()))
                    .or_default()
                    .push(persona);
            }
        }
        // Every pair has two classes of at least 12 distinct persona phrases, in several places
        // (start, middle, end of the prompt).
        assert_eq!(phrases.len(), 2 * pairs.len());
        for (k, v) in &mut phrases {
            v.sort();
            v.dedup();
            assert!(v.len() >= 12, "{k:?}: {} distinct phrases", v.len());
        }
        let starts: std::collections::HashSet<bool> = ds
            .items
            .iter()
            .map(|i| i.persona_span.unwrap().0 < i.question_span.0)
            .collect();
        assert_eq!(
            starts.len(),
            2,
            "persona both before and after the question"
        );
        let controls = ds.items.iter().filter(|i| i.lexical_control).count();
        assert!(controls >= 12 * 4 * 80, "{controls} lexical controls");
        let ids: std::collections::HashSet<_> = ds.items.iter().map(|i| &i.id).collect();
        assert_eq!(ids.len(), ds.items.len());
    }

    #[test]
    fn splits_share_no_question_and_no_paraphrase() {
        let mut ds = generate(&GenOptions {
            include_lexical_controls: true,
            include_neutral: true,
            ..Default::default()
        })
        .unwrap();
        ds.assign_splits(7);
        let sel = ds.in_split(Split::Select);
        let eval = ds.in_split(Split::Evaluate);
        assert!(sel.items.len() > 1000 && eval.items.len() > sel.items.len());
        let key = |i: &PromptItem| format!("{}/{}", i.topic, i.question_id);
        let sel_q: std::collections::HashSet<_> = sel.items.iter().map(key).collect();
        let sel_p: std::collections::HashSet<_> =
            sel.items.iter().map(|i| i.template_id.clone()).collect();
        for it in &eval.items {
            assert!(!sel_q.contains(&key(it)), "{}", it.id);
            assert!(!sel_p.contains(&it.template_id), "{}", it.id);
        }
        assert!(sel
            .items
            .iter()
            .all(|i| !i.lexical_control && i.persona_span.is_some() && i.template_id != "none"));
        assert!(eval.items.iter().any(|i| i.lexical_control));
        assert_eq!(sel_q.len(), 40);
        assert_eq!(sel_p.len(), 6);
        // Seeded: the same seed gives the same halves, another seed other halves.
        let mut again = ds.clone();
        again.assign_splits(7);
        assert_eq!(again.items, ds.items);
        again.assign_splits(8);
        assert_ne!(again.items, ds.items);
        // A user file (one paraphrase group) splits by question alone.
        let mut user = ds.clone();
        for it in &mut user.items {
            it.template_id = "user".into();
        }
        user.assign_splits(7);
        for it in &mut user.items {
            it.persona_span = None;
        }
        user.assign_splits(7);
        assert!(user
            .items
            .iter()
            .filter(|i| !i.lexical_control)
            .all(|i| i.split.is_some()));
        assert!(!user.in_split(Split::Select).items.is_empty());
    }

    #[test]
    fn selection_and_hash() {
        let a = generate(&GenOptions {
            persona_pairs: vec!["child-phd".into()],
            topics: vec!["physics".into()],
            n_questions_per_pair: 3,
            ..Default::default()
        })
        .unwrap();
        let (_, _, _, nt) = builtin_catalog();
        assert_eq!(a.items.len(), 3 * nt * 2);
        assert_eq!(
            a.items[0].text,
            "I'm 5 years old. What is the twin paradox?"
        );
        assert_eq!(a.items[1].text, "I have a PhD. What is the twin paradox?");
        let suffix = a
            .items
            .iter()
            .find(|i| i.id.ends_with("q00/p3/novice"))
            .unwrap();
        assert_eq!(
            suffix.text,
            "What is the twin paradox? I'm asking because I'm only five."
        );
        assert_eq!(
            &suffix.text[suffix.persona_span.unwrap().0..suffix.persona_span.unwrap().1],
            "I'm only five"
        );
        // Belief pairs only by name.
        assert!(a.items.iter().all(|i| i.class != "biased"));
        let belief = generate(&GenOptions {
            persona_pairs: vec!["belief-neutral".into()],
            n_questions_per_pair: 1,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(belief.class_counts().get("biased"), Some(&(8 * nt)));
        let b = generate(&GenOptions {
            persona_pairs: vec!["child-phd".into()],
            topics: vec!["physics".into()],
            n_questions_per_pair: 4,
            ..Default::default()
        })
        .unwrap();
        assert_ne!(a.hash(), b.hash());
        assert!(generate(&GenOptions {
            topics: vec!["astrology".into()],
            ..Default::default()
        })
        .is_err());
    }
}
