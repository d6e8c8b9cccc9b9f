"""benchmarks/bench_attention_cpu.py: a tiny run's JSON schema, and its argument errors in one line."""
import importlib.util
import json
import os

import pytest

from tempspec_engine.linear import kernel_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("bench_attention_cpu", os.path.join(ROOT, "benchmarks",
                                                                                  "bench_attention_cpu.py"))
bench_attention_cpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_attention_cpu)


@pytest.mark.skipif(not kernel_available(), reason="the extension is not built or this CPU lacks AVX2/FMA")
def test_tiny_run_schema(tmp_path, capsys):
    out = tmp_path / "attention.json"
    rc = bench_attention_cpu.main(["--lengths", "4,20", "--queries", "1,5", "--heads", "4", "--kv-heads", "2",
                                   "--head-dim", "16", "--reps", "2", "--rounds", "1", "--threads", "1",
                                   "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "attention_cpu" and isinstance(result["engine_uses_kernel"], bool)
    assert [(r["L"], r["T"]) for r in result["rows"]] == [(4, 1), (20, 1), (20, 5)]  # no more queries than keys
    for r in result["rows"]:
        for key in ("tempspec_ms", "sdpa_ms", "speedup_vs_sdpa"):
            assert r[key] > 0
    assert "wrote" in capsys.readouterr().out


@pytest.mark.skipif(not __import__("tempspec_engine.attention").attention.cpu_has_avx512bf16(),
                    reason="the extension is not built or this CPU lacks AVX-512 BF16")
def test_tiny_prefill_run_schema(tmp_path, capsys):
    out = tmp_path / "prefill.json"
    rc = bench_attention_cpu.main(["--prefill", "--lengths", "40,70", "--heads", "4", "--kv-heads", "2", "--reps", "2",
                                   "--rounds", "1", "--threads", "1", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "attention_prefill_cpu" and isinstance(result["engine_uses_kernel"], bool)
    assert [(r["L"], r["T"]) for r in result["rows"]] == [(40, 40), (70, 70)]
    assert result["total"]["sdpa_ms"] == pytest.approx(sum(r["sdpa_ms"] for r in result["rows"]))
    for r in result["rows"]:
        for key in ("tempspec_ms", "sdpa_ms", "speedup_vs_sdpa", "tempspec_gflops", "sdpa_gflops"):
            assert r[key] > 0
    assert bench_attention_cpu.main(["--prefill", "--head-dim", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_attention_cpu: error:") and "--head-dim must be one of 64, 128" in err


def test_heads_must_divide(capsys):
    assert bench_attention_cpu.main(["--heads", "4", "--kv-heads", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_attention_cpu: error:") and "must divide" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [(["--lengths", "0"], "integer >= 1"),
                                           (["--queries", "x"], "integer")])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_attention_cpu.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_attention_cpu: error:") and message in err and err.count("\n") == 1
