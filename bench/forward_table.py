"""Median table of bench/run.sh's rounds: tokens/s, achieved GFLOP/s (block projections per real
token, as persona-lens's bench-forward counts them), peak RSS, and persona-lens's ratio against
each peer at the same batch size. Usage: forward_table.py RESULTS.jsonl MODEL"""
import json, statistics, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]


def cpu():
    """The CPU the rounds ran on and whether it has AVX-512: the peers' speed depends on it."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "CPU unknown"
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    return f"{name}, {isa}, {info.count('processor')} logical CPUs"


gflop = next(r["block_gflop_per_token"] for r in rows if "block_gflop_per_token" in r)
print(f"\n{sys.argv[2]}: medians of {max(r['round'] for r in rows)} alternating rounds "
      f"({gflop:.3f} GFLOP per token in the block projections); {cpu()}")
print("| impl | batch | tokens/s (median) | rounds | GFLOP/s | peak RSS MiB | persona-lens speed ratio |")
print("|---|---:|---:|---|---:|---:|---:|")
for bs in sorted({r["batch_size"] for r in rows}):
    by = {}
    for r in rows:
        if r["batch_size"] == bs:
            # persona-lens names its matrix multiply (MKL or gemm's kernels) since 2026-12-06.
            name = f"{r['impl'][:-1]}, matmul on {r['matmul']})" if "matmul" in r else r["impl"]
            by.setdefault(name, []).append(r)
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in by.items()}
    pl = next(k for k in by if k.startswith("persona-lens"))
    for k, v in by.items():
        rs = " / ".join(f"{x['tokens_per_s']:.0f}" for x in v)
        rss = max(x["peak_rss_mib"] for x in v)
        ratio = "" if k == pl else f"**{med[pl] / med[k]:.2f}x**"
        print(f"| {k} | {bs} | {med[k]:.1f} | {rs} | {med[k] * gflop:.1f} | {rss:.0f} | {ratio} |")
