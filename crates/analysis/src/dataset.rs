//! The persona dataset: a built-in, versioned generator (persona pairs x topics x questions x
//! phrasing templates) and a loader for user files in the schema of the crosscoder notes
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
    /// Unique id, e.g. `child-phd/physics/q03/t2/expert`.
    pub id: String,
    /// Persona pair (built-in) or the user file's pair id (`exp_001`).
    pub pair_id: String,
    pub topic: String,
    pub question_id: String,
    /// Phrasing template id (`t0`..), `user` for prompts from a file.
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
                    "class '{c}' has no prompts in {} (classes present: {:?}); check --pair-id / --persona-pair or the file",
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
    templates: Vec<String>,
}
#[derive(Deserialize)]
struct BuiltinTopic {
    field: String,
    questions: Vec<String>,
}
#[derive(Deserialize)]
struct BuiltinPair {
    novice: BuiltinPersona,
    expert: BuiltinPersona,
}
#[derive(Deserialize)]
struct BuiltinPersona {
    name: String,
    phrase: String,
}

fn builtin() -> BuiltinFile {
    serde_json::from_str(BUILTIN).expect("built-in dataset is valid JSON (checked by tests)")
}

/// What to generate from the built-in dataset.
#[derive(Debug, Clone, Default)]
pub struct GenOptions {
    /// Persona pairs (`child-phd`, ...); empty = all.
    pub persona_pairs: Vec<String>,
    /// Topics (`physics`, ...), the seed's `--pair-id`; empty = all.
    pub topics: Vec<String>,
    /// Questions per topic (0 = all).
    pub n_questions_per_pair: usize,
    /// Template indices; empty = all.
    pub templates: Vec<usize>,
    /// Also emit one `neutral` prompt (the bare question) per question.
    pub include_neutral: bool,
}

/// Names of the built-in persona pairs, topics and the number of templates.
pub fn builtin_catalog() -> (String, Vec<String>, Vec<String>, usize) {
    let b = builtin();
    (
        b.version,
        b.persona_pairs.keys().cloned().collect(),
        b.topics.keys().cloned().collect(),
        b.templates.len(),
    )
}

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Fills a template, returning the text and the byte spans of persona and question.
fn fill(template: &str, persona: &str, question: &str) -> (String, (usize, usize), (usize, usize)) {
    let p_at = template.find("{persona}").unwrap_or(0);
    // Capitalise the persona phrase when it starts a sentence.
    let sentence_start = template[..p_at].trim_end().is_empty()
        || template[..p_at].trim_end().ends_with(['.', '!', '?']);
    let persona = if sentence_start {
        upper_first(persona)
    } else {
        persona.to_string()
    };
    let mut text = String::new();
    let mut ps = (0, 0);
    let mut qs = (0, 0);
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        text.push_str(&rest[..i]);
        let j = rest[i..].find('}').map(|j| i + j).unwrap_or(rest.len() - 1);
        match &rest[i + 1..j] {
            "persona" => {
                ps = (text.len(), text.len() + persona.len());
                text.push_str(&persona);
            }
            "question" => {
                qs = (text.len(), text.len() + question.len());
                text.push_str(question);
            }
            other => text.push_str(other),
        }
        rest = &rest[j + 1..];
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
    check("topic (--pair-id)", &opts.topics, b.topics.keys().collect())?;
    for &t in &opts.templates {
        if t >= b.templates.len() {
            return Err(AnalysisError::Dataset(format!(
                "template index {t} out of range (the built-in set has {} templates: 0..{})",
                b.templates.len(),
                b.templates.len() - 1
            )));
        }
    }
    let mut items = Vec::new();
    for (pair_id, pair) in &b.persona_pairs {
        if !opts.persona_pairs.is_empty() && !opts.persona_pairs.contains(pair_id) {
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
                for (ti, tpl) in b.templates.iter().enumerate() {
                    if !opts.templates.is_empty() && !opts.templates.contains(&ti) {
                        continue;
                    }
                    for (class, persona) in [("novice", &pair.novice), ("expert", &pair.expert)] {
                        let phrase = persona.phrase.replace("{field}", &t.field);
                        let (text, ps, qs) = fill(tpl, &phrase, q);
                        items.push(PromptItem {
                            id: format!("{pair_id}/{topic}/{qid}/t{ti}/{class}"),
                            pair_id: pair_id.clone(),
                            topic: topic.clone(),
                            question_id: qid.clone(),
                            template_id: format!("t{ti}"),
                            class: class.into(),
                            persona: persona.name.clone(),
                            text,
                            persona_span: Some(ps),
                            question_span: qs,
                        });
                    }
                }
                if opts.include_neutral {
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
                    });
                }
            }
        }
    }
    if items.is_empty() {
        return Err(AnalysisError::Dataset(
            "the selection matched no prompts; check --persona-pair / --pair-id".into(),
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
            "--pair-id {} matched no prompt (it matches pair ids and topics; topics here: {topics})",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_meets_the_size_floor_and_spans_are_exact() {
        let (_, pairs, topics, n_templates) = builtin_catalog();
        assert!(pairs.len() >= 4 && topics.len() >= 8 && n_templates >= 6);
        let ds = generate(&GenOptions::default()).unwrap();
        for t in &topics {
            let qs: std::collections::HashSet<_> = ds
                .items
                .iter()
                .filter(|i| &i.topic == t)
                .map(|i| &i.question_id)
                .collect();
            assert!(qs.len() >= 10, "{t}: {} questions", qs.len());
        }
        for it in &ds.items {
            let (s, e) = it.persona_span.unwrap();
            let persona = &it.text[s..e];
            assert!(
                persona.to_lowercase().starts_with("i"),
                "{}: {persona}",
                it.id
            );
            let (qs, qe) = it.question_span;
            assert!(it.text[qs..qe].ends_with('?'), "{}", it.id);
        }
        let ids: std::collections::HashSet<_> = ds.items.iter().map(|i| &i.id).collect();
        assert_eq!(ids.len(), ds.items.len());
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
        assert_eq!(
            a.items[1].text,
            "I have a PhD in physics. What is the twin paradox?"
        );
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
