"""The temperature sweep on tiny random models: JSON schema, one entry per temperature and draft, valid PNG plots."""
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from engine_fixtures import tiny_llama_hf, tiny_target, word_tokenizer  # noqa: E402
from trainer_fixtures import one_thread  # noqa: E402
from tempspec_engine import prompts, run_meta, sweep  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCALAR_KEYS = {"draft", "temperature", "alpha", "alpha_se", "mean_accepted", "tokens_per_step", "sd_tokens_per_s",
               "target_tokens_per_s", "speedup", "wall_time_s", "target_wall_time_s", "tokens", "target_tokens",
               "steps", "accepted", "rejections", "draft_time_s", "target_time_s"}
POSITION_KEYS = {"acceptance_by_position", "conditional_acceptance_by_position", "position_proposed",
                 "position_accepted", "position_reached"}  # lists, one entry per position
RESULT_KEYS = SCALAR_KEYS | POSITION_KEYS | {"speedup_ci95", "by_request"}


_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def check_png(path):
    data = open(path, "rb").read()
    assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC), path
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        im.verify()
        assert im.size[0] > 100 and im.size[1] > 100


def check_results(res, temps, drafts, n_prompts, max_new, eos=False):
    """eos: the model has an EOS id, so requests may end before max_new tokens."""
    assert set(res) >= {"meta", "temperatures", "drafts", "baseline", "results"}
    assert res["temperatures"] == temps and res["drafts"] == drafts
    assert [b["temperature"] for b in res["baseline"]] == temps  # the baseline once per temperature
    for b in res["baseline"]:
        assert (0 < b["tokens"] <= n_prompts * max_new if eos else b["tokens"] == n_prompts * max_new)
        assert b["tokens_per_s"] > 0 and b["wall_time_s"] > 0
    assert sorted((r["draft"], r["temperature"]) for r in res["results"]) == sorted(
        (d, t) for d in drafts for t in temps)
    for r in res["results"]:
        assert set(r) == RESULT_KEYS
        for key in SCALAR_KEYS - {"draft"}:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r[key])
        assert 0.0 <= r["alpha"] <= 1.0
        pairs = r["by_request"]  # [accepted, rejections] of each prompt: the clusters of alpha_se
        assert len(pairs) == n_prompts and [sum(p) for p in zip(*pairs)] == [r["accepted"], r["rejections"]]
        judged = [(a, a + j) for a, j in pairs if a + j]
        m, n = len(judged), r["accepted"] + r["rejections"]
        assert r["alpha_se"] == pytest.approx(math.sqrt(m / (m - 1) * sum((a - r["alpha"] * k) ** 2 for a, k in judged))
                                              / n if m > 1 else math.sqrt(r["alpha"] * (1 - r["alpha"]) / n))
        proposed, accepted = r["position_proposed"], r["position_accepted"]
        assert len(proposed) == len(accepted) == len(r["acceptance_by_position"]) >= 1
        assert sum(accepted) == r["accepted"] and all(0 <= a <= p for a, p in zip(accepted, proposed))
        assert all(x >= y for x, y in zip(proposed, proposed[1:]))  # a step proposing i+2 tokens proposed i+1
        assert r["acceptance_by_position"] == [a / p if p else None for a, p in zip(accepted, proposed)]
        reached = r["position_reached"]
        assert reached[0] == proposed[0] and sum(reached) == r["accepted"] + r["rejections"]
        assert r["conditional_acceptance_by_position"] == [a / n if n else None for a, n in zip(accepted, reached)]
        assert (0 < r["tokens"] <= n_prompts * max_new if eos else r["tokens"] == n_prompts * max_new)
        assert r["accepted"] + r["rejections"] > 0 and r["steps"] >= n_prompts
        assert r["mean_accepted"] == pytest.approx(r["accepted"] / r["steps"])
        assert r["speedup"] == pytest.approx(r["sd_tokens_per_s"] / r["target_tokens_per_s"])
        ci = r["speedup_ci95"]  # None with a single prompt chunk
        if ci is not None:
            assert len(ci) == 2 and 0 < ci[0] <= ci[1] and all(math.isfinite(x) for x in ci)
    json.dumps(res, allow_nan=False)  # strict JSON: no NaN or infinity anywhere


def test_sweep_schema_and_plots(tmp_path):
    target = tiny_target(vocab=64, layers=2, seed=0)
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10], [4, 4]]
    temps, drafts = [0.0, 0.5, 1.0], ["layers:0-1", "random"]
    res = sweep.run_sweep(target, drafts, prompts, temps, 12, device="cpu", dtype=torch.float32, k=3,
                          batch_size=2, seed=0, progress=False)  # (id prompts: the chat template is for text)
    check_results(res, temps, drafts, len(prompts), 12)
    # The all-layers draft equals the target: every draft token is accepted, at every temperature.
    full = [r for r in res["results"] if r["draft"] == "layers:0-1"]
    assert all(r["alpha"] == 1.0 and r["rejections"] == 0 and r["alpha_se"] == 0.0 for r in full)
    assert all(x in (1.0, None) for r in full for x in r["acceptance_by_position"])
    assert all(r["acceptance_by_position"][0] == 1.0 for r in full)
    assert max(r["alpha"] for r in res["results"] if r["draft"] == "random") < 1.0
    res["meta"].update(run_meta.collect_meta("cpu"))
    written = sweep.write_results(res, tmp_path / "sweep_cpu_float32.json")
    stem = str(tmp_path / "sweep_cpu_float32")
    assert written[1:] == [stem + "_speedup.png", stem + "_alpha.png"]
    for path in written[1:]:
        check_png(path)
    saved = json.loads((tmp_path / "sweep_cpu_float32.json").read_text())
    assert saved["plots"] == ["sweep_cpu_float32_speedup.png", "sweep_cpu_float32_alpha.png"]
    assert {"device_name", "versions", "command", "dtype", "target"} <= set(saved["meta"])
    table = sweep.format_table(saved)
    assert "| 0.5 | random |" in table
    row = next(r for r in saved["results"] if r["draft"] == "random" and r["temperature"] == 0.5)
    ci = row["speedup_ci95"]  # 2 chunks of 2 prompts: an interval
    assert f"{row['speedup']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" in table
    assert f"{row['alpha']:.2f} ± {1.96 * row['alpha_se']:.2f}" in table


def test_sweep_command_line(tmp_path, capsys):
    """The CLI entry on a saved tiny model, with a JSONL file mixing the three prompt formats and T above 1."""
    model_dir = tmp_path / "tiny"
    tiny_llama_hf(vocab=64, layers=2, scale=4.0).save_pretrained(model_dir)
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(62)]
    word_tokenizer(words).save_pretrained(model_dir)
    rows = [{"turns": ["w3 w4", "w9"]}, {"instruction": "w5", "input": "w6 w7"}, {"question": "w8 w9 w10"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "res.json"
    argv = ["--target", str(model_dir), "--drafts", "layers:0;lookup", "--prompts", str(prompts), "--no-chat",
            "--temperatures", "0,1.5", "--max-new-tokens", "6", "--device", "cpu", "--dtype", "fp32",
            "--out", str(out), "--no-progress", "--k", "2"]
    assert sweep.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    res = json.loads(out.read_text())
    check_results(res, [0.0, 1.5], ["layers:0", "lookup"], 3, 6, eos=True)
    assert res["meta"]["prompts_file"] == "prompts.jsonl" and res["meta"]["n_prompts"] == 3
    for name in res["plots"]:
        check_png(tmp_path / name)
    assert sweep.main(argv[:-5] + ["--temperatures", "0,2.5", "--out", str(out)]) == 2
    assert "[0, 2.0]" in capsys.readouterr().err


def test_prompt_formats_and_temperatures(tmp_path):
    assert prompts.prompt_text({"turns": ["first", "second"]}) == "first"
    assert prompts.prompt_text({"instruction": "Do it", "input": "data"}) == "Do it\n\ndata"
    assert prompts.prompt_text({"instruction": "Do it", "input": ""}) == "Do it"
    assert prompts.prompt_text({"question": "2+2?", "answer": "4"}) == "2+2?"
    with pytest.raises(ValueError, match="turns"):
        prompts.prompt_text({"text": "x"})
    builtin = prompts.read_prompts(None, 4)
    assert len(builtin) == 4 and all(isinstance(p, str) and p for p in builtin)
    assert prompts.read_prompts(None, None) == prompts.BUILTIN_PROMPTS
    assert sweep.parse_temperatures("0:1:0.1") == sweep.FULL_TEMPERATURES
    assert sweep.parse_temperatures("1.0,0,2") == [0.0, 1.0, 2.0]
    for bad in ("-0.1", "0,2.01", "", "0:1:0", "nan", "0:1", "0,1:2", "0:1:0.5:1", "0:1:nan", "0:2:1e-9", "0:x:1"):
        with pytest.raises(ValueError):
            sweep.parse_temperatures(bad)
    assert sweep.QUICK_TEMPERATURES == sweep.parse_temperatures("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
