#!/bin/bash
# Packs what the two calls of the device tool need into .cache/gpu/ (git-ignored). A call sends the working tree plus
# its carried paths, 64 MiB at most; the default target's GGUF file alone is 94 MiB, so it travels in two parts:
#   call 1 (bash benchmarks/gpu_check.sh):    carry .cache/gpu/a  tempspec_engine/drafts/smollm2-135m-feature-t1
#       a/part.00    the first 50 MiB of the GGUF (kept on the machine for call 2)
#       a/site/      the pure-Python `gguf` package and its metadata (the GPU image has torch, transformers and
#                    safetensors)
#   call 2 (bash benchmarks/gpu_session.sh):  carry .cache/gpu/b  tempspec_engine/drafts/smollm2-135m-feature-t1
#       b/part.01    the rest of the GGUF
#       b/prompts/   the Spec-Bench prompts the engine benchmark reads
#       b/train/     train_prompts.jsonl: the prompts of the training files named after SPEC_BENCH, interleaved, as
#                    {"prompt", "category"} rows (what gen-data reads), for call 2 = benchmarks/gpu_train_heads.sh
# Call 2 must follow call 1 on the same warm machine (what call 1 left in /tmp is still there). The tracked tree
# (61 MB with the shipped drafts) does not fit beside a part, so during the calls untrack the drafts
#   git rm -r -q --cached tempspec_engine/drafts && echo /tempspec_engine/drafts/ >> .git/info/exclude
# and afterwards
#   git reset -q -- tempspec_engine/drafts && sed -i '\#^/tempspec_engine/drafts/$#d' .git/info/exclude
# Usage: bash benchmarks/gpu_pack.sh SPEC_BENCH.jsonl [TRAIN.jsonl ...]
set -euo pipefail
PY=${PY:-.venv/bin/python}
SPEC=${1:?path to spec_bench_question.jsonl}
for f in "${@:2}"; do
  case "$(basename "$f")" in spec_bench*|gsm8k_test*) echo "$f is an evaluation set: never train on it"; exit 2;; esac
done
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
GGUF=$($PY -c "from tempspec_engine.models.gguf_cache import gguf_path; print(gguf_path())")
rm -rf .cache/gpu && mkdir -p .cache/gpu/a/site .cache/gpu/b/prompts .cache/gpu/b/train
split -b 50M -d "$GGUF" .cache/gpu/part.
mv .cache/gpu/part.00 .cache/gpu/a/ && mv .cache/gpu/part.01 .cache/gpu/b/
cp -r "$SITE/gguf" "$SITE"/gguf-*.dist-info .cache/gpu/a/site/  # (transformers reads the package's version)
cp "$SPEC" .cache/gpu/b/prompts/
if [ $# -gt 1 ]; then  # the training prompts as the engine reads them, the files interleaved evenly (a run cut short
  # keeps the same mix), each row's category naming its file
  $PY - "${@:2}" > .cache/gpu/b/train/train_prompts.jsonl <<'PYEOF'
import json, os, sys
from tempspec_engine.prompts import read_prompt_rows
rows = []
for path in sys.argv[1:]:
    texts = [t for _, t in read_prompt_rows(path)]
    name = os.path.basename(path).rsplit(".", 1)[0]
    rows += [((i + 0.5) / len(texts), name, t) for i, t in enumerate(texts)]
for _, name, text in sorted(rows):
    print(json.dumps({"prompt": text, "category": name}))
PYEOF
fi
find .cache/gpu -name __pycache__ -prune -exec rm -rf {} +
du -sh .cache/gpu/a .cache/gpu/b
