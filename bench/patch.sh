#!/usr/bin/env bash
# Patching benchmark: the golden pair's resid_pre sweep (layer x position) + per-head z sweep at the
# last position, persona-lens (batched incremental) vs the HF one-forward-per-patch loop, same
# machine, same run, 2 threads each. Not part of CI. Usage: bench/patch.sh [model-short-name]
source "$(dirname "$0")/common.sh" "$@"
clean="I am a child. Explain the twin paradox simply. The key idea is"
corrupted="I am a physicist. Explain the twin paradox simply. The key idea is"
g="tests/fixtures/golden/$model/patching.json"
a_word=$(python3 -c "import json;print(json.load(open('$g'))['answer_token_a']['text'])")
b_word=$(python3 -c "import json;print(json.load(open('$g'))['answer_token_b']['text'])")
# persona-lens: best of 2 runs, each loads the model (load time excluded: per-sweep seconds).
for i in 1 2; do
  "$bin" patch --model "$model" --threads 2 --clean "$clean" --corrupted "$corrupted" \
    --answer-a "$a_word" --answer-b "$b_word" --sweep resid_pre,z_last --no-chat --no-files --json > "$out/patch_pl_$i.json"
done
"$bin" patch --model "$model" --threads 2 --clean "$clean" --corrupted "$corrupted" \
  --answer-a "$a_word" --answer-b "$b_word" --sweep resid_pre,z_last --no-chat --no-files --json --one-by-one > "$out/patch_pl_obo.json"
cids=$(python3 -c "import json;print(json.dumps(json.load(open('$out/patch_pl_1.json'))['clean']['ids']))")
kids=$(python3 -c "import json;print(json.dumps(json.load(open('$out/patch_pl_1.json'))['corrupted']['ids']))")
ma=$(python3 -c "import json;print(json.load(open('$out/patch_pl_1.json'))['metric']['spec']['a'])")
mb=$(python3 -c "import json;print(json.load(open('$out/patch_pl_1.json'))['metric']['spec']['b'])")
"$venv/bin/python" bench/hf_patch.py --models-dir "$models" --gguf "$gguf" --clean-ids "$cids" \
  --corrupted-ids "$kids" --a "$ma" --b "$mb" --threads 2 > "$out/patch_hf.json"
python3 - "$out" "$model" <<'PY'
import json, sys
out, model = sys.argv[1], sys.argv[2]
pl = [json.load(open(f"{out}/patch_pl_{i}.json")) for i in (1, 2)]
obo = json.load(open(f"{out}/patch_pl_obo.json"))
hf = json.load(open(f"{out}/patch_hf.json"))
def secs(r): return r["sweeps"]["resid_pre_denoise"]["seconds"] + r["sweeps"]["z_last_denoise"]["seconds"]
best = min(pl, key=secs)
err = max(max(abs(x - y) for x, y in zip(rx, ry)) for k in ("resid_pre", "z_last")
          for rx, ry in zip(best["sweeps"][f"{k}_denoise"]["values"], hf[k]))
print(f"\npatching benchmark, {model}: resid_pre sweep + z_last head sweep ({hf['n_forwards']} patches), 2 threads")
print(f"{'impl':<44}{'resid_pre s':>12}{'z_last s':>10}{'total s':>10}{'speed-up':>10}")
rows = [("HF transformers loop (1 forward/patch)", hf["resid_sweep_s"], hf["head_sweep_s"]),
        ("persona-lens one-by-one (1 forward/patch)", obo["sweeps"]["resid_pre_denoise"]["seconds"], obo["sweeps"]["z_last_denoise"]["seconds"]),
        ("persona-lens batched incremental", best["sweeps"]["resid_pre_denoise"]["seconds"], best["sweeps"]["z_last_denoise"]["seconds"])]
hf_total = rows[0][1] + rows[0][2]
for n, r, z in rows:
    print(f"{n:<44}{r:>12.2f}{z:>10.2f}{r+z:>10.2f}{hf_total/(r+z):>9.1f}x")
print(f"max |persona-lens - HF| over both sweeps: {err:.2e} (logits)")
PY
