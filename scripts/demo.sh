#!/usr/bin/env bash
# The main job on the default model (gemma-3-270m) until the full study lands:
# inspect the model, generate for two personas, and cache the residual stream of persona prompts.
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
echo "demo outputs in $out/"
