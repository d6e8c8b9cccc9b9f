"""Where results go: a fresh file per run unless the user names one, so that a run never overwrites the results
committed under benchmarks/results/ (or an earlier run's)."""
from __future__ import annotations

import datetime
from pathlib import Path

RUNS_DIR = "runs/results"


def fresh_results_path(stem: str, results_dir: str = RUNS_DIR, suffix: str = ".json") -> Path:
    """<results_dir>/<stem>-<UTC time to the second><suffix>, with -2, -3, ... added if that exists already."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = Path(results_dir) / f"{stem}-{stamp}"
    path, n = base.with_name(base.name + suffix), 2
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}{suffix}"), n + 1
    return path
