# mirrorha — run as root on Debian 12.
VENV := .venv
PY := $(VENV)/bin/python
MIRRORHA := $(VENV)/bin/mirrorha

.PHONY: setup demo demo-down test check bench lint image test-image

setup:
	@./scripts/bootstrap.sh

demo: setup
	$(MIRRORHA) lab up

demo-down: setup
	$(MIRRORHA) lab down

# The whole suite: unit, integration and slow end-to-end tests, including two appliance VMs
# booted from the image (built first; cached after the first build) under qemu TCG.
test: setup lint image
	MIRRORHA_IMAGE_TEST=1 $(PY) -m pytest -q

# Quick subset for the development loop: everything but the slow end-to-end tests.
check: setup lint
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m bench.failover
	$(PY) -m bench.replication
	$(PY) -m bench.pg_rpo
	$(PY) -m bench.image --build

lint: setup
	$(VENV)/bin/ruff check appliance tests bench image

# The appliance disk image (raw + qcow2) in build/image/ (image/build.sh; README "Appliance").
image: setup
	./image/build.sh

# Only the image's tests (part of `test`): two appliance VMs under qemu (TCG), failing over.
test-image: image
	MIRRORHA_IMAGE_TEST=1 $(PY) -m pytest -q tests/image
