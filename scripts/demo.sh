#!/usr/bin/env bash
# The main job: the whole study on the default model (smollm2-135m-instruct, a chat model) in one command.
# `persona-lens run --experiment all` loads the model once and runs probe, lens, patch, heads,
# ablate, steer and diff, then writes summary.json, report.md and report.html into the folder.
# Re-running skips nothing unless --resume is given; an interrupted run (Ctrl-C) finishes with
# `scripts/demo.sh BIN OUT --resume`.
set -euo pipefail
bin="${1:-target/release/persona-lens}"
out="${2:-out/demo}"
shift $(( $# > 2 ? 2 : $# ))
"$bin" run --experiment all --model smollm2-135m-instruct --out "$out" "$@"
echo "report: $out/report.html (self-contained), $out/report.md; numbers: $out/summary.json"
