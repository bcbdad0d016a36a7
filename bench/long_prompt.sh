#!/usr/bin/env bash
# Attention memory on one long prompt: blocked attention (the default: 512 query rows at a time,
# fewer where the keys are many) and MLP chunks (2048 rows) against the whole score matrix and the
# whole MLP at once, same binary, same prompt, alternating, peak RSS of each
# run (its own process). Usage: bench/long_prompt.sh [BIN] [MODEL] [TOKENS] [ROUNDS] [MODES]
# MODES defaults to "blocked whole"; at the full 32k context the whole matrix (16 GiB of scores per
# layer) does not fit a 24 GiB machine, so run MODES=blocked there. Mode "nocapture" is the blocked
# forward without the residual cache (hook_embed + every resid_post) that the other two keep.
set -euo pipefail
BIN=${1:-target/release/persona-lens}
MODEL=${2:-gemma-3-270m}
TOKENS=${3:-8192}
ROUNDS=${4:-1}
MODES=${5:-blocked whole}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 -c "
import json, random
random.seed(0)
print(json.dumps([[2] + [random.randrange(1000, 40000) for _ in range($TOKENS - 1)]]))" > "$dir/ids.json"
for r in $(seq "$ROUNDS"); do
  for mode in $MODES; do
    extra=()
    [ "$mode" = whole ] && extra=(--attention-block "$TOKENS" --mlp-chunk-rows "$TOKENS")
    [ "$mode" = nocapture ] && extra=(--no-capture)
    out=$("$BIN" bench-forward --model "$MODEL" --ids "$dir/ids.json" --repeats 1 --json "${extra[@]}")
    echo "round $r $mode $out"
  done
done
