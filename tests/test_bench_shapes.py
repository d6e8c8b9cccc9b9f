"""benchmarks/bench_shapes.py: the projection arithmetic (exact values) and a tiny CPU run's JSON schema."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("bench_shapes", os.path.join(ROOT, "benchmarks", "bench_shapes.py"))
bench_shapes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_shapes)

expected_tokens, project, best_k = bench_shapes.expected_tokens, bench_shapes.project, bench_shapes.best_k


def test_expected_tokens_constant_alpha():
    # dyadic values: exact in binary floating point
    assert expected_tokens([0.5], 0) == 1.0
    assert expected_tokens([0.5], 1) == 1.5
    assert expected_tokens([0.5], 3) == 1.875
    for a in (0.0, 0.3, 0.6, 0.9):
        for k in range(0, 9):
            assert expected_tokens([a], k) == pytest.approx((1 - a ** (k + 1)) / (1 - a), rel=1e-12, abs=0)
    assert expected_tokens([1.0], 4) == 5.0  # every draft accepted: k + 1 tokens


def test_expected_tokens_profiles():
    for k in range(1, 9):
        assert expected_tokens([1.0, 0.0], k) == 2.0
    assert expected_tokens([1.0, 0.0], 0) == 1.0
    assert expected_tokens([0.5, 0.5, 0.25], 3) == 1 + 0.5 + 0.25 + 0.0625
    assert expected_tokens([0.5, 0.25], 4) == 1 + 0.5 + 0.125 + 0.03125 + 0.0078125  # the tail repeats 0.25
    for bad in ([], [1.5], [-0.1], [0.5, float("nan")]):
        with pytest.raises(ValueError):
            expected_tokens(bad, 2)
    with pytest.raises(ValueError):
        expected_tokens([0.5], -1)


def test_project_and_best_k():
    p = project([0.5], 2, draft_step_ms=0.5, verify_ms=3.0, target_decode_ms=2.0)
    assert p == {"expected_tokens": 1.75, "step_ms": 4.0, "speedup": 0.875}
    verify = {k: 10.0 + 0.5 * k for k in range(1, 9)}  # verification grows slowly with k
    ks = [best_k([a], 1.0, verify, 10.0) for a in (0.3, 0.6, 0.8, 0.9, 0.95)]
    assert ks == sorted(ks) and ks[0] < ks[-1]  # the best k rises with alpha
    assert best_k([0.0], 1.0, verify, 10.0) == 1  # nothing accepted: the smallest k
    assert best_k([1.0], 0.0, {k: 10.0 for k in (1, 2, 4)}, 10.0) == 4  # free drafts, flat verify: the largest


def test_verify_slope_fit():
    """The cost model's slope, fitted through the origin over the forwards of more than one token: a machine whose
    forwards cost exactly 1 + 0.1 (n - 1) one-row decodes gives 0.1; no B = 1 decode, no fit."""
    timings = [{"B": B, "k": k, "target_decode_ms": 10 * (1 + 0.1 * (B - 1)),
                "verify_ms": 10 * (1 + 0.1 * (B * (k + 1) - 1))} for B in (1, 4) for k in (1, 2, 4)]
    assert bench_shapes.verify_slope_fit(timings) == pytest.approx(0.1)
    assert bench_shapes.verify_slope_fit([t for t in timings if t["B"] == 4]) is None
    flat = [{**t, "verify_ms": t["target_decode_ms"] * 0.9} for t in timings if t["B"] == 1]
    assert bench_shapes.verify_slope_fit(flat) == 0.0  # (never below 0)
    fit = bench_shapes.verify_cost_fit(timings)  # a straight line: the same slope on both sides of the knee
    assert fit["knee"] == 4 and fit["slope"] == pytest.approx(0.1) and fit["beyond"] == pytest.approx(0.1)
    kneed = [{**t, "verify_ms": 10 * (1 + 0.05 * min(n - 1, 4) + 0.2 * max(0, n - 5))}
             for t in timings for n in [t["B"] * (t["k"] + 1)]]
    kneed = [{**t, "target_decode_ms": 10 * (1 + 0.05 * (t["B"] - 1))} for t in kneed]
    fit = bench_shapes.verify_cost_fit(kneed)
    assert fit["slope"] == pytest.approx(0.05) and fit["beyond"] == pytest.approx(0.2)
    assert bench_shapes.verify_cost_fit([t for t in timings if t["B"] == 1 and t["k"] == 1]) is None  # one segment


def test_tiny_cpu_run_schema(tmp_path, capsys):
    out = tmp_path / "shapes.json"
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps({"feature": {"measured": [0.8, 0.6]}, "draft": {"measured": [0.5]}}))
    rc = bench_shapes.main(["--device", "cpu", "--shapes", "tiny", "--batch-sizes", "1,2", "--ks", "1-2",
                            "--reps", "2", "--warmup", "1", "--context", "16", "--alpha", "0.6",
                            "--profiles", str(profiles), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "PROJECTED" in printed and "cost-model slope per verified token (fit)" in printed
    res = json.loads(out.read_text())
    for key in ("benchmark", "kind", "note", "device", "dtype", "torch", "cuda", "preset", "shapes", "params",
                "context", "batch_sizes", "ks", "reps", "timing", "projection", "profiles", "meta", "timings",
                "projections", "best", "verify_slope_fit", "verify_cost_fit"):
        assert key in res, key
    assert "projection" in res["kind"] and "random-weight" in res["note"]
    assert res["verify_slope_fit"] == bench_shapes.verify_slope_fit(res["timings"]) >= 0
    assert res["verify_cost_fit"] == bench_shapes.verify_cost_fit(res["timings"])  # (None or a dict: tiny's points)
    assert res["dtype"] == "fp32" and res["preset"] == "tiny" and res["cuda"] is None
    assert res["device"] == res["meta"]["device_name"] and res["meta"]["versions"]["torch"] == res["torch"]
    assert set(res["shapes"]) == {"target", "draft", "feature"} and res["shapes"]["feature"]["dim"] == 64
    assert sorted((r["B"], r["k"]) for r in res["timings"]) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for r in res["timings"]:
        for key in ("prefill_ms", "target_decode_ms", "verify_ms", "draft_step_ms", "feature_step_ms"):
            assert r[key] > 0
    assert set(res["profiles"]["draft"]) == {"alpha=0.6", "measured"}
    assert res["profiles"]["feature"]["measured"] == [0.8, 0.6]
    # one projection per B x k x draft kind x profile (2 profiles each), one best per B x kind x profile
    assert len(res["projections"]) == 2 * 2 * 2 * 2 and len(res["best"]) == 2 * 2 * 2
    for r in res["projections"]:
        t = next(t for t in res["timings"] if (t["B"], t["k"]) == (r["B"], r["k"]))
        alphas = res["profiles"][r["draft_kind"]][r["profile"]]
        assert r["expected_tokens"] == expected_tokens(alphas, r["k"])
        assert r["step_ms"] == pytest.approx(r["k"] * t[f"{r['draft_kind']}_step_ms"] + t["verify_ms"])
        assert r["speedup"] == pytest.approx(r["expected_tokens"] * t["target_decode_ms"] / r["step_ms"])
    for b in res["best"]:
        same = [r["speedup"] for r in res["projections"]
                if (r["B"], r["draft_kind"], r["profile"]) == (b["B"], b["draft_kind"], b["profile"])]
        assert b["best_k"] in (1, 2) and b["speedup"] == max(same)


def test_bad_arguments_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_shapes.parse_args(["--alpha", "1.5"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": [0.5, 2]}))
    rc = bench_shapes.main(["--device", "cpu", "--shapes", "tiny", "--profiles", str(bad), "--reps", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_shapes: error:") and "profile 'x'" in err and err.count("\n") == 1
