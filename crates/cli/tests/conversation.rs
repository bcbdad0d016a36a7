//! `probe` saves loadable probe weights; `conversation` reads them over multi-turn conversations
//! on SmolLM2-135M-Instruct: read-outs at every token (checked against the saved probe applied to
//! `run_with_cache`'s activations) and belief revision, whose patching rows have answers known
//! without the code (row 0 restores all, the probe's own row restores nothing).

mod common;
use common::{assert_one_line_error as refused, models, ok};
use persona_lens_analysis::harvest::Harvest;
use persona_lens_analysis::probe::labels_for;
use persona_lens_analysis::steering::{steered_generate, SteerOp, SteerPositions};
use persona_lens_analysis::user_model::{
    answer_with_readouts, render_conversation, steer_vector, ProbeWeights, SteerSpec,
};
use persona_lens_engine::tokenizer::ChatMessage;
use persona_lens_engine::{
    CachePositions, GenerateOptions, HookName, LoadOptions, LogitsAt, Model,
};
use serde_json::Value;
use std::path::PathBuf;

const MODEL: &str = "smollm2-135m-instruct";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pl-conv-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn turn(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

#[test]
fn probe_weights_trajectories_and_belief_revision() {
    let dir = tmp("main");
    let probe_out = dir.join("probe");
    let p = probe_out.to_str().unwrap();
    ok(&[
        "probe",
        "--model",
        MODEL,
        "--n-questions-per-pair",
        "2",
        "--templates",
        "0,1,2,3",
        "--quiet",
        "--threads",
        "2",
        "--out",
        p,
    ]);

    // The saved fits are the ones probe.json reports: each reproduces its row's train accuracy
    // on the stored activations.
    let w = ProbeWeights::load(&probe_out.join("probe_weights.json")).unwrap();
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(probe_out.join("probe.json")).unwrap())
            .unwrap();
    let h = Harvest::load(&probe_out).unwrap();
    let labels = labels_for(&h, &w.classes, false);
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), w.probes.len());
    for (l, sp) in layers.iter().zip(&w.probes) {
        assert_eq!(l["hook"].as_str().unwrap(), sp.hook);
        let (x, n, d) = h.matrix(&sp.hook).unwrap();
        let (mut right, mut total) = (0, 0);
        for i in 0..n {
            let (Some(y), false) = (labels[i], h.meta.items[i].lexical_control) else {
                continue;
            };
            let row: Vec<f32> = x[i * d..(i + 1) * d].iter().map(|&v| v as f32).collect();
            let pr = sp.proba(&row);
            let guess = if pr[1] > pr[0] { 1 } else { 0 };
            right += (guess == y) as usize;
            total += 1;
        }
        let acc = right as f64 / total as f64;
        assert!(
            (acc - l["train_accuracy"].as_f64().unwrap()).abs() < 1e-12,
            "{}: saved fit {acc} vs probe.json {}",
            sp.hook,
            l["train_accuracy"]
        );
    }
    // The selected row is the best on the selection split's CV (the first among equals).
    let best = w
        .probes
        .iter()
        .map(|p| p.select_accuracy.unwrap())
        .fold(f64::MIN, f64::max);
    let sel = w.selected();
    assert_eq!(sel.select_accuracy.unwrap(), best);
    assert!(w
        .probes
        .iter()
        .take_while(|p| p.hook != sel.hook)
        .all(|p| p.select_accuracy.unwrap() < best));

    // Conversations: a child who turns out to be a professor (the cue, then an answer after
    // it, so the last token is outside the cue), and a plain one-turn question.
    let revise = vec![
        turn(
            "user",
            "I'm 7 years old and in second grade. What is gravity?",
        ),
        turn(
            "assistant",
            "Gravity is what makes things fall down to the ground.",
        ),
        turn(
            "user",
            "Actually, I'm a physics professor. Explain gravity properly.",
        ),
        turn("assistant", "Sure."),
    ];
    let ds = serde_json::json!({"conversations": [
        {"id": "revise", "turns": revise, "cue_turn": 2, "cue_class": "expert"},
        {"id": "plain", "turns": [turn("user", "What is a black hole?")]},
    ]});
    let ds_path = dir.join("conversations.json");
    std::fs::write(&ds_path, ds.to_string()).unwrap();
    let out = dir.join("out");
    let stdout = ok(&[
        "conversation",
        "--model",
        MODEL,
        "--probes",
        p,
        "--dataset",
        ds_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(stdout.contains("revise [novice/expert]"), "{stdout}");
    for f in [
        "trajectories.json",
        "belief_revision.json",
        "trajectory_revise.png",
        "trajectory_plain.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let trajs: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trajectories.json")).unwrap())
            .unwrap();

    // Independent read-out: the conversation's ids through run_with_cache, the saved probe
    // applied to each position's activation.
    let model = Model::load(MODEL, &models(), &LoadOptions::default()).unwrap();
    let hook = HookName::parse(&sel.hook, model.config().n_layers).unwrap();
    let rendered = render_conversation(&model, &revise, false).unwrap();
    let (_, cache) = model
        .run_with_cache(
            std::slice::from_ref(&rendered.ids),
            &[hook],
            CachePositions::All,
            LogitsAt::None,
            1,
            |_| {},
        )
        .unwrap();
    let acts = cache.row(&hook, 0).unwrap().to_vec2::<f32>().unwrap();
    let t = &trajs[0];
    let proba = t["proba"].as_array().unwrap();
    assert_eq!(proba.len(), rendered.ids.len());
    assert_eq!(t["tokens"].as_array().unwrap().len(), rendered.ids.len());
    for (pos, a) in acts.iter().enumerate() {
        let want = sel.proba(a);
        let got = proba[pos][0].as_array().unwrap();
        for k in 0..2 {
            assert!(
                (got[k].as_f64().unwrap() - want[k]).abs() < 1e-6,
                "position {pos}"
            );
        }
    }
    // Turns: each starts where the template's turn marker does, in order.
    let starts: Vec<usize> = t["turn_starts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(starts.len(), 4);
    assert!(starts.windows(2).all(|w| w[0] < w[1]), "{starts:?}");
    for &s in &starts[1..] {
        assert_eq!(model.tokenizer.id_to_token(rendered.ids[s]), "<|im_start|>");
    }

    // Steered answers add the vector once per position through the KV cache: the same tokens
    // as full recompute (every forward re-runs every position, each steered once).
    let spec = SteerSpec {
        attribute: w.attribute.clone(),
        hook: Some("blocks.15.hook_resid_pre".into()),
        strength: -0.5,
    };
    let steer = steer_vector(&model, std::slice::from_ref(&w), &spec, &mut |_| Ok(120.0))
        .unwrap()
        .unwrap();
    let ask = &revise[..3];
    let ans = answer_with_readouts(
        &model,
        ask,
        12,
        std::slice::from_ref(&steer),
        &[],
        &mut |_| true,
    )
    .unwrap();
    let plain = answer_with_readouts(&model, ask, 12, &[], &[], &mut |_| true).unwrap();
    assert_ne!(ans.ids, plain.ids, "the steering vector changed nothing");
    let v = candle_core::Tensor::new(steer.vector.as_slice(), model.device()).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 12,
        stop_tokens: model.tokenizer.eos_ids.clone(),
        use_kv_cache: false,
        ..Default::default()
    };
    let full = steered_generate(
        &model,
        std::slice::from_ref(&ans.prompt_ids),
        Some((steer.hook, &SteerOp::Add(v), SteerPositions::All)),
        &opts,
        1,
        &|_| {},
    )
    .unwrap();
    let mut want = full[0].generated_ids.clone();
    if full[0].stopped_on.is_some() {
        want.pop(); // the answer leaves out the end-of-turn token
    }
    assert_eq!(ans.ids, want);

    let revs: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("belief_revision.json")).unwrap())
            .unwrap();
    let revs = revs.as_array().unwrap();
    assert_eq!(revs.len(), 1, "one conversation has a cue");
    let r = &revs[0];
    let rows = r["rows"].as_array().unwrap();
    let restored = |i: usize| rows[i]["restored"].as_f64().unwrap();
    // Patching every cue position at the embeddings turns the filler run into the cue run.
    assert!(
        (restored(0) - 1.0).abs() < 1e-6,
        "row 0 restored {}",
        restored(0)
    );
    // At the probe's own row the last position (outside the cue) is untouched: nothing restored.
    assert_eq!(rows.last().unwrap()["hook"].as_str().unwrap(), sel.hook);
    assert!(
        restored(rows.len() - 1).abs() < 1e-9,
        "{}",
        restored(rows.len() - 1)
    );
    // The crossover, recomputed from the trajectory: from there on the read-out names the
    // cue's class at every token, and not at the token before.
    let (start, end) = (
        r["cue_span"][0].as_u64().unwrap() as usize,
        r["cue_span"][1].as_u64().unwrap() as usize,
    );
    assert_eq!(start, starts[2]);
    assert_eq!(end, starts[3]);
    let expert = |pos: usize| {
        let q = proba[pos][0].as_array().unwrap();
        q[1].as_f64().unwrap() >= q[0].as_f64().unwrap()
    };
    let last = proba.len() - 1;
    let want = (start..=last)
        .find(|&p| (p..=last).all(expert))
        .map(|p| p - start);
    assert_eq!(r["tokens_to_crossover"].as_u64().map(|v| v as usize), want);
    assert!((r["after"].as_f64().unwrap() - proba[last][0][1].as_f64().unwrap()).abs() < 1e-12);
    assert!(
        (r["before"].as_f64().unwrap() - proba[start - 1][0][1].as_f64().unwrap()).abs() < 1e-12
    );
}

/// Wrong inputs are refused in one line before the model loads (a model path that does not
/// exist would fail first otherwise).
#[test]
fn conversation_and_serve_inputs_are_checked_first() {
    let dir = tmp("careless");
    let ds = dir.join("c.json");
    let probes = dir.join("probe_weights.json");
    std::fs::write(&probes, "{\"format\": \"something else\"}").unwrap();
    let (d, p) = (ds.to_str().unwrap(), probes.to_str().unwrap());
    let no_model = "/nonexistent/model.gguf";
    let empty = dir.join("empty");
    let e = empty.to_str().unwrap();
    let conv = |probes: &str, needle: &str| {
        refused(
            &[
                "conversation",
                "--model",
                no_model,
                "--dataset",
                d,
                "--probes",
                probes,
            ],
            needle,
        )
    };
    std::fs::write(
        &ds,
        r#"{"conversations": [{"id": "a", "turns": [{"role": "robot", "content": "hi"}]}]}"#,
    )
    .unwrap();
    conv(p, "role 'robot'");
    std::fs::write(&ds, r#"{"conversations": [{"id": "a", "turns": [{"role": "user", "content": "hi"}], "cue_turn": 3}]}"#).unwrap();
    conv(p, "cue_turn 3");
    std::fs::write(
        &ds,
        r#"{"conversations": [{"id": "a", "turns": [{"role": "user", "content": "hi"}]}]}"#,
    )
    .unwrap();
    conv(p, "not a probe weights file");
    conv("/nonexistent/probes", "no such file or folder");
    conv(e, "no such file or folder");
    std::fs::create_dir_all(&empty).unwrap();
    conv(e, "no probe_weights.json there");
    refused(
        &[
            "serve",
            "--model",
            no_model,
            "--probes",
            "/nonexistent/probes",
        ],
        "no such file or folder",
    );
    refused(
        &["serve", "--model", no_model, "--max-new-tokens", "0"],
        "--max-new-tokens",
    );
}
