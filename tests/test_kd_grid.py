"""benchmarks/kd_grid.py: labels parse, grids are laid out tau_kd x tau_dec from sweep results, heatmaps are PNGs."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("kd_grid", os.path.join(ROOT, "benchmarks", "kd_grid.py"))
kd_grid = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kd_grid)


def test_parse_draft():
    assert kd_grid.parse_draft("online:0.5=runs/a/final") == ("online", 0.5, "runs/a/final")
    assert kd_grid.parse_draft("none=runs/a/init") == ("none", None, "runs/a/init")
    with pytest.raises(ValueError, match="MODE:TAU=DIR"):
        kd_grid.parse_draft("online:0.5")


def _results(drafts, temps):
    rows = [{"draft": p, "temperature": t, "alpha": 0.1 * i + t, "speedup": 1.0 + 0.01 * i, "mean_accepted": t}
            for i, (_, _, p) in enumerate(drafts) for t in temps]
    return {"temperatures": temps, "results": rows}


def test_grids_and_heatmaps(tmp_path):
    drafts = [("online", 1.0, "d_on1"), ("online", 0.0, "d_on0"), ("offline", 0.5, "d_off"), ("none", None, "d_init")]
    temps = [0.0, 0.5, 1.0]
    grids = kd_grid.build_grids(_results(drafts, temps), drafts)
    assert grids["online"]["tau_kd"] == [0.0, 1.0]  # sorted by tau_kd
    assert grids["online"]["drafts"] == ["d_on0", "d_on1"]
    assert grids["online"]["alpha"][0] == pytest.approx([0.1 + t for t in temps])  # d_on0 is the 2nd draft (i=1)
    assert grids["online"]["alpha"][1] == pytest.approx([0.0 + t for t in temps])
    assert grids["none"]["tau_kd"] == [None]
    paths = kd_grid.plot_grids(grids, "test", tmp_path / "grid")
    assert [os.path.basename(p) for p in paths] == ["grid_alpha.png", "grid_speedup.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_markdown_grid():
    drafts = [("online", 0.0, "a"), ("none", None, "b")]
    grids = kd_grid.build_grids(_results(drafts, [0.0, 1.0]), drafts)
    table = kd_grid.format_grids(grids, "alpha").splitlines()
    assert table[0] == "| draft | T=0 | T=1 |"
    assert "| none" not in table[2] and table[2] == "| undistilled | 0.10 | 1.10 |"
    assert table[3] == "| online, tau_kd=0 | 0.00 | 1.00 |"
