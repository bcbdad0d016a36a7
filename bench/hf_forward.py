"""HF transformers side of the forward benchmark (see bench/README.md).

Runs the 64 persona prompts through the GGUF model loaded by transformers (dequantized to f32,
eager attention, 2 threads) with the full residual stream (output_hidden_states=True), left
padded in batches, and prints one JSON line: tokens/s (real prompt tokens) and peak RSS.
"""
import argparse, json, os, resource, sys, time

p = argparse.ArgumentParser()
p.add_argument("--models-dir", required=True)
p.add_argument("--gguf", required=True)
p.add_argument("--ids", required=True, help="JSON file: list of token-id lists (from persona-lens tokenize)")
p.add_argument("--batch-size", type=int, default=1)
p.add_argument("--mode", choices=["all_logits", "keep1"], default="all_logits")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--repeats", type=int, default=2)
a = p.parse_args()

import torch
from hf_common import load_model

model = load_model(a.models_dir, a.gguf, a.threads)
seqs = json.load(open(a.ids))
pad_id = 0
n_tokens = sum(len(s) for s in seqs)

def run_once():
    for i in range(0, len(seqs), a.batch_size):
        chunk = seqs[i:i + a.batch_size]
        t = max(len(s) for s in chunk)
        ids = torch.tensor([[pad_id] * (t - len(s)) + s for s in chunk])
        mask = torch.tensor([[0] * (t - len(s)) + [1] * len(s) for s in chunk])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, use_cache=False)
        if a.mode == "keep1":
            kw["logits_to_keep"] = 1
        with torch.inference_mode():
            out = model(**kw)
        _ = out.hidden_states

run_once()  # warm-up
best = float("inf")
for _ in range(a.repeats):
    t0 = time.perf_counter(); run_once(); best = min(best, time.perf_counter() - t0)
print(json.dumps({"impl": f"hf-transformers ({a.mode})", "batch_size": a.batch_size, "tokens": n_tokens,
                  "seconds": best, "tokens_per_s": n_tokens / best,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
