#!/usr/bin/env bash
# Crosscoder training throughput and memory: persona-lens `diff train --objective l1` vs the same
# L1 objective in PyTorch (bench/torch_crosscoder.py), same store, batch, steps and threads,
# alternating over ROUNDS rounds (order reversed every other round), medians reported.
# Usage: bench/crosscoder.sh [STORE] [STEPS] [DICT_SIZE] [ROUNDS]   (STORE: a `diff harvest` output)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" gemma-3-270m
store="${1:-out/diff/store}"; steps="${2:-300}"; dict="${3:-1024}"; rounds="${4:-3}"; batch=256
threads="$(nproc)"
[ -f "$store/paired.json" ] || { echo "error: $store has no paired.json; run 'persona-lens diff harvest --out $store' first" >&2; exit 2; }
cc="$out/crosscoder_bench"
results="$out/cc_rounds.jsonl"; : > "$results"
ours() {
  rm -rf "$cc"
  /usr/bin/time -v "$bin" diff train --objective l1 --store "$store" --out "$cc" --steps "$steps" \
    --dict-size "$dict" --batch-size "$batch" --checkpoint-every 0 --threads "$threads" --quiet \
    >"$out/cc_ours.txt" 2>"$out/cc_ours_time.txt"
  python3 - "$cc/train_log.json" "$out/cc_ours_time.txt" "$1" >>"$results" <<'PY'
import json, re, sys
rows = json.load(open(sys.argv[1]))["rows_per_second"]
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(sys.argv[2]).read()).group(1)) / 1024
print(json.dumps({"impl": "persona-lens", "round": int(sys.argv[3]), "rows_per_s": rows, "peak_rss_mb": rss}))
PY
}
peer() {
  "$venv/bin/python" bench/torch_crosscoder.py "$store" "$steps" "$batch" "$dict" "$threads" \
    | python3 -c "import json,sys; d=json.load(sys.stdin); d.update(impl=d.pop('peer'), round=$1); print(json.dumps(d))" >>"$results"
}
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then ours "$r"; peer "$r"; else peer "$r"; ours "$r"; fi
done
python3 - "$results" "$store" "$steps" "$dict" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
meta = json.load(open(sys.argv[2] + "/paired.json"))
ours = [r for r in runs if r["impl"] == "persona-lens"]
peer = [r for r in runs if r["impl"] != "persona-lens"]
med = lambda rs, k: statistics.median(r[k] for r in rs)
each = lambda rs: " / ".join(f"{r['rows_per_s']:.0f}" for r in rs)
print(f"crosscoder training (L1), {' vs '.join(meta['models'])} store ({meta['rows']} rows, d={meta['d']}), F={sys.argv[4]}, batch 256, {sys.argv[3]} steps, {len(ours)} rounds, medians")
print(f"  persona-lens : {med(ours, 'rows_per_s'):9.0f} rows/s ({each(ours)}), peak RSS {med(ours, 'peak_rss_mb'):7.0f} MB (includes the normaliser pass and saving)")
print(f"  {peer[0]['impl']:12} : {med(peer, 'rows_per_s'):9.0f} rows/s ({each(peer)}), peak RSS {med(peer, 'peak_rss_mb'):7.0f} MB (whole store in memory)")
print(f"  ratio        : {med(ours, 'rows_per_s') / med(peer, 'rows_per_s'):.2f}x throughput, {med(ours, 'peak_rss_mb') / med(peer, 'peak_rss_mb'):.2f}x memory")
PY
