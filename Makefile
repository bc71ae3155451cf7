# The two commands of the README: `make demo` and `make test`. Both create .venv when missing and
# install the project into it first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.secondorder-installed
TORCH_CPU ?= torch==2.13.0

.PHONY: install horovod demo test lint format clean

$(PY):
	python3 -m venv $(VENV)

# torch first, and only when none is importable: never a second torch over an installed one.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_CPU)"
	$(PY) -m pip install --quiet -e ".[test,plots]"
	touch $(STAMP)

install: $(STAMP)

# Horovod 0.28.1 patched to build against current torch (C++17), cached outside the checkout:
# the first build takes minutes, later installs seconds. The tests exercise this backend.
HOROVOD_STAMP := $(VENV)/.horovod-installed
$(HOROVOD_STAMP): $(STAMP) launch/install_horovod.sh
	bash launch/install_horovod.sh $(PY)
	touch $(HOROVOD_STAMP)

horovod: $(HOROVOD_STAMP)

demo: install
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=2 \
		-m secondorder.train experiment=demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint horovod
	OMP_NUM_THREADS=1 $(PY) -m pytest

clean:
	rm -rf runs multirun outputs wandb .pytest_cache
