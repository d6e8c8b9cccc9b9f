"""benchmarks/profile_step.py on a tiny engine on CPU: the operators of a device-loop step, grouped by name and ranked
by time; a speculative step (drafting, a longer verification, the acceptance op) runs more of them than the target
alone, and the ranked rows add up to at most the whole step."""
import importlib.util
import os

import pytest
import torch

pytest.importorskip("transformers")

from engine_fixtures import tiny_target  # noqa: E402
from tempspec_engine.engine import SpeculativeEngine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("profile_step", os.path.join(ROOT, "benchmarks", "profile_step.py"))
profile_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_step)


def test_profile_ranks_the_operators_of_a_step():
    target = tiny_target(vocab=64, layers=2, seed=0)
    engine = SpeculativeEngine(target, "layers:0", device="cpu", dtype=torch.float32, k=3, max_len=64,
                               device_loop=True)
    alone = profile_step.profile_steps(engine, [1, 2, 3, 4], False, steps=3, top=5)
    spec_ = profile_step.profile_steps(engine, [1, 2, 3, 4], True, steps=3, top=500)
    assert spec_["launches_per_step"] > alone["launches_per_step"] > 0
    assert len(alone["top"]) == 5
    for r in (alone, spec_):
        times = [row["us_per_step"] for row in r["top"]]
        assert times == sorted(times, reverse=True) and times[0] > 0
        assert sum(times) <= r["time_per_step_us"] * (1 + 1e-9)
        assert all(row["name"].startswith("aten::") and row["launches_per_step"] > 0 for row in r["top"])
    names = {row["name"] for row in spec_["top"]}
    assert "aten::mm" in names or "aten::addmm" in names  # the forwards' matrix products
    assert sum(row["share"] for row in spec_["top"]) == pytest.approx(1.0)  # every operator listed (top=500)


def test_bad_arguments_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_step.parse_args(["--steps", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--steps" in err and "expected an integer >= 1, got '0'" in err
