"""TransformerLens side of the forward benchmark (see bench/README.md): what researchers would run
instead. TransformerLens 4's TransformerBridge wraps the same HF model load as bench/hf_forward.py
(GGUF dequantized to f32, eager attention, 2 threads); `run_with_cache` keeps the same hooks as
persona-lens's bench (`hook_embed` + every `blocks.{l}.hook_resid_post`), left-padded batches with
an attention mask and position ids. Prints one JSON line like hf_forward.py."""
import argparse, json, resource, time

p = argparse.ArgumentParser()
p.add_argument("--models-dir", required=True)
p.add_argument("--gguf", required=True)
p.add_argument("--ids", required=True)
p.add_argument("--batch-size", type=int, default=1)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--repeats", type=int, default=1)
a = p.parse_args()

import torch
from hf_common import load_model
from transformers import AutoTokenizer
from transformer_lens.model_bridge import TransformerBridge

hf = load_model(a.models_dir, a.gguf, a.threads)
# A config read from GGUF names no architecture; the bridge picks its adapter by it.
hf.config.architectures = [type(hf).__name__]
tok = AutoTokenizer.from_pretrained(a.models_dir, gguf_file=a.gguf)
bridge = TransformerBridge.boot_transformers(a.models_dir, hf_model=hf, tokenizer=tok)
n_layers = hf.config.num_hidden_layers
names = {"hook_embed"} | {f"blocks.{l}.hook_resid_post" for l in range(n_layers)}
seqs = json.load(open(a.ids))
n_tokens = sum(len(s) for s in seqs)


def run_once():
    for i in range(0, len(seqs), a.batch_size):
        chunk = seqs[i:i + a.batch_size]
        t = max(len(s) for s in chunk)
        ids = torch.tensor([[0] * (t - len(s)) + s for s in chunk])
        mask = torch.tensor([[0] * (t - len(s)) + [1] * len(s) for s in chunk])
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names)
        assert len(cache) == len(names), sorted(cache.keys())[:5]


run_once()  # warm-up
best = float("inf")
for _ in range(a.repeats):
    t0 = time.perf_counter(); run_once(); best = min(best, time.perf_counter() - t0)
print(json.dumps({"impl": "transformer-lens run_with_cache", "batch_size": a.batch_size, "tokens": n_tokens,
                  "seconds": best, "tokens_per_s": n_tokens / best,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
