//! Optional pairwise LLM judge over any OpenAI-compatible chat-completions endpoint: "which
//! answer is more targeted to a {persona} user?", answer order randomised (seeded), temperature
//! 0, JSON verdict, retries with backoff, and a cache of verdicts on disk so reruns ask nothing
//! twice. Never needed for the default run.

use crate::{RateError, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct JudgeConfig {
    /// Base URL (`http://host:port/v1`) or the full `/chat/completions` URL.
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub retries: usize,
    pub timeout: Duration,
    /// JSON-lines cache of verdicts.
    pub cache: PathBuf,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheLine {
    key: String,
    /// "A", "B" or "tie", for the order asked.
    verdict: String,
    steered_first: bool,
}

pub struct Judge {
    cfg: JudgeConfig,
    cache: HashMap<String, CacheLine>,
    rng: rand::rngs::StdRng,
    agent: ureq::Agent,
}

fn endpoint(url: &str) -> String {
    let u = url.trim_end_matches('/');
    if u.ends_with("/chat/completions") {
        u.to_string()
    } else {
        format!("{u}/chat/completions")
    }
}

/// The verdict letter from a model reply: a JSON object `{"winner": "A"|"B"|"tie"}`, possibly
/// inside other text.
pub fn parse_verdict(reply: &str) -> Option<String> {
    let start = reply.find('{')?;
    let end = reply.rfind('}')?;
    let v: serde_json::Value = serde_json::from_str(reply.get(start..=end)?).ok()?;
    let w = v["winner"].as_str()?.trim().to_ascii_uppercase();
    match w.as_str() {
        "A" | "B" => Some(w),
        "TIE" => Some("tie".into()),
        _ => None,
    }
}

impl Judge {
    pub fn new(cfg: JudgeConfig) -> Result<Self> {
        let mut cache = HashMap::new();
        if let Ok(s) = std::fs::read_to_string(&cfg.cache) {
            for l in s.lines() {
                if let Ok(c) = serde_json::from_str::<CacheLine>(l) {
                    cache.insert(c.key.clone(), c);
                }
            }
        }
        let agent = ureq::AgentBuilder::new().timeout(cfg.timeout).build();
        let rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        Ok(Judge {
            cfg,
            cache,
            rng,
            agent,
        })
    }

    fn key(&self, persona: &str, prompt: &str, steered: &str, baseline: &str) -> String {
        let mut h = Sha256::new();
        for part in [&self.cfg.model, persona, prompt, steered, baseline] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        format!("{:x}", h.finalize())
    }

    /// 1 if `steered` is judged more targeted to a `persona` user than `baseline`, 0 if less,
    /// 0.5 for a tie.
    pub fn compare(
        &mut self,
        persona: &str,
        prompt: &str,
        steered: &str,
        baseline: &str,
    ) -> Result<f64> {
        let key = self.key(persona, prompt, steered, baseline);
        let line = match self.cache.get(&key) {
            Some(c) => c.clone(),
            None => {
                let steered_first = self.rng.random_bool(0.5);
                let (a, b) = if steered_first {
                    (steered, baseline)
                } else {
                    (baseline, steered)
                };
                let verdict = self.ask(persona, prompt, a, b)?;
                let c = CacheLine {
                    key: key.clone(),
                    verdict,
                    steered_first,
                };
                self.store(&c)?;
                self.cache.insert(key, c.clone());
                c
            }
        };
        Ok(match (line.verdict.as_str(), line.steered_first) {
            ("tie", _) => 0.5,
            ("A", true) | ("B", false) => 1.0,
            _ => 0.0,
        })
    }

    fn store(&self, c: &CacheLine) -> Result<()> {
        if let Some(p) = self.cfg.cache.parent() {
            std::fs::create_dir_all(p).map_err(|e| RateError::Judge(e.to_string()))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.cfg.cache)
            .map_err(|e| RateError::Judge(format!("cache {}: {e}", self.cfg.cache.display())))?;
        let s = serde_json::to_string(c).map_err(|e| RateError::Judge(e.to_string()))?;
        writeln!(f, "{s}").map_err(|e| RateError::Judge(e.to_string()))?;
        Ok(())
    }

    fn ask(&self, persona: &str, prompt: &str, a: &str, b: &str) -> Result<String> {
        let body = serde_json::json!({
            "model": self.cfg.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": "You compare two answers to the same question. Reply with JSON only: {\"winner\": \"A\"} or {\"winner\": \"B\"} or {\"winner\": \"tie\"}."},
                {"role": "user", "content": format!(
                    "Question:\n{prompt}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\nWhich answer is more targeted to a {persona} user? Reply with JSON only.")}
            ]
        });
        let url = endpoint(&self.cfg.url);
        let mut last = String::new();
        for attempt in 0..=self.cfg.retries {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 * (1 << attempt.min(5))));
            }
            let mut req = self.agent.post(&url);
            if let Some(k) = &self.cfg.api_key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            match req.send_json(body.clone()) {
                Ok(resp) => {
                    let v: serde_json::Value = match resp.into_json() {
                        Ok(v) => v,
                        Err(e) => {
                            last = format!("unreadable reply: {e}");
                            continue;
                        }
                    };
                    let text = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
                    match parse_verdict(text) {
                        Some(w) => return Ok(w),
                        None => last = format!("reply is not a JSON verdict: {text:?}"),
                    }
                }
                Err(ureq::Error::Status(code, r)) => {
                    last = format!("HTTP {code}: {}", r.into_string().unwrap_or_default());
                    if code < 500 && code != 429 {
                        break;
                    }
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(RateError::Judge(format!(
            "{url} failed after {} tries ({last}); check the judge URL, model and key, then rerun: rated records are kept and skipped",
            self.cfg.retries + 1
        )))
    }
}
