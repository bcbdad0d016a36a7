#!/usr/bin/env bash
# The main job on the default model (gemma-3-270m) until the full study lands:
# inspect the model, generate for two personas, cache the residual stream of persona prompts,
# probe every residual row for child vs PhD (template hold-out), persona directions, logit lens.
set -euo pipefail
bin="${1:-target/release/persona-lens}"
out="${2:-out/demo}"
mkdir -p "$out"
"$bin" inspect --json > "$out/inspect.json.tmp" && mv "$out/inspect.json.tmp" "$out/inspect.json"
"$bin" inspect
for persona in "a 5-year-old child" "a PhD physicist"; do
  echo "--- You are talking to $persona. Explain why the sky is blue."
  "$bin" generate --prompt "You are talking to $persona. Explain why the sky is blue." --max-new-tokens 24 --greedy
done
"$bin" cache \
  --prompt "You are talking to a 5-year-old child. Explain why the sky is blue." \
  --prompt "You are talking to a PhD physicist. Explain why the sky is blue." \
  --hooks 'hook_embed,blocks.*.hook_resid_post,blocks.*.attn.hook_pattern' \
  --out "$out/persona_cache.safetensors"
# Child vs PhD, 8 topics x 3 questions x 7 templates = 336 prompts.
"$bin" probe --n-questions-per-pair 3 --out "$out/probe"
"$bin" direction --n-questions-per-pair 3 --out "$out/probe" --layer 6 --align-probe-index
"$bin" lens --pair-id physics --n-questions-per-pair 5 --out "$out/lens"
# Activation patching on the golden child/physicist pair (resid_pre and head z sweeps, heatmaps).
"$bin" patch --clean "I am a child. Explain the twin paradox simply. The key idea is" \
  --corrupted "I am a physicist. Explain the twin paradox simply. The key idea is" \
  --answer-a simple --answer-b physics --sweep resid_pre,z_last --out "$out/patch"
# Direct-path path patching: which heads reach the logits directly.
"$bin" path-patch --clean "I am a child. Explain the twin paradox simply. The key idea is" \
  --corrupted "I am a physicist. Explain the twin paradox simply. The key idea is" \
  --answer-a simple --answer-b physics --receivers logits --out "$out/path_patch"
# Steering with the child->PhD direction: dose-response of answer grade and fluency.
"$bin" steer-sweep --direction "$out/probe/directions.safetensors" --layer 5,9 --alpha 0,2,4,8 \
  --n-prompts 8 --max-new-tokens 40 --out "$out/steer_sweep"
echo "demo outputs in $out/"
