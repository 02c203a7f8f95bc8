# `make demo` and `make test` each set up .venv first; a second run reinstalls nothing
# unless pyproject.toml, setup.py or csrc/ changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PACKAGES ?= "torch>=2.4" torchvision
CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: setup demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first: the native op's build imports it (hence --no-build-isolation below).
$(VENV)/.torch.stamp: | $(PY)
	$(PY) -m pip install $(TORCH_PACKAGES) "setuptools>=64" wheel ninja pybind11
	touch $@

$(VENV)/.kdplug.stamp: $(VENV)/.torch.stamp pyproject.toml setup.py $(CSRC)
	$(PY) -m pip install --no-build-isolation -e '.[test]'
	touch $@

setup: $(VENV)/.kdplug.stamp

demo: setup
	$(VENV)/bin/kdplug demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench_kd_loss.py

clean:
	rm -rf build *.egg-info kdplug/_C*.so
