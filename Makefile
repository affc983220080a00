# One-command set-up: every target builds what it needs on a fresh clone.
# Override the torch pin for a CUDA build, e.g.  make setup TORCH_SPEC="torch==2.13.0 --index-url <your index>"
# With a system ROS 2 (its rclpy instead of the ros extra's wheels), from a fresh venv (make clean), with
# ROS's setup.bash sourced and the Python of that ROS distro:
#   make setup PYTHON=/usr/bin/python3 VENV_FLAGS=--system-site-packages EXTRAS=sim,dev
PYTHON ?= python3.11
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
# The extras the venv was set up with (remembered, so a later make demo/test keeps a system ROS 2's rclpy).
EXTRAS ?= $(shell cat $(VENV)/.dmn_ros_extras 2>/dev/null || echo ros,sim,dev)
BIN := $(VENV)/bin
comma := ,
# One stamp per set of extras: asking for other extras installs them.
STAMP := $(VENV)/.dmn_ros_installed_$(subst $(comma),_,$(EXTRAS))
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
	@if [ -n "$(findstring --system-site-packages,$(VENV_FLAGS))" ] && [ -f $(VENV)/pyvenv.cfg ] && \
	  grep -q "include-system-site-packages = false" $(VENV)/pyvenv.cfg; then \
	  echo "error: $(VENV) was made without system site packages: make clean, then make setup again" >&2; exit 1; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	echo $(EXTRAS) > $(VENV)/.dmn_ros_extras
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
