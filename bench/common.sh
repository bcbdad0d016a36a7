# Shared setup of the bench scripts (sourced): repository root, model file name, the HF venv.
# Sets: model, models, bin, gguf, venv, out.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
model="${1:-gemma-3-270m}"
models="${PERSONA_LENS_MODELS:-$PWD/models}"
bin=target/release/persona-lens
case "$model" in
  gemma-3-270m) gguf=gemma-3-270m-q4_k_m.gguf ;;
  smollm2-135m-instruct) gguf=SmolLM2-135M-Instruct.Q4_1.gguf ;;
  *) echo "error: unknown model '$model'; use gemma-3-270m or smollm2-135m-instruct" >&2; exit 2 ;;
esac
[ -x "$bin" ] || { echo "error: $bin missing; run 'cargo build --release' first" >&2; exit 2; }
[ -f "$models/$gguf" ] || { echo "error: $models/$gguf missing; run 'make models' first" >&2; exit 2; }
venv=bench/.venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch transformers transformer_lens gguf accelerate sentencepiece protobuf
fi
out=bench/out; mkdir -p "$out"
