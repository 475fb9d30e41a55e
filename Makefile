# virtopt: two commands on a fresh Debian 12 machine as root.
#   make demo   install what is needed, run the demo on a throw-away VM
#   make test   install, add QEMU 10.0 beside Debian's 7.2 and build a debug QEMU of each once
#               (cached outside the repo, in $VIRTOPT_CACHE or ~/.cache/virtopt), lint, run the suite
#   make bench  benchmarks against QEMU's own tools (ratios printed)
#   make fuzz   the structure-aware qcow2 fuzzer for FUZZ_MINUTES (default 5), findings by signature

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PKGS := qemu-system-x86 qemu-utils gdb python3-venv procps tmux qemu-guest-agent
STAMP := $(VENV)/.virtopt-installed

.PHONY: install demo test lint bench qemus debug-qemu libvirt clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/virtopt demo

# QEMU 10.0 from bookworm-backports into a private prefix (no system change), then a debug
# build (DWARF, simple+log trace backends) of 7.2 and of 10.0.
qemus: install
	tests/qemu/install-qemu-current
	tests/qemu/build-debug-qemu all

debug-qemu: qemus

# libvirt for the libvirt tests: Debian's libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
# python3-libvirt (no recommends), the libvirt-qemu user, the venv's view of the bindings
# (tests/libvirt/setup-libvirt says why); the tests start and stop their own libvirtd.
libvirt: install
	VENV=$(VENV) tests/libvirt/setup-libvirt

lint: install
	$(BIN)/ruff check .

test: install qemus libvirt lint
	VIRTOPT_REQUIRE_DEBUG_QEMU=1 $(BIN)/pytest -q -ra

bench: install qemus
	$(BIN)/python bench/run.py

FUZZ_MINUTES ?= 5
fuzz: install
	$(BIN)/python fuzz/run.py --minutes $(FUZZ_MINUTES)

clean:
	rm -rf $(VENV) build *.egg-info
