# Two commands (see README.md):
#   make demo   set up, compile DPO for the embedded tiny model, train it on CPU, build the site
#   make test   set up and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-gpu site setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# Without an NVIDIA GPU, take PyTorch's CPU build first (the range in pyproject then installs nothing
	@# more); with a GPU, the [train] range brings the CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q "torch==2.13.0" || true; fi
	$(BIN)/python -m pip install -q -e ".[train,qlora,dev,parity]"
	touch $@

demo: setup
	$(BIN)/python tools/demo.py

test: setup
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

test-gpu: setup
	$(BIN)/python -m pytest -m gpu -q -rs tests/gpu

site: setup
	$(BIN)/ptcompile build
	cd site && ../$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .demo site/build site/docs
