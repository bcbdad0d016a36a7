"""Python overhead on the forward workload: persona_lens.Model.run_with_cache against the CLI's
`bench-forward` on the same token ids, hooks (hook_embed + every hook_resid_post) and batch
sizes, alternating over rounds in one invocation; medians and ratios printed.

    cargo build --release -p persona-lens
    (cd crates/py && maturin develop --release)   # into .venv-py, as `make python` does in debug
    .venv-py/bin/python bench/python_overhead.py [--model smollm2-135m-instruct] [--rounds 5]

Two CLI peers, each timed inside the process (one warm-up, one timed pass per run):
`bench-forward --run-with-cache` runs the library call Python wraps (`Model::run_with_cache`, a
position-aligned cache of all prompts): Python / that = the Python layer's overhead. Plain
`bench-forward` drops each batch's captures: rust run_with_cache / that = what assembling the
cache costs any front end. Python times one `run_with_cache` call per round after a warm-up,
on the main thread (how calls run) and through a worker thread (PERSONA_LENS_PY_WORKER_THREAD=1,
how they ran before): main / worker is that lever's effect.
"""

import argparse
import json
import os
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
print(f"{'batch':>5} {'forward tok/s':>14} {'CLI rwc tok/s':>14} {'Python tok/s':>13} "
      f"{'Python / CLI rwc':>17} {'overhead':>9} {'rwc / forward':>14} {'worker tok/s':>14} "
      f"{'main / worker':>14}")


def cli_run(bs, extra):
    out = subprocess.run([args.bin, "bench-forward", "--model", args.model, "--ids", str(ids_file),
                          "--batch-size", str(bs), "--repeats", "1", "--json", *extra],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def py_run(bs, worker_thread=False):
    """One timed run_with_cache; `worker_thread` takes the extension's worker-thread path (what
    every call did before it ran on the main thread), the peer of the main-thread path."""
    if worker_thread:
        os.environ["PERSONA_LENS_PY_WORKER_THREAD"] = "1"
    try:
        t0 = time.perf_counter()
        model.run_with_cache(ids, names=names, batch_size=bs)
        return n_tokens / (time.perf_counter() - t0)
    finally:
        os.environ.pop("PERSONA_LENS_PY_WORKER_THREAD", None)


for bs in (1, 16):
    model.run_with_cache(ids, names=names, batch_size=bs)  # warm-up
    fwd, rwc, py, pyw = [], [], [], []
    for _ in range(args.rounds):
        fwd.append(cli_run(bs, []))
        rwc.append(cli_run(bs, ["--run-with-cache"]))
        py.append(py_run(bs))
        pyw.append(py_run(bs, worker_thread=True))
    f, c, p, w = (statistics.median(v) for v in (fwd, rwc, py, pyw))
    print(f"{bs:>5} {f:>14.1f} {c:>14.1f} {p:>13.1f} {p / c:>16.3f}x {100 * (1 - p / c):>8.1f}% "
          f"{c / f:>13.3f}x {w:>14.1f} {p / w:>13.3f}x")
