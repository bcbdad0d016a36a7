//! Fluency on a real model (degenerate text must score badly; the NLL matches an independent
//! forward) and the judge against a local mock endpoint (order randomisation, cache, retries,
//! unreachable endpoint).

#[path = "../../engine/tests/common/mod.rs"]
mod common;
mod mock_judge;

use persona_lens_engine::{generate, Batch, GenerateOptions, Hooks, LogitsAt};
use persona_lens_rate::judge::{parse_verdict, Judge, JudgeConfig};
use persona_lens_rate::{lexical, perplexities, perplexity};
use std::time::Duration;

#[test]
fn degenerate_text_has_high_perplexity() {
    let m = common::model("gemma-3-270m");
    let prompt = m
        .encode_prompt("I am a child. Why is the sky blue?", false)
        .unwrap();
    let g = generate(
        &m,
        std::slice::from_ref(&prompt),
        &GenerateOptions {
            max_new_tokens: 24,
            ..Default::default()
        },
        &mut Hooks::new(),
    )
    .unwrap();
    let fluent = &g[0].generated_ids;
    let junk_text = " prem coll coll dissertation manifestly uncur uncur h2 coll coll coll coll";
    let junk = m.tokenizer.encode(junk_text, false).unwrap();
    let (nll_f, ppl_f) = perplexity(&m, &prompt, fluent).unwrap().unwrap();
    let (_, ppl_j) = perplexity(&m, &prompt, &junk).unwrap().unwrap();
    assert!(ppl_f < 5.0, "greedy answer perplexity {ppl_f}");
    assert!(ppl_j > 20.0 * ppl_f, "junk {ppl_j} vs fluent {ppl_f}");
    // The first token's NLL equals -log softmax of an independent prompt-only forward.
    let b = Batch::left_padded(std::slice::from_ref(&prompt), m.pad_id(), m.device()).unwrap();
    let logits: Vec<f32> = m
        .forward(&b, None, &mut Hooks::new(), LogitsAt::Last)
        .unwrap()
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = mx
        + logits
            .iter()
            .map(|&x| (x as f64 - mx).exp())
            .sum::<f64>()
            .ln();
    let nll0 = lse - logits[fluent[0] as usize] as f64;
    let (nll_one, _) = perplexity(&m, &prompt, &fluent[..1]).unwrap().unwrap();
    assert!((nll_one - nll0).abs() < 1e-3, "{nll_one} vs {nll0}");
    assert!(nll_f >= 0.0);
    // Repetition: a steering loop (seen at alpha 2 x mean-resid on gemma) repeats 8 of 10 trigrams.
    let looped = "prem coll coll coll coll coll coll coll coll coll coll coll";
    assert!((lexical(looped, "physics").repetition_rate - 0.8).abs() < 1e-9);
    assert_eq!(
        lexical("The sky is blue because of light.", "physics").repetition_rate,
        0.0
    );
}

/// Many answers' perplexities per forward (left padded, as steering's rating runs them) equal
/// each answer's own forward, on Gemma's 262k vocabulary (which splits the answers into several
/// forwards) and on SmolLM2's; an empty answer gets none, in its place.
#[test]
fn batched_perplexities_equal_one_at_a_time() {
    for name in ["gemma-3-270m", "smollm2-135m-instruct"] {
        let m = common::model(name);
        let chat = name.starts_with("smollm2");
        let texts = [
            ("I am a child. Why is the sky blue?", " Because sunlight bounces off tiny bits of air."),
            ("I have a PhD. Why is the sky blue?", " Rayleigh scattering: the cross-section goes as the inverse fourth power of the wavelength, so blue light scatters most."),
            ("Hi.", " Hello! How can I help you today?"),
            ("Explain tides to me, I am five years old and I like the sea.", " The moon pulls on the sea."),
            ("Why?", ""),
            ("What is DNA?", " A molecule that stores the instructions for building living things, written in four letters."),
        ];
        let ids: Vec<(Vec<u32>, Vec<u32>)> = texts
            .iter()
            .map(|(p, a)| {
                (
                    m.encode_prompt(p, chat).unwrap(),
                    m.tokenizer.encode(a, false).unwrap(),
                )
            })
            .collect();
        let pairs: Vec<(&[u32], &[u32])> = ids
            .iter()
            .map(|(p, a)| (p.as_slice(), a.as_slice()))
            .collect();
        let batched = perplexities(&m, &pairs).unwrap();
        assert_eq!(batched.len(), pairs.len());
        let mut worst = 0.0f64;
        for (i, ((p, a), got)) in pairs.iter().zip(&batched).enumerate() {
            let want = perplexity(&m, p, a).unwrap();
            match (want, got) {
                (None, None) => assert!(a.is_empty(), "{name}: answer {i} got no perplexity"),
                (Some((w, _)), Some((g, gp))) => {
                    worst = worst.max((w - g).abs());
                    assert!((g.exp() - gp).abs() < 1e-9 * gp.max(1.0));
                }
                _ => panic!("{name}: answer {i}: {want:?} one at a time, {got:?} batched"),
            }
        }
        eprintln!("{name}: worst batched-vs-single NLL difference {worst:.2e} nats/token");
        assert!(
            worst < 1e-4,
            "{name}: batched NLL off by {worst} nats/token"
        );
    }
}

fn cfg(url: &str, cache: &std::path::Path, retries: usize) -> JudgeConfig {
    JudgeConfig {
        url: url.into(),
        model: "mock".into(),
        api_key: Some("sk-test".into()),
        retries,
        timeout: Duration::from_secs(5),
        cache: cache.into(),
        seed: 7,
    }
}

#[test]
fn judge_against_mock_endpoint() {
    let dir = std::env::temp_dir().join(format!("pl-judge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = dir.join("cache.jsonl");
    // Two failing requests first: retries get through.
    let mock = mock_judge::start("quantum", 2, usize::MAX);
    let mut j = Judge::new(cfg(&mock.url, &cache, 3)).unwrap();
    let mut wins = Vec::new();
    for i in 0..8 {
        let w = j
            .compare(
                "PhD-level expert",
                &format!("question {i}"),
                "It follows from quantum field theory.",
                "It is like magic.",
            )
            .unwrap();
        wins.push(w);
    }
    // The steered answer wins whichever position it was shown in.
    assert!(wins.iter().all(|&w| w == 1.0), "{wins:?}");
    let asked = mock.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(asked, 8 + 2);
    // The reverse comparison: the baseline wins.
    let w = j
        .compare(
            "PhD-level expert",
            "q",
            "It is like magic.",
            "quantum effects",
        )
        .unwrap();
    assert_eq!(w, 0.0);
    // Both orders were used (randomised), recorded in the cache.
    let lines = std::fs::read_to_string(&cache).unwrap();
    assert!(lines.contains("\"steered_first\":true") && lines.contains("\"steered_first\":false"));
    // A new judge reads the cache: no new requests.
    let before = mock.requests.load(std::sync::atomic::Ordering::SeqCst);
    let mut j2 = Judge::new(cfg(&mock.url, &cache, 0)).unwrap();
    assert_eq!(
        j2.compare(
            "PhD-level expert",
            "question 3",
            "It follows from quantum field theory.",
            "It is like magic."
        )
        .unwrap(),
        1.0
    );
    assert_eq!(
        mock.requests.load(std::sync::atomic::Ordering::SeqCst),
        before
    );
    // Unreachable endpoint: a clear error.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let mut bad = Judge::new(cfg(
        &format!("http://127.0.0.1:{port}/v1"),
        &dir.join("c2.jsonl"),
        1,
    ))
    .unwrap();
    let e = bad
        .compare("expert", "q", "a", "b")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("failed after 2 tries") && e.contains("rerun"),
        "{e}"
    );
    // Verdict parsing.
    assert_eq!(
        parse_verdict("Sure: {\"winner\": \"b\"}").as_deref(),
        Some("B")
    );
    assert_eq!(
        parse_verdict("{\"winner\": \"tie\"}").as_deref(),
        Some("tie")
    );
    assert_eq!(parse_verdict("A is better"), None);
    let _ = std::fs::remove_dir_all(&dir);
}
