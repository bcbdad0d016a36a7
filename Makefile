# persona-lens: the two quick-start commands are `make demo` and `make test`.
MODELS ?= $(or $(PERSONA_LENS_MODELS),models)
export PERSONA_LENS_MODELS := $(abspath $(MODELS))
BIN := target/release/persona-lens

.PHONY: demo test models build lint bench clean-out check-report

models:
	scripts/fetch-models.sh $(MODELS)

build:
	cargo build --release -p persona-lens

# The main job on the default model (grows into the whole study: see README).
demo: models build
	scripts/demo.sh $(BIN) out/demo

# Python with the `gguf` package: the tests read exported control vectors with llama.cpp's reader.
TOOLS_PY := .venv-tools/bin/python
$(TOOLS_PY):
	python3 -m venv .venv-tools
	.venv-tools/bin/pip install --quiet gguf

# The test suite on the real models (fetched first). Dependencies are optimised in the test profile.
test: models $(TOOLS_PY)
	PERSONA_LENS_PYTHON=$(abspath $(TOOLS_PY)) cargo test --workspace -- --test-threads 2

lint:
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings

bench: models build
	bench/run.sh

# Render the demo's report.html in headless Chromium (Debian's `chromium`): screenshot, no console messages.
check-report:
	scripts/check-report.sh out/demo/report.html out/demo/report_screenshot.png
