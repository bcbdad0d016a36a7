//! Helpers shared by the binary's integration tests: where the repo and the real models are,
//! running `persona-lens`, and the one-line-error contract.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn models() -> PathBuf {
    match std::env::var_os("PERSONA_LENS_MODELS") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => root().join("models"),
    }
}

/// Runs the binary: (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_persona-lens"))
        .args(args)
        .env("PERSONA_LENS_MODELS", models())
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Runs the binary, asserting success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let (code, out, err) = run(args);
    assert_eq!(code, 0, "{args:?} failed: {err}");
    out
}

/// A bad input: exit code 2, exactly one line on stderr, starting `error: ` and naming the
/// problem (`needle`), no panic.
pub fn assert_one_line_error(args: &[&str], needle: &str) {
    let (code, _, err) = run(args);
    assert_eq!(code, 2, "{args:?} should fail with exit 2: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one error line, got: {err}"
    );
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    // Said once: a wrapper that also prints its source would repeat the message.
    let segs: Vec<&str> = lines[0].split(": ").filter(|s| s.len() > 20).collect();
    for (i, a) in segs.iter().enumerate() {
        assert!(
            !segs[i + 1..].contains(a),
            "{args:?}: the message repeats itself: {}",
            lines[0]
        );
    }
    assert!(
        lines[0].contains(needle),
        "{args:?}: error should mention {needle:?}: {}",
        lines[0]
    );
}
