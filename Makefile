# One-command set-up for a fresh machine (Python 3.11, nothing else installed).
#   make bench   set everything up, then run the benchmark comparison (quick default)
#   make test    set everything up, then run the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed

.PHONY: setup build bench test test-fast clean

# Triton kernels tested on the CPU under the Triton interpreter (their own pytest process, see `test`).
INTERPRETED_TESTS := tests/test_flash_attention.py tests/test_attention_triton_route.py tests/test_sampling_triton.py \
                     tests/test_decode_attention_triton.py tests/test_flash_attention_masks.py

# torch first, pinned, so no later install can resolve a bare `torch` (a multi-GB CUDA build).
$(DEPS): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

build: $(DEPS)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

setup: build

bench: setup
	$(PY) -m genfast.bench --quick

# The Triton interpreter suite runs in its own process: TRITON_INTERPRET must be set
# before triton is imported, and it must not leak into the other tests.
test: setup
	$(PY) -m pytest tests -q $(addprefix --ignore=,$(INTERPRETED_TESTS))
	TRITON_INTERPRET=1 $(PY) -m pytest $(INTERPRETED_TESTS) -q

clean:
	rm -rf build *.egg-info genfast/_C*.so genfast/_probe*.so
