"""benchmarks/study_figures.py: each figure from result files of the real schemas (the committed bench_engine JSONs,
a sweep of tiny random models), the rows it plots, and one-line errors for bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("matplotlib")

from engine_fixtures import tiny_target  # noqa: E402
from trainer_fixtures import one_thread  # noqa: E402
from tempspec_engine import sweep  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import study_figures  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    target = tiny_target(vocab=64, layers=2, seed=0)
    res = sweep.run_sweep(target, ["layers:0-1", "random"], [[1, 2, 3], [5, 6], [7, 8, 9, 10]], [0.0, 1.0], 10,
                          device="cpu", dtype=torch.float32, k=3, seed=0, chat_template=False, progress=False)
    path = tmp_path_factory.mktemp("sweep") / "sweep.json"
    path.write_text(json.dumps(res))
    return path


def test_positions(sweep_file, tmp_path):
    data = study_figures.read_json(sweep_file)
    rows = study_figures.position_rows(data, 0.0)
    assert set(rows) == {"layers:0-1", "random"}
    assert [r[1] for r in rows["layers:0-1"]] == [1.0] * len(rows["layers:0-1"])  # the target itself: all accepted
    assert rows["layers:0-1"][0][0] == 1 and all(r[2] == 0.0 for r in rows["layers:0-1"])
    assert study_figures.conditional(data)
    for entry in data["results"]:  # each point is its counts' ratio: accepted over reached
        pts = study_figures.position_rows(data, entry["temperature"])[entry["draft"]]
        assert [x for _, x, _ in pts] == [a / n for a, n in zip(entry["position_accepted"], entry["position_reached"])
                                          if n]
    # an older sweep without reached counts: the share of proposals accepted
    old = {"results": [{k: v for k, v in r.items() if k != "position_reached"} for r in data["results"]]}
    assert not study_figures.conditional(old)
    entry = old["results"][-1]
    pts = study_figures.position_rows(old, entry["temperature"])[entry["draft"]]
    assert [x for _, x, _ in pts] == [a / p for a, p in zip(entry["position_accepted"], entry["position_proposed"]) if p]
    out = tmp_path / "pos.png"
    assert study_figures.plot_positions(data, [0.0, 1.0], out) == str(out) and is_png(out)
    with pytest.raises(ValueError, match="no results at temperature"):
        study_figures.plot_positions(data, [0.5], tmp_path / "x.png")


def test_batch_from_the_committed_engine_results(tmp_path):
    runs = [study_figures.read_json(os.path.join(RESULTS, f"engine_cpu_feature_heads_batch{b}.json")) for b in (1, 4)]
    rows = study_figures.batch_rows(runs)
    assert set(rows) >= {0.0, 1.0}
    points = dict(rows[0.0]["lookup+feature:1"])
    assert set(points) == {1, 4}
    want = next(r["speedup_vs_target_only"] for r in runs[1]["results"]
                if r["method"] == "tempspec_sd[lookup+feature:1]" and r["temperature"] == 0.0)
    assert points[4] == want
    assert "target_only" not in rows[0.0] and not any("@" in m for m in rows[0.0])
    out = tmp_path / "batch.png"
    study_figures.plot_batch(runs, out)
    assert is_png(out)
    with pytest.raises(ValueError, match="no lossless tempspec rows"):
        study_figures.plot_batch(runs, out, settings="top_p=0.5")
    study_figures.plot_batch(runs, out, temperatures=[0.0, 1.0])
    with pytest.raises(ValueError, match="no results at temperature"):
        study_figures.plot_batch(runs, out, temperatures=[0.3])


def test_temperatures_from_the_committed_engine_results(tmp_path):
    run = study_figures.read_json(os.path.join(RESULTS, "engine_cpu_feature_heads_batch1.json"))
    rows = study_figures.temperature_rows(run)
    assert "target_only" not in rows and "lookup+feature:1" in rows
    points = rows["lookup+feature:1"]
    assert [p[0] for p in points] == sorted({r["temperature"] for r in run["results"]})
    for t, speedup, alpha, half in points:  # each point is its row of the file
        want = next(r for r in run["results"] if r["method"] == "tempspec_sd[lookup+feature:1]"
                    and r["temperature"] == t and r["batch"] == 1)
        assert (speedup, alpha, half) == (want["speedup_vs_target_only"], want["alpha"], 1.96 * want["alpha_se"])
    out = tmp_path / "temps.png"
    assert study_figures.plot_temperatures(run, out) == str(out) and is_png(out)
    with pytest.raises(ValueError, match="no lossless rows at batch 4"):
        study_figures.plot_temperatures(run, out, batch=4)
    hf = {"meta": {}, "results": [{"method": "hf_target_only", "batch": 1, "temperature": 0.0,
                                   "speedup_vs_target_only": 0.9}]}
    assert study_figures.temperature_rows(hf) == {"hf_target_only": [(0.0, 0.9, None, None)]}
    # a bench_engine --variants row is its own series, named by draft and variant
    variants = study_figures.read_json(os.path.join(RESULTS, "engine_cpu_alternatives_batch1.json"))
    rows = study_figures.temperature_rows(variants)
    assert {"lookup+feature:1", "lookup+feature:1/alternatives=0,confidence_stop=0"} <= set(rows)
    assert len(rows["lookup+feature:1/alternatives=0,confidence_stop=0"]) == len(rows["lookup+feature:1"]) == 4


def test_lenience_from_the_committed_engine_results(tmp_path):
    run = study_figures.read_json(os.path.join(RESULTS, "engine_cpu_filters_lenience.json"))
    rows = study_figures.lenience_rows(run)
    assert set(rows) == {"none", "top_p=0.9", "top_k=50"}
    labels = [p[0] for p in rows["none"]]
    assert labels == ["target", "1", "0.8", "0.5", "0.3"]
    assert rows["none"][0][1] == 1.0  # the target alone against itself
    out = tmp_path / "len.png"
    study_figures.plot_lenience(run, out)
    assert is_png(out)
    with pytest.raises(ValueError, match="--lenience"):
        study_figures.lenience_rows(study_figures.read_json(os.path.join(RESULTS,
                                                                         "engine_cpu_feature_heads_batch4.json")))
    # a run of two temperatures and two drafts: a series each, the target alone in both drafts' series
    two = [dict(r, temperature=t, method=r["method"].replace("tempspec_sd[", f"tempspec_sd[{d}") if d else r["method"])
           for r in run["results"] if r.get("settings", "none") == "none" for t in (0.0, 1.0) for d in ("", "x")
           if d == "" or r["method"] != "target_only"]
    rows = study_figures.lenience_rows({"results": two})
    draft = run["results"][1]["method"][len("tempspec_sd["):].split("]")[0]
    assert set(rows) == {f"none, T={t}, {d}" for t in (0, 1) for d in (draft, "x" + draft)}
    assert [p[0] for p in rows[f"none, T=1, x{draft}"]] == ["target", "1", "0.8", "0.5", "0.3"]


def test_recipes_from_the_committed_kd_grid(tmp_path):
    grid = study_figures.read_grid(os.path.join(RESULTS, "study_f2_feature_grid_cpu_bfloat16.json"))
    rows = study_figures.recipe_rows(grid)
    assert set(rows) == {"alpaca_heldout", "gsm8k"}
    bars = rows["gsm8k"][1.0]
    assert [b[0] for b in bars] == ["online:0", "online:0.5", "online:1", "mixture"]  # a shared mode gets its tau
    want = next(r for r in grid["sets"]["gsm8k"]["results"]["results"]
                if r["draft"].endswith("feature-t0.5") and r["temperature"] == 1.0)
    assert bars[1][1:] == (want["alpha"], 1.96 * want["alpha_se"])
    out = tmp_path / "recipes.png"
    assert study_figures.plot_recipes(grid, out) == str(out) and is_png(out)
    with pytest.raises(ValueError, match="kd_grid"):
        study_figures.read_grid(os.path.join(RESULTS, "engine_cpu_feature_heads_batch4.json"))


def test_command_line(sweep_file, tmp_path):
    script = os.path.join(ROOT, "benchmarks", "study_figures.py")
    out = tmp_path / "p.png"
    ok = subprocess.run([sys.executable, script, "positions", str(sweep_file), "--temperatures", "0,1", "--out",
                         str(out)], capture_output=True, text=True)
    assert ok.returncode == 0 and is_png(out) and "wrote" in ok.stdout, ok.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{\"meta\": {}}")
    for args in (["lenience", str(bad)], ["batch", str(tmp_path / "missing.json")]):
        r = subprocess.run([sys.executable, script, *args, "--out", str(tmp_path / "x.png")], capture_output=True,
                           text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("study_figures: error:")
    h = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and all(name in h.stdout for name in ("positions", "batch", "lenience", "recipes",
                                                                  "temperatures"))
