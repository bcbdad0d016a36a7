//! Specs as values: defaults read off the spec's own command-line definition, parsing an
//! argument list into a spec, and writing a spec back as the stand-alone command that would
//! reproduce it (`command`), which the tests check round-trips.

use clap::{Args, Command, FromArgMatches};
use serde::Serialize;
use serde_json::Value;

/// Parses `args` (no program name) into the spec `T`, exactly as its subcommand would.
pub fn parse<T: Args + FromArgMatches>(args: &[String]) -> Result<T, clap::Error> {
    let cmd = T::augment_args(Command::new("spec").no_binary_name(true));
    let m = cmd.try_get_matches_from(args)?;
    T::from_arg_matches(&m)
}

/// A bad argument list as one line: clap's first line, which names the flag and the problem
/// (`error: invalid value '0' for '--batch-size <BATCH_SIZE>': 0: give at least 1`).
pub fn error_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("error: bad arguments")
        .trim_end()
        .to_string()
}

/// `T` with every field at its default (the command line's defaults: one source).
pub fn defaults<T: Args + FromArgMatches>() -> T {
    parse(&[]).expect("every spec parses with no arguments")
}

/// The arguments that reproduce `spec` on the command line (`persona-lens <sub> <args>`).
/// Field names become `--kebab-case` flags; `true` booleans become bare flags and `false` ones
/// are left out; `None` is left out; lists are comma-separated. Specs whose fields do not follow
/// this mapping have a round-trip test that fails.
pub fn command<T: Serialize>(spec: &T) -> Vec<String> {
    let mut out = vec![];
    if let Ok(Value::Object(m)) = serde_json::to_value(spec) {
        push_fields(&m, &mut out);
    }
    out
}

fn push_fields(m: &serde_json::Map<String, Value>, out: &mut Vec<String>) {
    for (k, v) in m {
        let flag = format!("--{}", k.replace('_', "-"));
        match v {
            Value::Null => {}
            Value::Bool(true) => out.push(flag),
            Value::Bool(false) => {}
            Value::Array(items) => {
                if !items.is_empty() {
                    out.push(flag);
                    out.push(items.iter().map(scalar).collect::<Vec<_>>().join(","));
                }
            }
            Value::Object(inner) => push_fields(inner, out),
            other => {
                out.push(flag);
                out.push(scalar(other));
            }
        }
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{analysis_jobs, diff_jobs, patch_jobs, steer_jobs, study};
    use serde::de::DeserializeOwned;
    use std::fmt::Debug;

    /// Typed enum values by field: a value and a changed value of the same enum.
    const ENUM_NEXT: &[(&str, &str, &str)] = &[
        ("metric", "logit-diff", "logprob"),
        ("metric", "kl", "logit-diff"),
        ("direction", "denoise", "noise"),
        ("direction", "both", "denoise"),
        ("position", "last", "question_last_token"),
        ("rule", "last", "question_last_token"),
        ("kind", "diff_of_means", "probe"),
        ("norm", "raw", "unit"),
        ("positions", "all", "prompt"),
        ("mode", "add", "ablate"),
        ("mode", "zero", "mean"),
        ("mode", "mean", "resample"),
        ("mode", "resample", "zero"),
        ("sweep", "resid_pre", "mlp_out"),
        ("sweep", "resid_mid", "attn_out"),
        ("sweep", "attn_out", "z_last"),
        ("sweep", "mlp_out", "z_all"),
        ("sweep", "z_last", "pattern"),
        ("sweep", "z_all", "resid_pre"),
        ("template", "auto", "shared"),
        ("align", "auto", "tokens"),
        ("objective", "batchtopk", "l1"),
        ("shard", "1/4", "2/4"),
    ];

    /// Every value changed away from what it was: flags set, numbers and strings changed,
    /// lists grown. Keys in `skip` (values a parser restricts) stay as they are. `key` is the
    /// field the value belongs to (a list's items belong to the list's field).
    fn perturb(v: &mut Value, key: &str, skip: &[&str]) {
        match v {
            Value::Bool(b) => *b = !*b,
            Value::Number(n) => {
                *v = match n.as_u64() {
                    Some(u) => Value::from(u + 2),
                    None => Value::from(n.as_f64().unwrap_or(0.0) + 0.25),
                }
            }
            // A value of a typed enum becomes another value of the same enum.
            Value::String(s) => {
                match ENUM_NEXT.iter().find(|(k, from, _)| *k == key && from == s) {
                    Some((_, _, to)) => *s = to.to_string(),
                    None => s.push_str("-x"),
                }
            }
            Value::Array(items) => {
                if let Some(first) = items.first().cloned() {
                    let mut extra = first;
                    perturb(&mut extra, key, skip);
                    items.push(extra);
                }
            }
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    if !skip.contains(&k.as_str()) {
                        perturb(x, k, skip);
                    }
                }
            }
            Value::Null => {}
        }
    }

    /// A spec parsed from `args`, then changed in every field, written back as a command and
    /// parsed again: the same spec.
    fn round_trip<T>(args: &[&str], skip: &[&str])
    where
        T: Args + FromArgMatches + Serialize + DeserializeOwned + PartialEq + Debug,
    {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let spec: T = parse(&args).unwrap();
        assert_eq!(parse::<T>(&command(&spec)).unwrap(), spec);
        let mut v = serde_json::to_value(&spec).unwrap();
        perturb(&mut v, "", skip);
        let changed: T = serde_json::from_value(v).unwrap();
        assert_ne!(changed, spec, "the perturbation changed nothing");
        let cmd = command(&changed);
        let back: T = parse(&cmd).unwrap_or_else(|e| panic!("{cmd:?} does not parse: {e}"));
        assert_eq!(back, changed, "{cmd:?}");
    }

    // Values a parser restricts to a set; one of each pair of flags that exclude each other
    // (`chat` / `no_chat`); the `--template-holdout` / `--no-template-holdout` and `--compare` /
    // `--no-compare` pairs, where the last one given wins (two fields, one setting).
    const SKIP: &[&str] = &[
        "dtype",
        "compare",
        "no_chat",
        "split",
        "quantized",
        "template_holdout",
        "no_template_holdout",
    ];

    #[test]
    fn each_spec_is_the_command_it_writes() {
        round_trip::<analysis_jobs::ProbeArgs>(&["--split", "evaluate"], SKIP);
        round_trip::<analysis_jobs::DirectionArgs>(&["--layer", "3"], SKIP);
        round_trip::<analysis_jobs::LensArgs>(&[], SKIP);
        round_trip::<patch_jobs::PatchArgs>(&[], SKIP);
        round_trip::<patch_jobs::PatchArgs>(&["--metric", "kl", "--direction", "both"], SKIP);
        round_trip::<patch_jobs::AttribArgs>(&[], SKIP);
        round_trip::<patch_jobs::PathPatchArgs>(&[], SKIP);
        round_trip::<patch_jobs::HeadsArgs>(&["--answer-a", "a", "--answer-b", "b"], SKIP);
        round_trip::<patch_jobs::AblateArgs>(&["--heads", "L1H2"], SKIP);
        round_trip::<steer_jobs::SteerArgs>(&["--layer", "3", "--alpha", "2"], SKIP);
        round_trip::<steer_jobs::SteerSweepArgs>(&["--layer", "3,6"], SKIP);
        round_trip::<study::RunArgs>(&["--experiment", "probe,lens"], SKIP);
        round_trip::<diff_jobs::HarvestArgs>(
            &["--shard", "1/4", "--persona-pair", "child-phd"],
            SKIP,
        );
        round_trip::<diff_jobs::TrainArgs>(&[], SKIP);
        round_trip::<diff_jobs::AnalyzeArgs>(&["--crosscoder", "cc"], SKIP);
    }
}
