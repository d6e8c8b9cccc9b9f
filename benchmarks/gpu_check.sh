#!/usr/bin/env bash
# One device call: build the CUDA extension, run the acceptance tests on the GPU, benchmark, and save everything
# under $OUT (or ./gpu_out). Usage on a GPU machine: bash benchmarks/gpu_check.sh [pytest -k expression]
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
arch=$(python3 -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST="$arch" TEMPSPEC_REQUIRE_EXT=1 MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee "$OUT/build.log"
echo "build took $(( $(date +%s) - t0 )) s"
python3 -c "import tempspec_engine as t; print('backends on cuda:', t.available_backends('cuda'))"
timeout 300 python3 -m pytest -q --maxfail=20 -p no:cacheprovider tests/test_acceptance_exact.py tests/test_acceptance_edge_cases.py \
  tests/test_acceptance_lossless.py tests/test_input_validation.py tests/test_acceptance_gpu.py ${1:+-k "$1"} > "$OUT/tests.log" 2>&1; tail -30 "$OUT/tests.log"
python3 benchmarks/bench_acceptance.py --device cuda --dtype bfloat16 --no-compile \
  --output "$OUT/acceptance_grid_bf16.json" 2>/dev/null | tail -40
python3 benchmarks/bench_acceptance.py --device cuda --dtype bfloat16 --batch 64 --lookahead 4 --vocab 32000 128256 \
  --output "$OUT/acceptance_compile_bf16.json" 2>/dev/null | tail -12
