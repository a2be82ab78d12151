# rlft: `make demo` installs and runs the main job; `make test` installs and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Compiled DeepSpeed ops are cached here across runs (the CPU communication op takes ~30 s to build once).
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/rlft/torch_extensions

.PHONY: setup demo test test-fast lock clean

setup: $(STAMP)

# Pinned set from constraints.txt; torch==2.13.0 in the same command takes the CPU build. The registry's
# torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on CPU, and rlft needs none of them.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0 -e '.[cpu,dev]'
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

# SFT warm start, then GRPO from its model; each run leaves metrics.jsonl, curves.png and summary.json.
demo: setup
	$(BIN)/rlft train configs/sft_tiny.yaml
	$(BIN)/rlft train configs/grpo_tiny.yaml

test: setup
	$(BIN)/python -m pytest

# Everything but the end-to-end runs marked slow.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# Re-pin constraints.txt from the current environment.
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^(torchvision|torchaudio|torchcodec)==' > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
