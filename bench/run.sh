#!/usr/bin/env bash
# Forward benchmark: persona-lens vs HF transformers (`logits_to_keep=1`) vs TransformerLens 4
# (`run_with_cache` through TransformerBridge), same 64 persona prompts, same machine, same
# invocation. The implementations alternate within each round (order reversed every other round,
# one process per run, model load excluded from the timing); the table reports medians over the
# rounds. Not part of CI. Usage: bench/run.sh [model-short-name] [rounds]   (gemma-3-270m, 3)
source "$(dirname "$0")/common.sh" "$@"
rounds="${2:-3}"
# Token ids from persona-lens (identical to HF's tokenizer: see the golden tokenization tests).
"$bin" bench-forward --model "$model" --prompts bench/prompts.json --repeats 1 --dump-ids "$out/ids.json" > /dev/null
results="$out/forward-$model.jsonl"
: > "$results"
run_impl() { # impl batch round
  case "$1" in
    pl) "$bin" bench-forward --model "$model" --ids "$out/ids.json" --batch-size "$2" --threads 2 --repeats 1 --json ;;
    hf) "$venv/bin/python" bench/hf_forward.py --models-dir "$models" --gguf "$gguf" --ids "$out/ids.json" \
          --batch-size "$2" --mode keep1 --threads 2 --repeats 1 2>/dev/null ;;
    tl) "$venv/bin/python" bench/tl_forward.py --models-dir "$models" --gguf "$gguf" --ids "$out/ids.json" \
          --batch-size "$2" --threads 2 --repeats 1 2>/dev/null ;;
  esac | tail -n 1 | python3 -c "import json,sys; r=json.load(sys.stdin); r['round']=$3; print(json.dumps(r))" | tee -a "$results"
}
for r in $(seq 1 "$rounds"); do
  order="pl hf tl"; [ $((r % 2)) -eq 0 ] && order="tl hf pl"
  for bs in 1 16; do for impl in $order; do run_impl "$impl" "$bs" "$r"; done; done
done
python3 bench/forward_table.py "$results" "$model"
