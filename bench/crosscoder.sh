#!/usr/bin/env bash
# Crosscoder training throughput and memory: persona-lens `diff train` vs the same objective in
# PyTorch (bench/torch_crosscoder.py), same store, batch, steps and threads, in the same run.
# Usage: bench/crosscoder.sh [STORE] [STEPS] [DICT_SIZE]   (STORE: a `diff harvest` output)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" gemma-3-270m
store="${1:-out/diff/store}"; steps="${2:-300}"; dict="${3:-1024}"; batch=256
threads="$(nproc)"
[ -f "$store/paired.json" ] || { echo "error: $store has no paired.json; run 'persona-lens diff harvest --out $store' first" >&2; exit 2; }
cc="$out/crosscoder_bench"; rm -rf "$cc"
/usr/bin/time -v "$bin" diff train --store "$store" --out "$cc" --steps "$steps" --dict-size "$dict" \
  --batch-size "$batch" --checkpoint-every 0 --threads "$threads" --quiet >"$out/cc_ours.txt" 2>"$out/cc_ours_time.txt"
ours_rows=$(python3 -c "import json;print(json.load(open('$cc/train_log.json'))['rows_per_second'])")
ours_rss=$(awk -F': ' '/Maximum resident/ {print $2/1024}' "$out/cc_ours_time.txt")
peer=$("$venv/bin/python" bench/torch_crosscoder.py "$store" "$steps" "$batch" "$dict" "$threads")
python3 - "$ours_rows" "$ours_rss" "$peer" "$store" "$steps" "$dict" <<'PY'
import json, sys
ours, rss, peer = float(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
meta = json.load(open(sys.argv[4] + "/paired.json"))
print(f"crosscoder training, {' vs '.join(meta['models'])} store ({meta['rows']} rows, d={meta['d']}), F={sys.argv[6]}, batch 256, {sys.argv[5]} steps")
print(f"  persona-lens : {ours:9.0f} rows/s, peak RSS {rss:7.0f} MB (includes the normaliser pass and saving)")
print(f"  {peer['peer']:12} : {peer['rows_per_s']:9.0f} rows/s, peak RSS {peer['peak_rss_mb']:7.0f} MB (whole store in memory)")
print(f"  ratio        : {ours / peer['rows_per_s']:.2f}x throughput, {rss / peer['peak_rss_mb']:.2f}x memory")
PY
