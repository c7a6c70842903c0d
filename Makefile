# The two set-up-and-go commands are `make demo` and `make test` (see README.md).
# Each installs what it needs first (tools/setup_env.sh is idempotent and fast when done).
PY := .venv/bin/python

.PHONY: setup demo test test-fast build-op clean

setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo_job.py

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not compile"

build-op:
	@BUILD_MSDA=1 bash tools/setup_env.sh

clean:
	rm -rf output build third_party/MSDeformAttn/build
