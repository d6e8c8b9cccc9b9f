"""Temperature sweep of speculative decoding: alpha, accepted tokens per step and speedup at T = 0 .. 1.

The measurement and plotting live in tempspec_engine/sweep.py (also behind `tempspec sweep`); this script is its
command line. Results go to a new file under runs/results/ unless --out names one (the committed results in
benchmarks/results/ are never overwritten by default).

  python benchmarks/temperature_sweep.py --quick                       # CPU, built-in prompts, a few minutes
  python benchmarks/temperature_sweep.py --device cuda --prompts ../shared/data/spec_bench_question.jsonl
  python benchmarks/temperature_sweep.py --temperatures 0:2:0.25 --drafts "lookup;layers:0-3"
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from tempspec_engine.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
