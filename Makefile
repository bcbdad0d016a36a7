# persona-lens: the two quick-start commands are `make demo` and `make test`.
MODELS ?= $(or $(PERSONA_LENS_MODELS),models)
export PERSONA_LENS_MODELS := $(abspath $(MODELS))
BIN := target/release/persona-lens

.PHONY: demo test test-python python models mkl build lint bench clean-out check-report dashboard

models:
	scripts/fetch-models.sh $(MODELS)

# Intel MKL's runtime from PyPI's `mkl` wheel into mkl/lib (x86_64 Linux; a no-op elsewhere).
# persona-lens opens it at run time for every f32 matrix product (crates/engine/src/mkl.rs);
# without it the same build runs on gemm's kernels, slower (bench/README.md).
mkl:
	scripts/fetch-mkl.sh mkl

build: mkl
	cargo build --release -p persona-lens

# The main job on the default model (grows into the whole study: see README).
demo: models build
	scripts/demo.sh $(BIN) out/demo

# The live dashboard on the default chat model: two user attributes' probes trained once
# (novice/expert, and neutral/biased: a belief to validate) under out/dashboard-probes, then
# `persona-lens serve` on http://127.0.0.1:7878/.
DASH_MODEL ?= smollm2-135m-instruct
DASH_PROBES := out/dashboard-probes
dashboard: models build
	[ -f $(DASH_PROBES)/expertise/probe_weights.json ] || $(BIN) probe --model $(DASH_MODEL) --out $(DASH_PROBES)/expertise
	[ -f $(DASH_PROBES)/belief/probe_weights.json ] || $(BIN) probe --model $(DASH_MODEL) --persona-pair belief-neutral --classes neutral,biased --out $(DASH_PROBES)/belief
	$(BIN) serve --model $(DASH_MODEL) --probes $(DASH_PROBES)

# Python with the `gguf` package: the tests read exported control vectors with llama.cpp's reader.
TOOLS_PY := .venv-tools/bin/python
$(TOOLS_PY):
	python3 -m venv .venv-tools
	.venv-tools/bin/pip install --quiet gguf

# The Python package's venv: maturin builds the extension into it, pytest runs its tests,
# matplotlib lets the notebook example draw, Ray runs persona_lens.distributed, selenium drives
# Debian's chromium in the dashboard test.
PY_VENV := .venv-py
PY := $(PY_VENV)/bin/python
$(PY):
	python3 -m venv $(PY_VENV)
	$(PY_VENV)/bin/pip install --quiet maturin pytest numpy matplotlib "ray>=2.40,<3" "selenium>=4.20,<5"

# `import persona_lens` in .venv-py (an editable install of crates/py, built by maturin).
python: $(PY)
	cd crates/py && VIRTUAL_ENV=$(abspath $(PY_VENV)) PATH=$(abspath $(PY_VENV))/bin:$$PATH maturin develop

# The test suite on the real models (fetched first). Dependencies are optimised in the test profile.
# Where mkl/lib holds MKL the tests run on it and its own tests must not skip; the engine's
# reference tests then run once more on gemm's kernels (PERSONA_LENS_MKL=off), the path of
# machines without MKL.
test: models mkl $(TOOLS_PY)
	PERSONA_LENS_REQUIRE_MKL=$$([ -f mkl/lib/VERSION ] && echo 1) PERSONA_LENS_PYTHON=$(abspath $(TOOLS_PY)) cargo test --workspace -- --test-threads 2
	PERSONA_LENS_MKL=off cargo test -p persona-lens-engine --test golden --test tiny_models --test hf_checkpoints -- --test-threads 2
	$(MAKE) test-python

# The Python package against the command line built from the same sources; the dashboard
# (`persona-lens serve`) over HTTP and in headless Chromium.
# `--workspace --bins` resolves features as `cargo test --workspace` did, so after `make test`'s
# cargo run it reuses that build (`-p persona-lens` resolved them differently and recompiled every
# dependency: 6.7 min).
test-python: models python
	cargo build --workspace --bins
	$(PY) -m pytest crates/py/tests crates/serve/tests -q

lint:
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings

bench: models build
	bench/run.sh

# Render the demo's report.html in headless Chromium (Debian's `chromium`): screenshot, no console messages.
check-report:
	scripts/check-report.sh out/demo/report.html out/demo/report_screenshot.png
