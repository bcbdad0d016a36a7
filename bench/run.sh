#!/usr/bin/env bash
# Forward benchmark: persona-lens vs HF transformers on the same 64 persona prompts, same
# machine, same run. Not part of CI. Usage: bench/run.sh [model-short-name]   (default gemma-3-270m)
source "$(dirname "$0")/common.sh" "$@"
# Token ids from persona-lens (identical to HF's tokenizer: see the golden tokenization tests).
"$bin" bench-forward --model "$model" --prompts bench/prompts.json --repeats 1 --dump-ids "$out/ids.json" > /dev/null
: > "$out/results.jsonl"
for bs in 1 16; do
  "$bin" bench-forward --model "$model" --prompts bench/prompts.json --batch-size "$bs" --threads 2 --json | tee -a "$out/results.jsonl"
  for mode in all_logits keep1; do
    "$venv/bin/python" bench/hf_forward.py --models-dir "$models" --gguf "$gguf" --ids "$out/ids.json" \
      --batch-size "$bs" --mode "$mode" --threads 2 | tee -a "$out/results.jsonl"
  done
done
python3 - "$out/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"\n{'impl':<34}{'batch':>6}{'tok/s':>10}{'peak RSS MiB':>14}{'speed vs this HF':>18}{'RSS vs this HF':>16}")
for bs in sorted({r['batch_size'] for r in rows}):
    pl = [r for r in rows if r['batch_size'] == bs and r['impl'].startswith('persona-lens')][0]
    for r in [x for x in rows if x['batch_size'] == bs]:
        sp = pl['tokens_per_s'] / r['tokens_per_s']; rss = pl['peak_rss_mib'] / r['peak_rss_mib']
        print(f"{r['impl']:<34}{bs:>6}{r['tokens_per_s']:>10.1f}{r['peak_rss_mib']:>14.0f}{sp:>17.2f}x{rss:>15.2f}x")
PY
