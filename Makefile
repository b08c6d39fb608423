# Two commands on a fresh Debian machine (as root, or in a venv with sudo for apt):
#   make train   install what is missing, then train the default recipe (SimCLR on Fashion-MNIST)
#   make test    install what is missing, then run the test suite (what CI runs)
PYTHON ?= python3
WORKDIR ?= workdir/simclr_fmnist
CONFIG ?= configs/simclr_fmnist.py
APT_PACKAGES = dataset-fashion-mnist fonts-noto-color-emoji fonts-symbola fonts-unifont fonts-noto-core unicode-data unicode-cldr-core wordnet-base libfribidi0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-tpu train test test-all

install:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES))
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -e .  # python -m contrastive.main from any folder

train: install
	$(PYTHON) -m contrastive.main --config $(CONFIG) --workdir $(WORKDIR)

# libtpu (requirements-tpu.txt, not part of the CPU install): the TPU compiler with which
# python -m contrastive.aot compiles a recipe for a TPU topology on this CPU (tests/test_aot.py).
install-tpu: install
	$(PYTHON) -m pip install -q -r requirements-tpu.txt

test: install-tpu
	$(PYTHON) -m pytest -q tests

# Also the slow end-to-end runs (the default recipe to its accuracy targets: ~15 min).
test-all: install-tpu
	$(PYTHON) -m pytest -q -m "slow or not slow" tests
