# One-command set-up: every target builds what it needs on a fresh clone.
# Override the torch pin for a CUDA build, e.g.  make setup TORCH_SPEC="torch==2.13.0 --index-url <your index>"
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= ros,sim,dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.dmn_ros_installed
export MUJOCO_GL ?= osmesa
export PYOPENGL_PLATFORM ?= osmesa

.PHONY: setup system-deps demo test lint clean

setup: $(STAMP)

# Mesa's off-screen GL for the MuJoCo renderer; skipped where already present or not root.
system-deps:
	@if ! ldconfig -p 2>/dev/null | grep -q libOSMesa; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libosmesa6 libegl1 libgl1-mesa-dri >/dev/null; \
	  else echo "warning: install libosmesa6 libegl1 libgl1-mesa-dri for the simulated worlds"; fi; \
	fi

$(STAMP): setup.py pyproject.toml | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: setup
	$(BIN)/dmn-demo

# pytest exit 5 means no test was collected: a failure here, never a silent pass.
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q test; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build install log *.egg-info .pytest_cache .ruff_cache
