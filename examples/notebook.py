"""persona_lens in a notebook, as a script: load, cache, probe, patch, steer, plot.

    python examples/notebook.py --out out/notebook

Each step is one call; numbers come back as numpy arrays. The model is the study's default,
SmolLM2-135M-Instruct (fetched by `make models`).
"""

import argparse
from pathlib import Path

import numpy as np

import persona_lens as pl

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="out/notebook")
ap.add_argument("--model", default="smollm2-135m-instruct")
args = ap.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
small = dict(n_questions_per_pair=1, templates=[0], pair_id=["physics", "biology"], quiet=True)

# 1. Load, and cache the residual stream of a novice and an expert prompt (chat template).
model = pl.Model(args.model)
print(model)
prompts = ["I am a child. Why is the sky blue?", "I have a PhD in physics. Why is the sky blue?"]
logits, cache = model.run_with_cache(prompts, names="blocks.*.hook_resid_post", chat=True)
resid = cache.stack("resid_post")  # [layers, prompts, positions, d_model]
last = [n - 1 for n in cache.prompt_lengths]
gap = np.array([np.linalg.norm(resid[l, 1, last[1]] - resid[l, 0, last[0]]) for l in range(resid.shape[0])])
print(f"cache: {len(cache)} hooks, resid {resid.shape}; novice-expert gap at the last token, "
      f"layer 0: {gap[0]:.2f}, last layer: {gap[-1]:.2f}")

# 2. A probe for the persona at every residual row (held-out phrasings; bag-of-tokens beside it).
probe = pl.probe(model, max_layers=8, folds=2, out=str(out / "probe"), **small)
layers = probe.to_dict()["layers"]
best = max(layers, key=lambda l: l.get("accuracy", 0.0))
print(f"probe: best held-out row {best.get('resid_index')} accuracy {best.get('accuracy', float('nan')):.3f}")

# 3. Activation patching: how much of the clean (child) behaviour each layer's residual restores.
patch = pl.patch(model, clean="I am a child. Explain the sun", corrupted="I am a physicist. Explain the sun",
                 answer_a="simple", answer_b="physics", sweep=["resid_pre"], chat=False, quiet=True,
                 out=str(out / "patch"))
restored = np.asarray(patch.to_dict()["sweeps"]["resid_pre_denoise"]["normalized"])
print(f"patch: resid_pre restoration {restored.shape}, max {restored.max():.2f}")

# 4. Steering: add the persona direction (difference of means at block 9) while generating.
pl.direction(model, out=str(out / "direction"), **small)
steer = pl.steer(model, direction=str(out / "direction" / "directions.safetensors"), layer=[9],
                 alpha=[0, 6], max_new_tokens=12, n_prompts=1, out=str(out / "steer"), **small)
for rec in steer.to_dict()["records"]:
    print(f"steer: alpha {rec['alpha']:>4}: {rec['text']!r}")

# 5. Plot (if matplotlib is there): the residual gap by layer.
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(gap, marker="o")
    ax.set_xlabel("layer (block output)")
    ax.set_ylabel("|expert - novice| (resid units)")
    ax.set_title(f"{model.name}: persona gap at the last token")
    fig.tight_layout()
    fig.savefig(out / "resid_norms.png")
    fig.savefig(out / "resid_norms.svg")
    print(f"plot: {out / 'resid_norms.png'}")
except ImportError:
    print("matplotlib not installed: no plot")
