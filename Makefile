# Two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.convlens-installed

.PHONY: demo test lint bench clean chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $(STAMP)

demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/convlens explain --samples --methods all --features --out demo-output \
		--param rise.n_masks=1000 --param lime.n_samples=300 --param kernel_shap.n_samples=300 \
		--param meaningful_perturbation.steps=150 \
		--param anchors.n_segments=12 --param anchors.n_samples=2000
	@echo "open demo-output/index.html"

# The report's browser test needs Debian's chromium; installed here when it is missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the browser test"; \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

test: $(STAMP) chromium
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench: $(STAMP)
	$(PY) -m bench gradient

clean:
	rm -rf $(VENV) demo-output build src/*.egg-info
