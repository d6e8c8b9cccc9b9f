"""Where results go: a fresh file per run unless the user names one, so that a run never overwrites the results
committed under benchmarks/results/ (or an earlier run's); and how they are written (write_json)."""
from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path
from typing import Optional, Union

RUNS_DIR = "runs/results"


def fresh_results_path(stem: str, results_dir: str = RUNS_DIR, suffix: str = ".json") -> Path:
    """<results_dir>/<stem>-<UTC time to the second><suffix>, with -2, -3, ... added if that exists already."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = Path(results_dir) / f"{stem}-{stamp}"
    path, n = base.with_name(base.name + suffix), 2
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}{suffix}"), n + 1
    return path


def check_output_path(path: Union[str, Path], flag: str = "--out") -> None:
    """Refuses, before any work, an output file that could not be written when the work is done: a directory, a
    path under a file, or one in a directory this process may not write to (ValueError naming the flag)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory: name the file to write")
    parent = path.absolute().parent
    while not parent.exists():  # the nearest ancestor that exists: write_json creates the rest
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: no permission to write there")


def _finite_or_null(obj):
    """obj with every float that is nan or infinite (a standard error of one row, the alpha of a request that never
    drafted) replaced by None, so that the file is standard JSON (null) that any reader parses."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def write_json(obj, path: Union[str, Path], indent: Optional[int] = 1) -> Path:
    """Writes `obj` as standard JSON (`indent` spaces, a final newline; nan and infinities as null) to `path`
    atomically (a .tmp file beside it, then os.replace: a reader never sees half a file), creating parent
    directories; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite_or_null(obj), indent=indent, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path
