#!/usr/bin/env bash
# Device call 2 (after gpu_check.sh carried .cache/gpu/a; this call carries .cache/gpu/b, see gpu_pack.sh):
#   0. joins the GGUF parts and writes the default target's cache directory ($TEMPSPEC_MODEL_DIR)
#   1. the engine comparison: bench_engine.py at batch 1 (20 Spec-Bench prompts, with Hugging Face generate) and at
#      batches 8 and 32 (32 prompts), T 0, 0.5, 1, drafts lookup and distilled:0 (carried as b/draft_t0). The HF
#      baselines run at 20-40 tokens/s on an H200, so batch 1 needs about 3 minutes per temperature.
#   2. temperature-matched KD on the GPU: gen-data at tau 0, 0.5, 1 (GPTeacher rows 0-1999), then online JSD(0.5)
#      distillation of a 2-layer draft per tau
# Every stage writes under $OUT as it goes, in at most 8 files (the device tool's limit); DEADLINE (seconds, default
# 450) bounds the whole script, stages that would start too late are skipped. TEMPS picks the temperatures of stage 1
# (default 0,0.5,1); BATCHES=none skips its batch 8 and 32 part.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
START=$(date +%s); DEADLINE=${DEADLINE:-450}; DEV=${DEV:-cuda}  # the knobs below are for a dry run on CPU
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
B=$PWD/.cache/gpu/b; W=/tmp/tempspec_gpu; mkdir -p $W/logs $W/data
export PYTHONUNBUFFERED=1 PYTHONPATH=$B/site TEMPSPEC_MODEL_DIR=$W/smollm2 TQDM_MININTERVAL=10
log() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a $W/logs/session.log; }

python3 -c "import tempspec_engine.kernels, tempspec_engine._C" 2>/dev/null || \
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip install -q --no-build-isolation --no-deps -e . > $W/logs/build.log 2>&1
cat .cache/gpu/a/part.00 $B/part.01 > $W/smollm2.gguf
python3 - <<PY 2>&1 | tee -a $W/logs/session.log
import shutil
from pathlib import Path
from safetensors.torch import save_file
from tempspec_engine.models.gguf_cache import convert_gguf
state, _, _ = convert_gguf(Path("$W/smollm2.gguf"))
d = Path("$W/smollm2"); d.mkdir(exist_ok=True)
save_file(state, str(d / "model.safetensors"))
for f in Path("$B/model").iterdir():
    shutil.copy(f, d / f.name)
print("target cache ready:", sorted(p.name for p in d.iterdir()))
PY
[ -s $W/smollm2/model.safetensors ] || { log "setup failed: no target cache"; tar -czf $OUT/logs.tar.gz -C $W logs; exit 1; }
log "setup done"

# 1. the engine comparison. STAGES picks "bench", "train" or both; TRAIN_RESERVE seconds are kept for stage 2.
STAGES=${STAGES:-bench train}
want() { [[ " $STAGES " == *" $1 "* ]]; }
RESERVE=0; want train && RESERVE=${TRAIN_RESERVE:-220}
SPEC=$B/prompts/spec_bench_question.jsonl
if want bench; then
  TEMPS=${TEMPS:-0,0.5,1}; BATCHES=${BATCHES:-8,32}; LATER=90; [ "$BATCHES" = none ] && LATER=0
  t=$(( $(left) - RESERVE - LATER ))  # batch 1 takes what batches 8 and 32 (90 s at most) and stage 2 leave
  if [ $t -gt 30 ]; then
    timeout $t python3 benchmarks/bench_engine.py --prompts $SPEC --n-prompts ${NB1:-20} --max-new-tokens ${NEWTOK:-64} \
      --batch-sizes 1 --temperatures $TEMPS --device $DEV --drafts "lookup;$B/draft_t0" --out $OUT/engine_gpu_batch1.json \
      > $W/logs/engine_batch1.log 2>&1
    log "engine batch 1: exit $?"
  fi
  t=$(( $(left) - RESERVE )); [ $t -gt 90 ] && t=90
  if [ "$BATCHES" != none ] && [ $t -gt 20 ]; then
    timeout $t python3 benchmarks/bench_engine.py --prompts $SPEC --n-prompts ${NB8:-32} --max-new-tokens ${NEWTOK:-64} \
      --batch-sizes $BATCHES --temperatures $TEMPS --device $DEV --no-hf --drafts "lookup;$B/draft_t0" \
      --out $OUT/engine_gpu_batch8_32.json > $W/logs/engine_batch8_32.log 2>&1
    log "engine batch 8, 32: exit $?"
  fi
fi

# 2. data at each tau, then one distilled draft per tau
want train || { log "done"; tar -czf $OUT/logs.tar.gz -C $W logs; exit 0; }
GPT=$B/prompts/gpteacher_roleplay.jsonl
n=3
for tau in 0 0.5 1; do
  t=$(( ($(left) - 150) / n )); [ $t -gt 45 ] && t=45; n=$(( n - 1 ))
  [ $t -lt 15 ] && { log "no time for gen-data $tau"; continue; }
  timeout $t python3 -m tempspec_trainer.cli gen-data --prompts $GPT --limit ${NGEN:-2000} --temperature $tau \
    --max-new-tokens ${GENTOK:-128} --batch-size 256 --chunk 512 --max-len 320 --device $DEV --no-progress \
    --out $W/data/gpteacher_t$tau.jsonl > $W/logs/gen_t$tau.log 2>&1
  log "gen-data tau $tau: exit $?, $(cat $W/data/gpteacher_t$tau.jsonl 2>/dev/null | wc -l) rows"
done
tar -czf $OUT/data.tar.gz -C $W data
n=3
for tau in 0 0.5 1; do
  t=$(( $(left) / n - 5 )); n=$(( n - 1 ))
  [ -s $W/data/gpteacher_t$tau.jsonl ] || continue
  [ $t -lt 30 ] && { log "no time for distill $tau"; continue; }
  timeout -s INT $t python3 -m tempspec_trainer.cli distill --data $W/data/gpteacher_t$tau.jsonl --tau-kd $tau \
    --mode online --divergence jsd --jsd-beta 0.5 --init layers:0,1/mlp:1024 --steps ${STEPS:-800} --batch-size 16 \
    --lr 1e-3 --warmup-steps 40 --eval-every 200 --eval-rows 64 --save-every 200 --device $DEV --no-progress \
    --out-dir $W/kd_t$tau > $W/logs/distill_t$tau.log 2>&1
  log "distill tau $tau: exit $?"
  tail -3 $W/logs/distill_t$tau.log | tee -a $W/logs/session.log
  [ -d $W/kd_t$tau/final ] || python3 - <<PY 2>&1 | tee -a $W/logs/session.log  # cut short: its newest checkpoint
import torch
from pathlib import Path
from tempspec_engine.models.draft_checkpoint import load_draft, read_draft_info, save_draft
from tempspec_engine.models.loading import load_default_target
steps = sorted(Path("$W/kd_t$tau/checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
if steps:
    info = read_draft_info(steps[-1])
    draft = load_draft(steps[-1], load_default_target("cpu", torch.float32).model)
    save_draft(draft, "$W/kd_t$tau/final", shares_target_embeddings=info["shares_target_embeddings"],
               target_name=info["target"]["name"], target_vocab=info["target"]["vocab_size"],
               metadata={**info["metadata"], "cut_short": True}, dtype=torch.bfloat16)
    print("exported", steps[-1], "as final (cut short)")
PY
  (cd $W && tar -cf $OUT/draft_t$tau.tar kd_t$tau/final kd_t$tau/train_log.json 2>/dev/null)
done
log "done"
tar -czf $OUT/logs.tar.gz -C $W logs
