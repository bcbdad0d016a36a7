//! `persona-lens run --experiment all` end to end on the real default model (small settings):
//! the summary's structure, every plot a valid PNG + SVG, the report's numbers equal to the
//! summary's, and a copy of the run's folder with two steps removed, resumed from the resolved
//! config and interrupted (SIGINT) mid-step, that leaves no partial file and finishes with
//! --resume to a byte-identical summary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::models;
// The report's number format: the library's own, so the check compares like with like.
use persona_lens_study::study::fmt_num;

/// Small settings: every step runs, on few prompts.
const SMALL: &str = r#"
n_questions_per_pair = 1
seed = 7

[lens]
n_questions_per_pair = 1

[heads]
n_questions_per_pair = 2
top = 3

[ablate]
modes = ["zero"]
n_random = 2
n_random_test = 2
n_generate = 1
gen_tokens = 8

[steer]
layers = [6]
alphas = [0.0, 4.0]
n_prompts = 2
n_eval_prompts = 3
n_random = 3
max_new_tokens = 12
bootstrap = 200

[diff]
dict_size = 64
steps = 40
batch_size = 32
k = 8
max_dataset_items = 24
n_questions_per_pair = 2
top_k = 5
n_verify = 2
"#;

fn cmd(config: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_persona-lens"));
    c.args(["run", "--experiment", "all", "--quiet", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("PERSONA_LENS_MODELS", models());
    c
}

fn run_ok(config: &Path, out: &Path, extra: &[&str]) -> String {
    let o = cmd(config, out, extra).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "run failed: {err}");
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", p.display()))
}

fn check_png(p: &Path) {
    let f = std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let dec = png::Decoder::new(std::io::BufReader::new(f));
    let mut r = dec
        .read_info()
        .unwrap_or_else(|e| panic!("{} is not a PNG: {e}", p.display()));
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r
        .next_frame(&mut buf)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        info.width > 100 && info.height > 100,
        "{}: tiny image",
        p.display()
    );
}

fn check_svg(p: &Path) {
    let s = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        s.contains("<svg") && s.trim_end().ends_with("</svg>"),
        "{} is not a complete SVG",
        p.display()
    );
}

/// No temp file anywhere, and every JSON file parses.
fn check_no_partial_files(dir: &Path) {
    for e in walk(dir) {
        let name = e.file_name().unwrap().to_string_lossy().to_string();
        assert!(!name.ends_with(".tmp"), "temp file left: {}", e.display());
        if name.ends_with(".json") {
            read_json(&e);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for f in walk(from) {
        let dest = to.join(f.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dest).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut v = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                v.extend(walk(&p));
            } else {
                v.push(p);
            }
        }
    }
    v
}

#[test]
fn whole_study_end_to_end() {
    let base = std::env::temp_dir().join(format!("pl-study-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let config = base.join("small.toml");
    std::fs::write(&config, SMALL).unwrap();

    // 1. One full run.
    let a = base.join("a");
    let t = Instant::now();
    let stdout = run_ok(&config, &a, &[]);
    println!("study run: {:.1} s", t.elapsed().as_secs_f64());
    assert!(stdout.contains("summary.json"), "{stdout}");
    let s = read_json(&a.join("summary.json"));
    for k in [
        "objective",
        "model",
        "dataset",
        "headlines",
        "negative_results",
        "circuit",
        "plots",
        "executive_summary",
        "steps",
    ] {
        assert!(!s[k].is_null(), "summary.json lacks {k}");
    }
    assert_eq!(s["model"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        s["steps_run"],
        serde_json::json!(["probe", "lens", "patch", "heads", "ablate", "steer", "diff"])
    );
    let headlines = s["headlines"].as_array().unwrap();
    assert!(headlines.len() >= 10, "{} headlines", headlines.len());
    for h in headlines {
        assert!(h["value"].is_number(), "{h}");
        assert!(!h["unit"].as_str().unwrap().is_empty(), "{h}");
        assert_eq!(h["provenance"]["model"], "smollm2-135m-instruct", "{h}");
        assert_eq!(h["provenance"]["seed"], 7, "{h}");
        assert!(h["provenance"]["file"].is_string(), "{h}");
    }
    let ids: Vec<&str> = headlines
        .iter()
        .map(|h| h["id"].as_str().unwrap())
        .collect();
    for id in [
        "probe.best_accuracy",
        "lens.final_gap",
        "patch.clean_minus_corrupted",
        "heads.top_score",
        "ablate.baseline_gap",
        "steer.select.grade_change",
        "steer.eval.perplexity_ratio",
        "diff.fve",
    ] {
        assert!(ids.contains(&id), "missing headline {id}: {ids:?}");
    }
    // The lens read every prompt's residual rows from the probe's stored activations.
    let lens = &s["steps"]["lens"];
    let n_lens: u64 = lens["personas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["n"].as_u64().unwrap())
        .sum();
    assert_eq!(n_lens, 192); // 8 topics x 1 question x 12 persona paraphrases x 2 personas
    assert_eq!(lens["prompts_from_probe_activations"], n_lens);
    let acc = headlines
        .iter()
        .find(|h| h["id"] == "probe.best_accuracy")
        .unwrap();
    assert!(acc["value"].as_f64().unwrap() > 0.5, "{acc}");
    assert_eq!(s["circuit"].as_array().unwrap().len(), 3);
    let exec = s["executive_summary"].as_str().unwrap();
    let words = exec.split_whitespace().count();
    assert!(words <= 300, "executive summary of {words} words");
    // Every claim carries its test; a supported one is in the executive summary, an unsupported
    // one among the negative results, with its numbers.
    let claims = s["claims"].as_array().unwrap();
    assert!(claims.len() >= 4, "{} claims", claims.len());
    let claim_ids: Vec<&str> = claims.iter().map(|c| c["id"].as_str().unwrap()).collect();
    for id in [
        "probe.decodable_on_new_questions",
        "probe.beats_bag_of_tokens",
        "lens.persona_moves_final_readout",
    ] {
        assert!(claim_ids.contains(&id), "missing claim {id}: {claim_ids:?}");
    }
    // The report says which kind of model it studied, and how its weights were stored.
    assert_eq!(s["model"]["kind"], "chat");
    assert!(
        exec.contains("a chat model") && exec.contains("Q4_1"),
        "{exec}"
    );
    let negs = serde_json::to_string(&s["negative_results"]).unwrap();
    for c in claims {
        for k in [
            "id",
            "statement",
            "analysis",
            "test",
            "statistic",
            "effect",
            "ci95",
            "p_value",
            "p_adjusted",
            "supported",
        ] {
            assert!(!c[k].is_null(), "claim lacks {k}: {c}");
        }
        let p = c["p_value"].as_f64().unwrap();
        let q = c["p_adjusted"].as_f64().unwrap();
        assert!(p > 0.0 && q >= p && q <= 1.0, "{c}");
        let id = c["id"].as_str().unwrap();
        if c["supported"].as_bool().unwrap() {
            assert!(exec.contains(id), "supported claim {id} not in the summary");
        } else {
            assert!(
                negs.contains(id),
                "unsupported claim {id} not a negative result"
            );
        }
    }
    for filler in [
        "not a capacity artefact",
        "Every result above comes from hooks",
    ] {
        assert!(!exec.contains(filler), "{filler}");
    }

    // 2. Plots: valid PNG and SVG side by side.
    let plots = s["plots"].as_array().unwrap();
    assert!(plots.len() >= 8, "{} plots", plots.len());
    for p in plots {
        let png = a.join(p["png"].as_str().unwrap());
        check_png(&png);
        check_svg(&png.with_extension("svg"));
    }

    // 3. The report's numbers are the summary's.
    let md = std::fs::read_to_string(a.join("report.md")).unwrap();
    let html = std::fs::read_to_string(a.join("report.html")).unwrap();
    for h in headlines {
        let v = fmt_num(h["value"].as_f64().unwrap_or(f64::NAN));
        let label = h["label"].as_str().unwrap();
        let row_md = md
            .lines()
            .find(|l| l.starts_with(&format!("| {}", label.replace('|', "\\|"))))
            .unwrap_or_else(|| panic!("report.md has no row for {label}"));
        assert!(
            row_md.contains(&format!("| {v} |")),
            "report.md row for {label} lacks {v}: {row_md}"
        );
        assert!(
            html.contains(&format!("<td>{v}</td>")),
            "report.html lacks {v} ({label})"
        );
    }
    // The circuit table: each head's score and the 95 % interval of its restoration ratios.
    for c in s["circuit"].as_array().unwrap() {
        let head = c["head"].as_str().unwrap();
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {head} |")))
            .unwrap_or_else(|| panic!("report.md has no circuit row for {head}"));
        let ci = &c["mean_ratio_ci95"];
        let want = format!(
            "| {} | [{}, {}] |",
            fmt_num(c["score"].as_f64().unwrap()),
            fmt_num(ci[0].as_f64().unwrap()),
            fmt_num(ci[1].as_f64().unwrap())
        );
        assert!(row.contains(&want), "circuit row {row} lacks {want}");
    }
    for sec in [
        "Objective",
        "Model and dataset",
        "Key results",
        "Evidence of circuitry",
        "Failures and negative results",
        "Executive summary",
    ] {
        assert!(
            md.contains(sec) && html.contains(sec),
            "report lacks section {sec}"
        );
    }
    assert!(md.contains(s["executive_summary"].as_str().unwrap()));
    assert!(
        !html.contains("<script") && !html.contains("src=\"http"),
        "report.html must be self-contained"
    );
    assert_eq!(html.matches("data:image/png;base64,").count(), plots.len());
    check_no_partial_files(&a);
    let run = read_json(&a.join("run.json"));
    assert_eq!(run["model"]["sha256"], s["model"]["sha256"]);
    assert!(a.join("config.resolved.toml").exists());

    // 4. Resume: a copy of run 1's folder without its patch and ablate steps is resumed from the
    // resolved config and interrupted (SIGINT) mid-ablate: no partial file; --resume finishes it
    // to a summary.json byte-identical to run 1's. The two recomputed steps check determinism
    // (ablate draws random heads and generates); the reused ones, that a moved folder resumes.
    let resolved = a.join("config.resolved.toml");
    let c = base.join("c");
    copy_dir(&a, &c);
    for gone in ["patch", "ablate"] {
        std::fs::remove_dir_all(c.join(gone)).unwrap();
    }
    for gone in ["summary.json", "report.md", "report.html", "run.json"] {
        std::fs::remove_file(c.join(gone)).unwrap();
    }
    let mut child = cmd(&resolved, &c, &["--resume"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !c.join("patch/step.json").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "run never finished the patch step"
        );
        assert!(child.try_wait().unwrap().is_none(), "run ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    // heads is reused at once; the signal lands in ablate
    std::thread::sleep(Duration::from_millis(1500));
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    check_no_partial_files(&c);
    assert!(!c.join("summary.json").exists());
    assert!(
        !c.join("ablate/step.json").exists(),
        "interrupt came too late"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_persona-lens"))
        .args(["run", "--experiment", "all", "--resume", "--config"])
        .arg(&resolved)
        .arg("--out")
        .arg(&c)
        .env("PERSONA_LENS_MODELS", models())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    for step in ["probe", "lens", "patch", "heads", "steer", "diff"] {
        assert!(
            err.contains(&format!("{step}: done earlier, reused")),
            "{err}"
        );
    }
    assert!(err.contains("ablate done in"), "{err}");
    assert_eq!(
        std::fs::read(a.join("summary.json")).unwrap(),
        std::fs::read(c.join("summary.json")).unwrap(),
        "summary.json differs between an uninterrupted run and a resumed run of the same config and seed"
    );
    // Provenance: the copy records the same step commands as the original (paths relative to
    // the study folder), none naming the original folder. Run 1 was `--quiet` and this resume
    // was not: the recomputed steps' commands differ by that display flag only.
    let commands_of = |dir: &Path| {
        read_json(&dir.join("run.json"))["commands"]
            .to_string()
            .replace(",\"--quiet\"", "")
    };
    assert_eq!(commands_of(&a), commands_of(&c));
    let commands = commands_of(&c);
    assert!(
        !commands.contains(a.to_str().unwrap()),
        "run.json names run 1's folder: {commands}"
    );
    assert!(commands.contains("\"--out\",\"probe\""), "{commands}");
    check_no_partial_files(&c);
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn bad_study_inputs_fail_in_one_line() {
    let base = std::env::temp_dir().join(format!("pl-study-bad-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    let bad = base.join("bad.toml");
    std::fs::write(&bad, "n_questions_per_pair = 1\nno_such_key = 3\n").unwrap();
    let one_question = base.join("one_question.toml");
    std::fs::write(&one_question, "[heads]\nn_questions_per_pair = 1\n").unwrap();
    for (args, needle) in [
        (
            vec!["run", "--experiment", "telepathy", "--out"],
            "unknown experiment",
        ),
        (
            vec!["run", "--config", bad.to_str().unwrap(), "--out"],
            "no_such_key",
        ),
        (
            vec!["run", "--config", "/nonexistent.toml", "--out"],
            "cannot read --config",
        ),
        (
            vec!["run", "--quiet", "--experiment", "ablate", "--out"],
            "needs",
        ),
        (
            vec![
                "run",
                "--experiment",
                "heads,ablate",
                "--config",
                one_question.to_str().unwrap(),
                "--out",
            ],
            "ranked on half of the questions",
        ),
    ] {
        let out_dir = base.join("o");
        let o = Command::new(env!("CARGO_BIN_EXE_persona-lens"))
            .args(&args)
            .arg(&out_dir)
            .env("PERSONA_LENS_MODELS", models())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"));
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// The built-in child-phd prompts (1 question per topic, every persona paraphrase) as a dataset
/// file, one pair per question and paraphrase; with `shuffle`, each pair's novice and expert
/// prompts are swapped at random (seeded), so the labels say nothing about the text.
fn pairs_file(path: &Path, shuffle: bool) {
    use persona_lens_analysis::dataset::{generate, GenOptions};
    let ds = generate(&GenOptions {
        persona_pairs: vec!["child-phd".into()],
        n_questions_per_pair: 1,
        ..Default::default()
    })
    .unwrap();
    // splitmix64 of the pair's index: independent fair coins (the low bit of a bare xorshift
    // left the labels correlated with the paraphrase, which the probe duly found).
    let coin = |i: u64| {
        let mut z = i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) >> 63 == 1
    };
    let mut pairs = vec![];
    for (i, nov) in ds.items.iter().filter(|i| i.class == "novice").enumerate() {
        let exp = ds
            .items
            .iter()
            .find(|i| i.id == nov.id.replace("/novice", "/expert"))
            .unwrap();
        let (a, b) = if shuffle && coin(i as u64) {
            (exp, nov)
        } else {
            (nov, exp)
        };
        pairs.push(serde_json::json!({
            "id": format!("{}-{}-{}", nov.topic, nov.question_id, nov.template_id),
            "topic": nov.topic,
            "novice": {"prompt": a.text},
            "expert": {"prompt": b.text},
        }));
    }
    let file = serde_json::json!({"prompt_pairs": {"expertise_level": pairs}});
    std::fs::write(path, serde_json::to_string_pretty(&file).unwrap()).unwrap();
}

/// Known-answer test of the study's claims: the same prompts with their true labels support the
/// probe's "decodable on new questions" claim; with the labels shuffled across prompts (a null
/// study) `run` supports no claim and says so in the executive summary. The real-label study
/// also runs as a library call (`persona_lens_study::study::run`), whose summary must equal the
/// binary's byte for byte.
#[test]
fn null_study_supports_no_claim_and_the_real_labels_do() {
    let base = std::env::temp_dir().join(format!("pl-null-study-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let config = base.join("probe.toml");
    std::fs::write(&config, "seed = 3\nmax_layers = 4\n").unwrap();
    let mut summaries = vec![];
    for shuffle in [false, true] {
        let file = base.join(format!("pairs-{shuffle}.json"));
        pairs_file(&file, shuffle);
        let out = base.join(format!("out-{shuffle}"));
        let o = Command::new(env!("CARGO_BIN_EXE_persona-lens"))
            .args(["run", "--experiment", "probe", "--quiet", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&out)
            .arg("--dataset")
            .arg(&file)
            .env("PERSONA_LENS_MODELS", models())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        summaries.push(read_json(&out.join("summary.json")));
    }
    let supported = |s: &serde_json::Value| -> Vec<String> {
        s["claims"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["supported"] == true)
            .map(|c| c["id"].as_str().unwrap().to_string())
            .collect()
    };
    // The same study as a library call, without the binary: the summary is byte-identical.
    let lib_out = base.join("out-lib");
    let mut spec: persona_lens_study::study::RunArgs = persona_lens_study::spec::defaults();
    spec.experiment = vec!["probe".into()];
    spec.quiet = true;
    spec.config = Some(config.clone());
    spec.out = Some(lib_out.clone());
    spec.dataset = Some(base.join("pairs-false.json"));
    spec.models_dir = Some(models());
    persona_lens_study::study::run(spec).unwrap();
    let summary_bytes = |dir: &Path| std::fs::read(dir.join("summary.json")).unwrap();
    assert!(
        summary_bytes(&lib_out) == summary_bytes(&base.join("out-false")),
        "the library call's summary.json differs from the binary's"
    );
    let (real, null) = (&summaries[0], &summaries[1]);
    for s in [real, null] {
        println!(
            "claims: {}",
            serde_json::to_string_pretty(&s["claims"]).unwrap()
        );
    }
    assert!(
        supported(real).contains(&"probe.decodable_on_new_questions".to_string()),
        "true labels: {:?}",
        supported(real)
    );
    assert!(!null["claims"].as_array().unwrap().is_empty());
    assert_eq!(supported(null), Vec::<String>::new());
    let exec = null["executive_summary"].as_str().unwrap();
    assert!(exec.contains("None of the"), "{exec}");
    let _ = std::fs::remove_dir_all(&base);
}
