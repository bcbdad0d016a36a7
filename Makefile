# persona-lens: the two quick-start commands are `make demo` and `make test`.
MODELS ?= $(or $(PERSONA_LENS_MODELS),models)
export PERSONA_LENS_MODELS := $(abspath $(MODELS))
BIN := target/release/persona-lens

.PHONY: demo test models build lint bench clean-out

models:
	scripts/fetch-models.sh $(MODELS)

build:
	cargo build --release -p persona-lens

# The main job on the default model (grows into the whole study: see README).
demo: models build
	scripts/demo.sh $(BIN) out/demo

# The test suite on the real models (fetched first). Dependencies are optimised in the test profile.
test: models
	cargo test --workspace -- --test-threads 2

lint:
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings

bench: models build
	bench/run.sh
