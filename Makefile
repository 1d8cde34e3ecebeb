# Fresh machine: `make demo` and `make test` create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean system-deps gpu-check

# Debian packages the code needs: libaio headers for DeepSpeed's NVMe swapper (the ZeRO-Infinity anchor of
# `trainmem bench placement`). apt-get runs only when the header is missing; CI runs as root.
system-deps:
	@test -f /usr/include/libaio.h || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev; \
	  else sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev; fi; }

$(STAMP): pyproject.toml constraints.txt | system-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/python -m pip install -q -c constraints.txt -e '.[test,torchft]'
	$(BIN)/python -m trainmem.native
	touch $(STAMP)

install: $(STAMP)

# The demo loses rank 1 to SIGKILL halfway; the summary shows the recovery. `make demo NO_FAILURE=1`: a plain run.
demo: $(STAMP)
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(BIN)/trainmem launch examples/demo.toml --workers 2 --steps 50 \
	  $(if $(NO_FAILURE),,--inject-failure rank=1,step=25,kind=kill)

# Two pytest processes, one module each at a time (--dist loadfile: a module shares one Ray cluster):
# the suite waits on Ray start-up, health polls and timeouts about a third of its time, which the
# other process fills. TEST_PROCS=1 runs it in one process.
TEST_PROCS ?= 2
PYTEST := RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(BIN)/python -m pytest -q -n $(TEST_PROCS) --dist loadfile
# The project's own bytecode, compiled once per run: an editable install leaves none, and where
# PYTHONDONTWRITEBYTECODE is set (this machine and CI set it) each of the ~450 processes a suite starts
# (trainers, holders, Serve replicas, CLIs) would compile what it imports again, ~0.13 CPU-s each.
# Python checks each file's source stamp, so a stale one is never used.
COMPILE := $(BIN)/python -m compileall -q trainmem runtime offload checkpoint parallel memory_services launch

test: $(STAMP)
	$(COMPILE)
	$(PYTEST) --durations=15

test-fast: $(STAMP)
	$(COMPILE)
	$(PYTEST) -m "not slow"

# Every CUDA path on one GPU (< 5 min): one JSON object with pass/fail and a figure per path; "no CUDA" and exit 0
# elsewhere. CI never runs it.
gpu-check: $(STAMP)
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(BIN)/python -m trainmem.runtime.gpu_check

clean:
	rm -rf $(VENV) build *.egg-info
