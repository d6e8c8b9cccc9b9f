#!/usr/bin/env bash
# Device call 1 of 2 (benchmarks/gpu_pack.sh says what to carry): keeps the GGUF's first part and the `gguf` package in
# /tmp/tempspec_gpu for call 2, builds the CUDA extension for this GPU, then, each stage under its own time limit
# and the whole under DEADLINE seconds (default 420), one thing at a time:
#   1. the acceptance op at B=64, k=4, V=128256, bf16, plain and with top-k / top-p, against the card's copy bandwidth
#   2. the test suite with CUDA available, the tests with a CUDA case first (every CUDA/Triton backend, the engine with
#      CUDA graphs and the device loop, the trainer on the GPU), then the rest; the tests that need the default target
#      skip (it arrives in call 2); 16 workers, each test under --timeout, every outcome logged as it ends (-v) and the
#      slowest listed. Each run is its own process group, killed whole when its time is up (pytest-xdist workers
#      outlive a killed pytest). (On the H200, 2026-12-04, the whole suite in one run got through 717 of 1205 tests
#      in 261 s.)
#   3. with SHAPES=1 and a minute left: step costs at Llama-2-7B shapes with random weights (each call replayed as a
#      CUDA graph), and the speedup they project with the acceptance profiles measured on the default pair
#      (benchmarks/results/profiles_feature1_cpu.json) and constant ones (measured on the H200 on 2026-12-04:
#      benchmarks/results/shapes_llama2-7b_nvidia-h200.json)
# Results and logs under $OUT (or ./gpu_out), at most 8 files (the device tool's limit).
set -uo pipefail
OUT=${OUT:-gpu_out}; W=/tmp/tempspec_gpu; mkdir -p "$OUT" $W
export PYTHONUNBUFFERED=1 PYTHONPATH=$W/site
START=$(date +%s); DEADLINE=${DEADLINE:-420}
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
limit() { local l; l=$(left); l=$(( l - $2 )); [ $l -gt $1 ] && l=$1; echo $l; }  # min(own limit, left - reserve)
log() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$OUT/session1.log"; }
run_tests() {  # run_tests SECONDS LOG PYTEST_ARGS...: pytest in its own process group, all of it killed at the limit
  setsid python3 -m pytest -v -n 16 -p no:cacheprovider -p no:benchmark -rfE --durations 25 "${@:3}" > "$2" 2>&1 &
  local pid=$! rc
  ( sleep "$1"; kill -9 -- -$pid 2>/dev/null ) & local killer=$!
  wait $pid; rc=$?
  kill $killer 2>/dev/null; kill -9 -- -$pid 2>/dev/null
  return $rc
}
cp .cache/gpu/a/part.00 $W/ && cp -r .cache/gpu/a/site $W/
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"
arch=$(python3 -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
TORCH_CUDA_ARCH_LIST="$arch" TEMPSPEC_REQUIRE_EXT=1 MAX_JOBS=16 \
  python3 -m pip install -q --no-build-isolation --no-deps -e . > $W/build.log 2>&1
log "build: exit $?"
python3 -c "import tempspec_engine as t; print('backends on cuda:', t.available_backends('cuda'))" 2>&1 | tee -a "$OUT/session1.log"

timeout $(limit 45 60) python3 benchmarks/bench_acceptance.py --device cuda --dtype bfloat16 --batch 64 --lookahead 4 \
  --vocab 128256 --filters "none;top_k=50;top_p=0.9" --output "$OUT/acceptance_b64_k4_v128256.json" > $W/acceptance.log 2>&1
log "acceptance op: exit $?"; tail -12 $W/acceptance.log | tee -a "$OUT/session1.log"

# the tests with a CUDA case first (by name, module names included: the rest is what CI runs on its CPUs)
run_tests $(limit 240 60) "$OUT/tests_gpu.log" tests -k "cuda or gpu or triton" --timeout 200
log "tests with a CUDA case: exit $?, $(grep -E '(passed|failed)' "$OUT/tests_gpu.log" | tail -1)"
reserve=5; [ "${SHAPES:-0}" = 1 ] && reserve=130  # (the shapes stage wants about 120 s with its prefills)
t=$(limit 300 $reserve); if [ $t -gt 30 ]; then
  run_tests $t "$OUT/tests_rest.log" tests -k "not (cuda or gpu or triton)" --timeout 200
  log "the rest of the suite: exit $?, $(grep -E '(passed|failed)' "$OUT/tests_rest.log" | tail -1)"
fi

t=$(limit 140 5); if [ "${SHAPES:-0}" = 1 ] && [ $t -gt 60 ]; then
  timeout $t python3 benchmarks/bench_shapes.py --device cuda --batch-sizes 1,8,32 --ks 1-8 --context 512 \
    --reps 20 --profiles benchmarks/results/profiles_feature1_cpu.json --alpha 0.6,0.8 \
    --out "$OUT/shapes_llama2-7b.json" > $W/shapes.log 2>&1
  log "shapes: exit $?"
fi
tar -czf "$OUT/logs1.tar.gz" -C $W build.log acceptance.log shapes.log 2>/dev/null
log "done"
