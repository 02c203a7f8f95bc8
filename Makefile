# `make demo` and `make test` each set up .venv first; a second run reinstalls nothing
# unless pyproject.toml, setup.py or csrc/ changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PACKAGES ?= "torch>=2.4" torchvision
CSRC := $(shell find csrc -type f 2>/dev/null)
INSTALL := $(PY) -m pip install --no-build-isolation -e '.[test]'
# Compiling the CUDA kernels takes minutes on 2 cores: the demo builds them only where a GPU is
# visible, the test suite wherever nvcc is (so CI compiles them even without a GPU).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: setup setup-full demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first: the native op's build imports it (hence --no-build-isolation below).
$(VENV)/.torch.stamp: | $(PY)
	$(PY) -m pip install $(TORCH_PACKAGES)
	touch $@

# The rest of pyproject.toml's [build-system] requirements: without build isolation pip checks
# none of them, and a venv's own setuptools may be too old for the license metadata.
$(VENV)/.build-tools.stamp: | $(PY)
	$(PY) -m pip install "setuptools>=77" wheel ninja
	touch $@

BUILD_DEPS := $(VENV)/.torch.stamp $(VENV)/.build-tools.stamp pyproject.toml setup.py $(CSRC)

$(VENV)/.kdplug.stamp: $(BUILD_DEPS)
	$(if $(HAS_GPU),,KDPLUG_NO_CUDA=1) $(INSTALL)
	touch $@

$(VENV)/.kdplug-full.stamp: $(BUILD_DEPS)
	$(INSTALL)
	touch $@ $(VENV)/.kdplug.stamp

setup: $(VENV)/.kdplug.stamp

setup-full: $(VENV)/.kdplug-full.stamp

demo: setup
	$(VENV)/bin/kdplug demo

test: setup-full
	KDPLUG_REQUIRE_NATIVE=1 $(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench_kd_loss.py

clean:
	rm -rf build dist *.egg-info kdplug/_C*.so
