"""Python overhead on the forward workload: persona_lens.Model.run_with_cache vs the CLI's
`bench-forward`, same token ids, same hooks (hook_embed + every hook_resid_post), same batch
sizes, alternating over rounds in one invocation; medians and ratios printed.

    make python && .venv-py/bin/python bench/python_overhead.py [--model smollm2-135m-instruct] [--rounds 3]

The CLI times its forward loop inside the process (one warm-up, then one timed pass per run);
Python times one `run_with_cache` call per round after one warm-up call, so the Python side also
pays for what the CLI skips: position-aligning the cache and copying it into numpy arrays.
"""

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import persona_lens as pl

ROOT = Path(__file__).resolve().parents[1]
ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m-instruct")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "persona-lens"))
args = ap.parse_args()

ids_file = Path(tempfile.mkdtemp()) / "ids.json"
prompts = str(ROOT / "bench" / "prompts.json")
subprocess.run([args.bin, "bench-forward", "--model", args.model, "--prompts", prompts, "--repeats", "1",
                "--dump-ids", str(ids_file), "--json"], check=True, capture_output=True)
ids = json.loads(ids_file.read_text())
n_tokens = sum(len(s) for s in ids)
model = pl.Model(args.model)
names = "hook_embed,blocks.*.hook_resid_post"

print(f"model {args.model} ({model.cfg['precision']}), {len(ids)} prompts, {n_tokens} tokens, "
      f"{args.rounds} rounds, CLI {args.bin}, persona_lens {pl.__version__}")
print(f"{'batch':>5} {'CLI tok/s':>10} {'Python tok/s':>13} {'Python / CLI':>13} {'overhead':>9}")
for bs in (1, 16):
    model.run_with_cache(ids, names=names, batch_size=bs)  # warm-up
    cli, py = [], []
    for _ in range(args.rounds):
        out = subprocess.run([args.bin, "bench-forward", "--model", args.model, "--ids", str(ids_file),
                              "--batch-size", str(bs), "--repeats", "1", "--json"],
                             check=True, capture_output=True, text=True).stdout
        cli.append(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])
        t0 = time.perf_counter()
        model.run_with_cache(ids, names=names, batch_size=bs)
        py.append(n_tokens / (time.perf_counter() - t0))
    c, p = statistics.median(cli), statistics.median(py)
    print(f"{bs:>5} {c:>10.1f} {p:>13.1f} {p / c:>12.3f}x {100 * (1 - p / c):>8.1f}%")
