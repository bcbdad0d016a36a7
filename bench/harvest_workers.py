"""Harvest throughput with 1 and 2 Ray workers side by side (persona_lens.distributed), beside the
single-process `persona-lens diff harvest` with the same thread budget, alternating in each
round of one invocation; medians and ratios printed.

    make python                                  # .venv-py with persona_lens and Ray
    .venv-py/bin/python bench/harvest_workers.py [--rounds 3] [--bin target/debug/persona-lens]

Workload: the default pair (gemma-3-270m base vs SmolLM2-135M-Instruct chat, each at its middle
layer's resid_post, last-token rows), the 64 persona prompts of `bench/prompts.json`, batch 4,
8 parts. Each worker runs one thread; the single process runs two (the machine's two cores).
Wall time includes loading the models in each worker (what a real run pays once per worker).
Ray is started once, on 127.0.0.1, inside a network namespace holding only the loopback
interface when `unshare` is available (as the tests do).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PL_BENCH_NETNS") is None and shutil.which("unshare") and shutil.which("ip"):
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0:
        os.environ["PL_BENCH_NETNS"] = "1"
        cmd = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
               sys.executable, *sys.argv]
        sys.exit(subprocess.run(cmd).returncode)

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
import ray  # noqa: E402

from persona_lens import distributed  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--bin", default=str(ROOT / "target" / "debug" / "persona-lens"))
ap.add_argument("--batch-size", type=int, default=4)
ap.add_argument("--shards", type=int, default=8)
args = ap.parse_args()

tmp = Path(tempfile.mkdtemp(prefix="pl-bench-harvest-"))
prompts = json.loads((ROOT / "bench" / "prompts.json").read_text())["prompts"]
corpus = tmp / "corpus.txt"
corpus.write_text("\n".join(prompts) + "\n")
n = len(prompts)
h = dict(corpus=str(corpus), batch_size=args.batch_size)

ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False)


def ray_run(workers: int, out: Path) -> float:
    t0 = time.time()
    distributed.harvest(out, workers=workers, n_shards=args.shards, resume=False, **h)
    return time.time() - t0


def cli_run(out: Path) -> float:
    t0 = time.time()
    subprocess.run([args.bin, "diff", "harvest", "--corpus", str(corpus), "--batch-size",
                    str(args.batch_size), "--threads", "2", "--quiet", "--out", str(out)],
                   check=True, capture_output=True)
    return time.time() - t0


impls = {
    "ray, 1 worker x 1 thread": lambda out: ray_run(1, out),
    "ray, 2 workers x 1 thread": lambda out: ray_run(2, out),
    "CLI, 1 process x 2 threads": cli_run,
}
times = {k: [] for k in impls}
for r in range(args.rounds):
    order = list(impls) if r % 2 == 0 else list(reversed(impls))
    for k in order:
        out = tmp / f"{k.split(',')[0]}-{len(times[k])}-{r}".replace(" ", "_")
        times[k].append(impls[k](out))
        print(f"round {r + 1}: {k}: {times[k][-1]:.1f} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
ray.shutdown()

base = statistics.median(times["ray, 1 worker x 1 thread"])
print(f"\n{n} samples, batch {args.batch_size}, {args.shards} parts, {args.rounds} alternating rounds (medians)")
print(f"{'impl':<30}{'wall s':>9}{'samples/s':>11}{'vs 1 worker':>13}")
for k, v in times.items():
    m = statistics.median(v)
    print(f"{k:<30}{m:>9.1f}{n / m:>11.2f}{base / m:>12.2f}x")
shutil.rmtree(tmp, ignore_errors=True)
