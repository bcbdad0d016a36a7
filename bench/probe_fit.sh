#!/usr/bin/env bash
# Probe fitting time, two builds A/B on one saved harvest: `persona-lens probe` with the demo's
# settings finds the activations already in its --out folder (same model, dataset and rule) and
# only fits (every residual row: CV, paraphrase hold-out, shuffled-label control, generalisation
# splits, bag-of-tokens baseline). Alternates the builds over ROUNDS rounds (order reversed every
# other round), reports each build's `seconds` from probe.json and the median ratio.
# Usage: bench/probe_fit.sh BIN_A BIN_B HARVEST_DIR [ROUNDS]
#   HARVEST_DIR: a probe folder of the demo (out/demo/probe), holding activations.{json,safetensors}
set -euo pipefail
a="$1"; b="$2"; harvest="$3"; rounds="${4:-3}"
[ -f "$harvest/activations.safetensors" ] || { echo "error: $harvest has no activations.safetensors; run 'make demo' (or 'persona-lens probe --out DIR') first" >&2; exit 2; }
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
results="$work/rounds.txt"; : > "$results"
run() {  # BIN LABEL
  local dir="$work/$2"; rm -rf "$dir"; mkdir -p "$dir"
  cp "$harvest"/activations.json "$harvest"/activations.safetensors "$dir/"
  "$1" probe --classes novice,expert --lexical-controls --n-questions-per-pair 5 --persona-pair child-phd \
    --split-seed 0 --folds 5 --batch-size 16 --out "$dir" --position last --l2 0.01 --dtype f32 \
    --model smollm2-135m-instruct --seed 0 --template-holdout --quiet >/dev/null
  python3 -c "import json,sys; print(sys.argv[1], json.load(open(sys.argv[2]))['seconds'])" "$2" "$dir/probe.json" >>"$results"
  cp "$dir/probe.json" "$work/$2.probe.json"
}
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then run "$a" A; run "$b" B; else run "$b" B; run "$a" A; fi
done
python3 - "$results" "$work/A.probe.json" "$work/B.probe.json" <<'PY'
import json, statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
t = {k: [float(v) for l, v in rows if l == k] for k in "AB"}
ma, mb = statistics.median(t["A"]), statistics.median(t["B"])
print(f"probe fitting, {len(t['A'])} alternating rounds, medians: A {ma:.1f} s ({' / '.join(f'{v:.1f}' for v in t['A'])}), B {mb:.1f} s ({' / '.join(f'{v:.1f}' for v in t['B'])}), A/B = {ma / mb:.2f}x")
pa, pb = (json.load(open(p)) for p in sys.argv[2:4])
acc = lambda p: [l["cv"]["accuracy"] for l in p["layers"]]
gap = max(abs(x - y) for x, y in zip(acc(pa), acc(pb)))
print(f"largest CV accuracy difference over {len(pa['layers'])} rows: {gap:.4f}")
PY
