# rlft: `make demo` installs and runs the main job; `make test` installs and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup warm-caches demo test test-fast lock clean

setup: $(STAMP)

# Pinned set from constraints.txt; torch==2.13.0 in the same command takes the CPU build. The registry's
# torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on CPU, and rlft needs none of them.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0 -e '.[cpu,dev]'
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(MAKE) --no-print-directory warm-caches
	touch $(STAMP)

# What a first run would otherwise build: DeepSpeed's CPU communication op (~30-80 s; compiled with this
# environment's own ninja into ~/.cache/rlft/torch_extensions/<a key of this environment>/, or TORCH_EXTENSIONS_DIR
# when set, where the learners load it) and the embedded tiny model, tokenizer and tasks (~/.cache/rlft/tiny/, a few
# seconds). Both are reused by every later run; `make warm-caches` rebuilds what is missing.
warm-caches:
	$(BIN)/python -c "from rlft.learner.worker import build_communication_op; build_communication_op()"
	$(BIN)/python -c "from rlft.tiny import resolve; resolve('tiny://model')"

# SFT warm start, then GRPO from its model; each run leaves metrics.jsonl, curves.png and summary.json.
demo: setup
	$(BIN)/rlft train configs/sft_tiny.yaml
	$(BIN)/rlft train configs/grpo_tiny.yaml

# Two pytest workers (pytest-xdist), each taking whole test modules: the end-to-end runs spend much of their time in
# one-threaded start-up, so two of them side by side keep both cores busy. PYTEST_WORKERS=0 runs in this process.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope

test: setup
	$(PYTEST)

# Everything but the end-to-end runs marked slow.
test-fast: setup
	$(PYTEST) -m "not slow"

# Re-pin constraints.txt from the current environment.
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^(torchvision|torchaudio|torchcodec)==' > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
