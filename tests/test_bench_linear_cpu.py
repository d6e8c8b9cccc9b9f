"""benchmarks/bench_linear_cpu.py: a tiny run's JSON schema, and its argument errors in one line."""
import importlib.util
import json
import os

import pytest

from tempspec_engine.linear import kernel_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("bench_linear_cpu", os.path.join(ROOT, "benchmarks",
                                                                               "bench_linear_cpu.py"))
bench_linear_cpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_linear_cpu)


@pytest.mark.skipif(not kernel_available(), reason="the extension is not built or this CPU lacks AVX2/FMA")
def test_tiny_run_schema(tmp_path, capsys):
    out = tmp_path / "linear.json"
    rc = bench_linear_cpu.main(["--shapes", "24x40,3x9", "--rows", "1,5", "--reps", "2", "--rounds", "1",
                                "--threads", "1", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "linear_cpu" and isinstance(result["engine_uses_kernel"], bool)
    assert [(r["N"], r["K"], r["M"]) for r in result["rows"]] == [(24, 40, 1), (24, 40, 5), (3, 9, 1), (3, 9, 5)]
    assert result["kernel_isa"] in ("avx2", "avx512bf16")
    for r in result["rows"]:
        for key in ("tempspec_bf16_ms", "torch_bf16_ms", "torch_fp32_ms", "speedup_vs_torch_bf16"):
            assert r[key] > 0
        assert ("tempspec_avx2_ms" in r) == (result["kernel_isa"] == "avx512bf16")
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--shapes", "24x0"], "positive N and K"),
                                           (["--shapes", "big"], "NxK"),
                                           (["--rows", "1,0"], "integer >= 1")])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_linear_cpu.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_linear_cpu: error:") and message in err and err.count("\n") == 1
