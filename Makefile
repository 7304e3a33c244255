# The two commands of the README. Both do all set-up themselves (idempotent).
# Quiet by default (vLLM's and the libraries' messages go to runs/demo/prag.log); VERBOSE=1 shows them.
VENV ?= .venv
VERBOSE ?=
PRAG_FLAGS := $(if $(VERBOSE),--verbose,)
export HF_HUB_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo serve test setup clean-demo

demo:  ## the main job: parameterize an invented corpus and answer it in all five modes
	scripts/setup.sh qwen2.5-coder-0.5b-instruct
	$(VENV)/bin/prag demo --work-dir runs/demo $(PRAG_FLAGS)

serve:  ## the OpenAI-compatible server on 127.0.0.1:8000 (demo corpus, default model; adapters made on first run)
	scripts/setup.sh qwen2.5-coder-0.5b-instruct
	$(VENV)/bin/prag demo --work-dir runs/demo --offline-only $(PRAG_FLAGS)
	$(VENV)/bin/prag serve --work-dir runs/demo $(PRAG_FLAGS) $(SERVE_ARGS)

test:  ## lint, then the test suite (unit tests + one shared vLLM engine on SmolLM2-135M)
	scripts/setup.sh smollm2-135m-instruct
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -p no:cacheprovider -q -rs

setup:
	scripts/setup.sh

clean-demo:
	rm -rf runs/demo
