#!/usr/bin/env bash
# A/B of engine builds or settings on the forward: each CANDIDATE is a command that runs
# persona-lens (a binary path, or `env VAR=VALUE path`), alternated within each round (order
# reversed every other round), one process per run, on bench/prompts.json's token ids.
# Prints one line per run and the medians. Not part of CI. The 2026-12-05/06 levers rows in
# bench/README.md come from this loop.
# Usage: bench/ab_forward.sh ROUNDS CANDIDATE...   (env MODELS, BATCHES: default both models, "1 16")
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="$1"; shift
[ "$#" -ge 2 ] || { echo "error: give ROUNDS and at least two candidate commands" >&2; exit 2; }
export PERSONA_LENS_MODELS="${PERSONA_LENS_MODELS:-$PWD/models}"
models="${MODELS:-smollm2-135m-instruct gemma-3-270m}"; batches="${BATCHES:-1 16}"
out=bench/out; mkdir -p "$out"; log="$out/ab_forward.txt"; : > "$log"
for model in $models; do
  ids="$out/ids-$model.json"
  [ -f "$ids" ] || $1 bench-forward --model "$model" --prompts bench/prompts.json --repeats 1 --dump-ids "$ids" > /dev/null
done
for r in $(seq 1 "$rounds"); do
  cands=("$@"); [ $((r % 2)) -eq 0 ] && mapfile -t cands < <(printf '%s\n' "$@" | tac)
  for model in $models; do for bs in $batches; do for c in "${cands[@]}"; do
    tps=$($c bench-forward --model "$model" --ids "$out/ids-$model.json" --batch-size "$bs" --threads 2 --repeats 1 --json \
      | tail -n 1 | python3 -c "import json,sys; print(round(json.load(sys.stdin)['tokens_per_s'], 1))")
    printf '%s\tb%s\t%s\tr%s\t%s\n' "$model" "$bs" "$c" "$r" "$tps" | tee -a "$log"
  done; done; done
done
python3 - "$log" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    model, bs, cand, _, tps = line.rstrip("\n").split("\t")
    runs[(model, bs, cand)].append(float(tps))
for (model, bs, cand), v in runs.items():
    print(f"{model} {bs} {cand}: median {statistics.median(v):.1f} tok/s ({' / '.join(f'{x:.0f}' for x in v)})")
PY
