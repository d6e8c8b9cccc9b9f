#!/usr/bin/env bash
# Device call 1: build the CUDA extension and run every test that has a CUDA case (the acceptance op on the cuda and
# triton backends, the engine with CUDA graphs, the trainer on the GPU); logs under $OUT (or ./gpu_out).
# BENCH=1 also benchmarks the acceptance op. Usage on a GPU machine: bash benchmarks/gpu_check.sh [pytest -k expr]
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/nvidia_smi.txt"
arch=$(python3 -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST="$arch" TEMPSPEC_REQUIRE_EXT=1 MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; tail -5 "$OUT/build.log"
echo "build took $(( $(date +%s) - t0 )) s"
python3 -c "import tempspec_engine as t; print('backends on cuda:', t.available_backends('cuda'))"
t0=$(date +%s)
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_acceptance_exact.py \
  tests/test_acceptance_edge_cases.py tests/test_acceptance_lossless.py tests/test_input_validation.py \
  tests/test_acceptance_gpu.py tests/test_engine_cuda.py tests/test_trainer_train.py -k "${1:-cuda or gpu}" \
  > "$OUT/tests.log" 2>&1; echo "pytest exit $? after $(( $(date +%s) - t0 )) s"; tail -30 "$OUT/tests.log"
if [ "${BENCH:-0}" = 1 ]; then
  python3 benchmarks/bench_acceptance.py --device cuda --dtype bfloat16 --no-compile \
    --output "$OUT/acceptance_grid_bf16.json" 2>/dev/null | tail -40
fi
