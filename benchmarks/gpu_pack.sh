#!/bin/bash
# Packs what two calls of the device tool need into .cache/gpu/ (git-ignored). A call sends the working tree plus its
# carried paths, 64 MiB at most, and the default target's GGUF file alone is 94 MiB, so it travels in two parts:
#   call 1 (bash benchmarks/gpu_check.sh):   carry .cache/gpu/a           a/part.00: the first 50 MiB of the GGUF
#   call 2 (bash benchmarks/gpu_session.sh): carry .cache/gpu/b           b/part.01: the rest, and
#       b/site/gguf      the pure-Python `gguf` package (the GPU image has torch, transformers and safetensors)
#       b/model/         the tokenizer, chat template and tempspec_config.json of the local target cache
#       b/prompts/       the prompt files the session reads (Spec-Bench for the engine benchmark, GPTeacher for KD)
#       b/draft_t0/      the shipped draft distilled at tau_kd = 0, which the engine benchmark uses
# Call 2 must follow call 1 on the same warm machine (ignored files left there by call 1 are kept; carried paths are
# not: carry each in the call that reads it). The tracked tree (32 MB with the shipped drafts) does not fit beside a
# part, so during the calls untrack the drafts
#   git rm -r -q --cached tempspec_engine/drafts && echo /tempspec_engine/drafts/ >> .git/info/exclude
# and afterwards
#   git reset -q -- tempspec_engine/drafts && sed -i '\#^/tempspec_engine/drafts/$#d' .git/info/exclude
# Usage: bash benchmarks/gpu_pack.sh SPEC_BENCH.jsonl GPTEACHER.jsonl
set -euo pipefail
PY=${PY:-.venv/bin/python}
SPEC=${1:?path to spec_bench_question.jsonl}
GPT=${2:?path to gpteacher_roleplay.jsonl}
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
GGUF=$($PY -c "from tempspec_engine.models.gguf_cache import gguf_path; print(gguf_path())")
CACHE=$($PY -c "from tempspec_engine.models.gguf_cache import ensure_default_cache; print(ensure_default_cache())")
rm -rf .cache/gpu && mkdir -p .cache/gpu/a .cache/gpu/b/site .cache/gpu/b/model .cache/gpu/b/prompts
split -b 50M -d "$GGUF" .cache/gpu/part.
mv .cache/gpu/part.00 .cache/gpu/a/ && mv .cache/gpu/part.01 .cache/gpu/b/
cp -r "$SITE/gguf" .cache/gpu/b/site/
cp "$CACHE"/tempspec_config.json "$CACHE"/tokenizer.json "$CACHE"/tokenizer_config.json .cache/gpu/b/model/
cp "$CACHE"/*.jinja .cache/gpu/b/model/ 2>/dev/null || true
cp "$SPEC" "$GPT" .cache/gpu/b/prompts/
cp -r tempspec_engine/drafts/smollm2-135m-kd-online-t0 .cache/gpu/b/draft_t0
find .cache/gpu -name __pycache__ -prune -exec rm -rf {} +
du -sh .cache/gpu/a .cache/gpu/b
