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
