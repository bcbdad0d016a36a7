//! persona-lens autorater: scores generated answers (from `persona-lens steer`) for readability
//! (seven formulas), lexical complexity, fluency under the unsteered model, and optionally a
//! pairwise LLM judge; summarises per (layer, alpha) with bootstrap 95 % intervals.

pub mod judge;
pub mod readability;

use candle_core::{DType, Tensor, D};
use persona_lens_engine::{Batch, Hooks, LogitsAt, Model};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum RateError {
    #[error(transparent)]
    Engine(#[from] persona_lens_engine::EngineError),
    #[error("{0}")]
    Invalid(String),
    #[error("judge: {0}")]
    Judge(String),
}

impl From<candle_core::Error> for RateError {
    fn from(e: candle_core::Error) -> Self {
        RateError::Engine(e.into())
    }
}

pub type Result<T> = std::result::Result<T, RateError>;

fn technical_words() -> &'static HashMap<String, HashSet<String>> {
    static W: OnceLock<HashMap<String, HashSet<String>>> = OnceLock::new();
    W.get_or_init(|| {
        let v: HashMap<String, Vec<String>> =
            serde_json::from_str(include_str!("../data/technical_words.json"))
                .expect("technical_words.json is valid");
        v.into_iter()
            .map(|(k, ws)| (k, ws.into_iter().map(|w| w.to_lowercase()).collect()))
            .collect()
    })
}

/// Lexical measures of one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lexical {
    pub n_words: usize,
    pub n_sentences: usize,
    pub n_chars: usize,
    pub words_per_sentence: f64,
    pub syllables_per_word: f64,
    /// Distinct words / words (lower-cased).
    pub type_token_ratio: f64,
    /// Share of words in the topic's technical list (None: unknown topic).
    pub technical_share: Option<f64>,
    /// Share of word trigrams that repeat an earlier trigram (degenerate loops score high).
    pub repetition_rate: f64,
}

fn words_lower(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|t| {
            t.trim_matches(|c: char| !c.is_alphanumeric() && c != '-')
                .to_lowercase()
        })
        .filter(|w| w.chars().any(|c| c.is_alphanumeric()))
        .collect()
}

pub fn lexical(text: &str, topic: &str) -> Lexical {
    let c = readability::counts(text);
    let ws = words_lower(text);
    let distinct: HashSet<&String> = ws.iter().collect();
    let technical_share = technical_words().get(topic).map(|set| {
        if ws.is_empty() {
            0.0
        } else {
            ws.iter()
                .filter(|w| set.contains(w.as_str()) || set.contains(w.trim_end_matches('s')))
                .count() as f64
                / ws.len() as f64
        }
    });
    let tri: Vec<(&String, &String, &String)> =
        ws.windows(3).map(|w| (&w[0], &w[1], &w[2])).collect();
    let uniq: HashSet<_> = tri.iter().collect();
    Lexical {
        n_words: c.words,
        n_sentences: c.sentences,
        n_chars: text.chars().count(),
        words_per_sentence: if c.sentences > 0 {
            c.words as f64 / c.sentences as f64
        } else {
            0.0
        },
        syllables_per_word: if c.words > 0 {
            c.syllables as f64 / c.words as f64
        } else {
            0.0
        },
        type_token_ratio: if ws.is_empty() {
            0.0
        } else {
            distinct.len() as f64 / ws.len() as f64
        },
        technical_share,
        repetition_rate: if tri.is_empty() {
            0.0
        } else {
            1.0 - uniq.len() as f64 / tri.len() as f64
        },
    }
}

/// Perplexity of `generated` after `prompt` under `model` with no hooks (the unsteered model):
/// exp(mean negative log-likelihood of the generated tokens), in nats per token before exp.
pub fn perplexity(model: &Model, prompt: &[u32], generated: &[u32]) -> Result<Option<(f64, f64)>> {
    Ok(perplexities(model, &[(prompt, generated)])?.pop().flatten())
}

/// Most rows of [`perplexities`] in one forward.
pub const PERPLEXITY_ROWS: usize = 16;
/// Logits (floats) one call of [`perplexities`] may hold: every position's logits are read, so
/// a large vocabulary (Gemma's 262k) takes fewer rows per call.
const PERPLEXITY_LOGITS: usize = 1 << 26;

/// [`perplexity`] of many `(prompt, generated)` pairs, several per forward (left padded, batched
/// by length): one forward of a few rows costs about what one row does. Pairs with an empty side
/// get `None`, like [`perplexity`].
pub fn perplexities(
    model: &Model,
    answers: &[(&[u32], &[u32])],
) -> Result<Vec<Option<(f64, f64)>>> {
    let mut out = vec![None; answers.len()];
    let len = |i: usize| answers[i].0.len() + answers[i].1.len();
    let mut order: Vec<usize> = (0..answers.len())
        .filter(|&i| !answers[i].0.is_empty() && !answers[i].1.is_empty())
        .collect();
    order.sort_by_key(|&i| len(i));
    let vocab = model.config().vocab_size.max(1);
    let mut rest = &order[..];
    while !rest.is_empty() {
        // Sorted by length: the chunk's last row is its longest.
        let mut n = 1;
        while n < rest.len().min(PERPLEXITY_ROWS)
            && (n + 1) * len(rest[n]) * vocab <= PERPLEXITY_LOGITS
        {
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let seqs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|&i| answers[i].0.iter().chain(answers[i].1).copied().collect())
            .collect();
        let b = Batch::left_padded(&seqs, model.pad_id(), model.device())?;
        let logits = model
            .forward(&b, None, &mut Hooks::new(), LogitsAt::All)?
            .ok_or_else(|| RateError::Invalid("no logits".into()))?
            .to_dtype(DType::F32)?;
        for (r, &i) in chunk.iter().enumerate() {
            let (prompt, generated) = answers[i];
            // Positions p-1 .. end-1 of the row (after its padding) predict the generated tokens.
            let pred = logits
                .get(r)?
                .narrow(0, b.pad[r] + prompt.len() - 1, generated.len())?;
            let m = pred.max_keepdim(D::Minus1)?;
            let lse = pred
                .broadcast_sub(&m)?
                .exp()?
                .sum_keepdim(D::Minus1)?
                .log()?
                .broadcast_add(&m)?;
            let tgt = Tensor::new(generated, model.device())?.unsqueeze(1)?;
            let picked = pred.gather(&tgt, 1)?;
            let nll: Vec<f32> = (lse - picked)?.squeeze(1)?.to_vec1()?;
            let mean = nll.iter().map(|&x| x as f64).sum::<f64>() / nll.len() as f64;
            out[i] = Some((mean, mean.exp()));
        }
    }
    Ok(out)
}

/// Scores of one record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scores {
    /// The record's identity: prompt id, layer, alpha, mode.
    pub key: String,
    pub prompt_id: String,
    pub persona: String,
    pub topic: String,
    pub layer: i64,
    /// Steering strength (None: not a steering record).
    pub alpha: Option<f64>,
    pub readability: Option<readability::Readability>,
    pub counts: readability::Counts,
    pub lexical: Lexical,
    /// Mean NLL of the answer under the unsteered model (nats/token) and its exp.
    pub nll_nats_per_token: Option<f64>,
    pub perplexity: Option<f64>,
    /// Judge: 1 = the steered answer was judged more targeted to the persona than the
    /// alpha = 0 answer of the same prompt and layer, 0 = less, 0.5 = tie; None if not judged.
    pub judge_win: Option<f64>,
    pub fluency_model: String,
}

/// A generated answer to rate: the fields of a `patched_outputs.jsonl` line (from `persona-lens
/// steer`) that the autorater reads; other fields are ignored. Only `text` is required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub text: String,
    /// The model that wrote it (the default fluency model).
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt_id: String,
    #[serde(default)]
    pub persona: String,
    #[serde(default)]
    pub topic: String,
    #[serde(default)]
    pub prompt: String,
    /// Steering layer and strength (None: not a steering record).
    #[serde(default)]
    pub layer: Option<i64>,
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default)]
    pub mode: String,
    /// Token ids of the prompt and of the answer (for fluency; empty: no fluency).
    #[serde(default)]
    pub prompt_ids: Vec<u32>,
    #[serde(default)]
    pub generated_ids: Vec<u32>,
}

impl Answer {
    /// The answer's key (prompt, layer, alpha, mode): unique within one steer run. Numbers are
    /// written as JSON writes them (`2.0`, `null`), the keys of existing `scores.jsonl` files.
    pub fn key(&self) -> String {
        format!(
            "{}|{}|{}|{}",
            self.prompt_id,
            json(&self.layer),
            json(&self.alpha),
            self.mode
        )
    }

    /// The alpha = 0 (unsteered) answer of the same prompt, layer and mode has this key.
    pub fn cell_key(&self) -> String {
        format!("{}|{}|{}", self.prompt_id, json(&self.layer), self.mode)
    }

    pub fn is_unsteered(&self) -> bool {
        self.alpha == Some(0.0)
    }
}

/// An optional number as JSON writes it.
fn json<T: Serialize>(x: &Option<T>) -> String {
    serde_json::to_string(x).unwrap_or_default()
}

/// Scores of one record, with the answer's (mean NLL, perplexity) already computed under
/// `fluency_model` (by [`perplexities`], many answers per forward).
pub fn score_record(
    r: &Answer,
    nll_ppl: Option<(f64, f64)>,
    fluency_model: Option<&str>,
) -> Scores {
    let text = &r.text;
    let topic = r.topic.as_str();
    let c = readability::counts(text);
    let (nll, ppl) = (nll_ppl.map(|x| x.0), nll_ppl.map(|x| x.1));
    Scores {
        key: r.key(),
        prompt_id: r.prompt_id.clone(),
        persona: r.persona.clone(),
        topic: topic.into(),
        layer: r.layer.unwrap_or(-1),
        alpha: r.alpha,
        readability: readability::readability(&c),
        counts: c,
        lexical: lexical(text, topic),
        nll_nats_per_token: nll,
        perplexity: ppl,
        judge_win: None,
        fluency_model: fluency_model.unwrap_or_default().to_string(),
    }
}

/// Mean and percentile-bootstrap 95 % interval (`n_boot` resamples, fixed seed).
pub fn bootstrap_ci(xs: &[f64], n_boot: usize, seed: u64) -> Option<(f64, f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Some((mean, mean, mean));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..n_boot)
        .map(|_| (0..n).map(|_| xs[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let q = |p: f64| means[((p * (n_boot - 1) as f64).round() as usize).min(n_boot - 1)];
    Some((mean, q(0.025), q(0.975)))
}

/// Per-(layer, alpha) means with bootstrap 95 % intervals of every measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CellSummary {
    pub layer: i64,
    /// None: records without a steering strength.
    pub alpha: Option<f64>,
    pub n: usize,
    /// measure -> (mean, ci_low, ci_high, n with a value)
    pub measures: BTreeMap<String, (f64, f64, f64, usize)>,
}

/// The measures a summary reports, by name.
pub fn measures(s: &Scores) -> Vec<(&'static str, Option<f64>)> {
    let r = s.readability.as_ref();
    vec![
        ("flesch_reading_ease", r.map(|r| r.flesch_reading_ease)),
        ("flesch_kincaid_grade", r.map(|r| r.flesch_kincaid_grade)),
        ("gunning_fog", r.map(|r| r.gunning_fog)),
        ("smog", r.map(|r| r.smog)),
        ("coleman_liau", r.map(|r| r.coleman_liau)),
        ("ari", r.map(|r| r.ari)),
        ("new_dale_chall", r.map(|r| r.new_dale_chall)),
        ("words_per_sentence", Some(s.lexical.words_per_sentence)),
        ("syllables_per_word", Some(s.lexical.syllables_per_word)),
        ("type_token_ratio", Some(s.lexical.type_token_ratio)),
        ("technical_share", s.lexical.technical_share),
        ("answer_words", Some(s.lexical.n_words as f64)),
        ("repetition_rate", Some(s.lexical.repetition_rate)),
        ("perplexity", s.perplexity),
        ("nll_nats_per_token", s.nll_nats_per_token),
        ("judge_win", s.judge_win),
    ]
}

pub fn summarize(scores: &[Scores], n_boot: usize, seed: u64) -> Vec<CellSummary> {
    let mut cells: BTreeMap<(i64, Option<i64>), Vec<&Scores>> = BTreeMap::new();
    for s in scores {
        cells
            .entry((s.layer, s.alpha.map(|a| (a * 1e6).round() as i64)))
            .or_default()
            .push(s);
    }
    cells
        .into_values()
        .map(|v| {
            let mut m: BTreeMap<String, Vec<f64>> = BTreeMap::new();
            for s in &v {
                for (k, x) in measures(s) {
                    if let Some(x) = x.filter(|x| x.is_finite()) {
                        m.entry(k.to_string()).or_default().push(x);
                    }
                }
            }
            CellSummary {
                layer: v[0].layer,
                alpha: v[0].alpha,
                n: v.len(),
                measures: m
                    .into_iter()
                    .filter_map(|(k, xs)| {
                        bootstrap_ci(&xs, n_boot, seed).map(|(a, b, c)| (k, (a, b, c, xs.len())))
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::Answer;

    /// A `patched_outputs.jsonl` line reads as an `Answer` (extra fields ignored), and its key is
    /// the one `scores.jsonl` files already hold (numbers as JSON writes them), so `rate` resumes
    /// across versions.
    #[test]
    fn answers_read_steering_records_with_their_old_keys() {
        let line = r#"{"model":"m","prompt_id":"physics/q1/t0/novice","persona":"novice","topic":"physics","prompt":"Why?","chat":true,"layer":6,"hook":"blocks.6.hook_resid_post","alpha":2.0,"mode":"add","positions":"all","text":"Because.","prompt_ids":[1,2],"generated_ids":[3]}"#;
        let a: Answer = serde_json::from_str(line).unwrap();
        assert_eq!(a.key(), "physics/q1/t0/novice|6|2.0|add");
        assert_eq!(a.generated_ids, vec![3]);
        assert!(!a.is_unsteered());
        let b: Answer = serde_json::from_str(r#"{"text":"t","alpha":0.0}"#).unwrap();
        assert_eq!(b.key(), "|null|0.0|");
        assert!(b.is_unsteered());
        assert!(serde_json::from_str::<Answer>(r#"{"prompt_id":"p"}"#).is_err());
    }
}
