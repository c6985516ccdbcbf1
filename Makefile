# Two commands (see README.md):
#   make demo   set up, compile DPO for the embedded tiny model, train it on CPU, build the site
#   make test   set up and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-gpu site setup chromium clean

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

test: setup chromium
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

# The site's browser test (tests/test_site.py, marker `browser`) drives Debian's Chromium through Playwright
# (Playwright's own browser download is not used). Installed here when missing and we may: quiet, idempotent.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then SUDO=; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=sudo; \
	  else echo "chromium is missing (Debian: apt-get install chromium); the browser test will fail"; exit 0; fi; \
	  echo "installing chromium for the site's browser test"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq >/dev/null 2>&1 && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	  echo "could not install chromium; the browser test will fail"; }

test-gpu: setup
	$(BIN)/python -m pytest -m gpu -q -rs tests/gpu

site: setup
	$(BIN)/ptcompile build
	cd site && NO_MKDOCS_2_WARNING=1 ../$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .demo site/build site/docs
