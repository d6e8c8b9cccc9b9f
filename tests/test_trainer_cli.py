"""`tempspec-train` end to end on a tiny Hugging Face Llama saved to disk: gen-data, mix, distill (one process and
two torchrun processes over gloo), eval; --help of every subcommand; clear errors for bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tempspec_trainer.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A 2-layer Llama (vocab 130) with a word-level tokenizer and a chat template, saved as a HF directory."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tiny_hf")
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(120)] + ["what", "is", "the", "a", "answer", "hello", "x"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                  eos_token="</s>")
    hf_tok.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                            "{% if add_generation_prompt %}answer{% endif %}")
    cfg = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # a peaked, non-uniform distribution so that distillation has something to learn
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(d / "model")
    hf_tok.save_pretrained(d / "model")
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"what is w{i} the w{(7 * i) % 120}"}) + "\n"
                               for i in range(40)))
    return d


def _gen(tiny_hf, out, temperature, limit=40):
    return main(["gen-data", "--target", str(tiny_hf / "model"), "--prompts", str(tiny_hf / "prompts.jsonl"),
                 "--out", str(out), "--temperature", str(temperature), "--max-new-tokens", "12", "--batch-size", "8",
                 "--chunk", "8", "--dtype", "fp32", "--max-len", "64", "--limit", str(limit), "--no-progress"])


@pytest.fixture(scope="module")
def data(tiny_hf):
    path = tiny_hf / "t1.jsonl"
    assert _gen(tiny_hf, path, 1.0) == 0
    return path


DISTILL = ["--init", "fresh:dim=16,layers=1,heads=2,kv_heads=1,mlp=32", "--steps", "4", "--batch-size", "4", "--precision", "fp32", "--eval-rows", "8",
           "--eval-every", "2", "--save-every", "2", "--lr", "1e-2", "--no-progress", "--tau-kd", "1.0"]


def test_help_of_every_subcommand(capsys):
    for cmd in ("gen-data", "mix", "distill", "eval"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: tempspec-train " + cmd in capsys.readouterr().out


def test_gen_data_rows_and_mix(tiny_hf, data, tmp_path):
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 40 and {r["temperature"] for r in rows} == {1.0}
    greedy = tmp_path / "t0.jsonl"
    assert _gen(tiny_hf, greedy, 0.0, limit=20) == 0
    out = tmp_path / "mix.jsonl"
    assert main(["mix", "--source", f"{greedy}:0.5", "--source", f"{data}:0.5", "--out", str(out)]) == 0
    mixed = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted({r["temperature"] for r in mixed}) == [0.0, 1.0]
    assert sum(r["temperature"] == 0.0 for r in mixed) == sum(r["temperature"] == 1.0 for r in mixed) == 20


def test_distill_then_eval(tiny_hf, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--target", str(tiny_hf / "model"), "--data", str(data), "--out-dir", str(out),
                 "--eval-prompts", str(tiny_hf / "prompts.jsonl"), "--eval-decode-prompts", "3",
                 "--eval-decode-tokens", "6", "--eval-temperatures", "0,1"] + DISTILL) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["step"] == 4 and log["recipe"]["tau_kd"] == 1.0
    measured = [h for h in log["history"] if "measured_alpha@0" in h]
    assert [h["step"] for h in measured] == [0, 2, 4]  # measured by decoding at every evaluation
    assert all(0.0 <= h["measured_alpha@1"] <= 1.0 for h in measured)
    assert measured[-1]["measured_alpha@0"] > measured[0]["measured_alpha@0"]
    res = tmp_path / "eval.json"
    assert main(["eval", "--target", str(tiny_hf / "model"), "--drafts", str(out / "init"), str(out / "final"),
                 "--data", str(data), "--n-rows", "16", "--temperatures", "0,1", "--out", str(res),
                 "--dtype", "fp32", "--device", "cpu"]) == 0
    assert main(["eval", "--target", str(tiny_hf / "model"), "--drafts", str(out / "final"), "--data",
                 str(tmp_path / "missing.jsonl"), "--dtype", "fp32", "--device", "cpu"]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert main(["eval", "--target", str(tiny_hf / "model"), "--drafts", str(out / "final"), "--data", str(data),
                 "--position", "2", "--dtype", "fp32", "--device", "cpu"]) == 2  # later positions: feature heads
    assert "draft position 2: later positions are scored for feature heads only" in capsys.readouterr().err
    assert main(["eval", "--target", str(tiny_hf / "model"), "--drafts", str(out / "final"), "--prompts",
                 str(tiny_hf / "prompts.jsonl"), "--position", "2"]) == 2  # nothing it would score
    assert "--position 2 picks the draft position scored on --data rows: give --data" in capsys.readouterr().err
    report = json.loads(res.read_text())
    assert report["draft_position"] == 1
    expected, paired = report["expected"], report["expected_minus_first"][str(out / "final")]
    init, final = expected[str(out / "init")], expected[str(out / "final")]
    assert final["alpha@0"] > init["alpha@0"] + 0.5
    for t in ("0", "1"):  # the paired difference on the same rows, with its own standard error
        assert paired[f"alpha@{t}"] == pytest.approx(final[f"alpha@{t}"] - init[f"alpha@{t}"])
        assert 0.0 <= final[f"alpha@{t}_se"] < 0.2 and 0.0 <= paired[f"alpha@{t}_se"] < 0.2
    assert paired["alpha@1_se"] > 0.0
    assert "expected_by_category" not in report  # these rows have no category
    # rows with a category (gen-data keeps Spec-Bench's): the same scores, also per category
    labelled = tmp_path / "labelled.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()][:16]
    labelled.write_text("".join(json.dumps({**r, "category": "ab"[i % 3 == 0]}) + "\n" for i, r in enumerate(rows)))
    assert main(["eval", "--target", str(tiny_hf / "model"), "--drafts", str(out / "final"), "--data", str(labelled),
                 "--n-rows", "16", "--temperatures", "0,1", "--out", str(res), "--dtype", "fp32", "--device",
                 "cpu"]) == 0
    assert "by category at T=1: b " in capsys.readouterr().out
    report = json.loads(res.read_text())
    assert report["expected"][str(out / "final")] == final
    by_category = report["expected_by_category"][str(out / "final")]
    assert list(by_category) == ["b", "a"] and by_category["b"]["tokens"] > 0 and by_category["a"]["tokens"] > 0
    for t in ("0", "1"):  # the categories' token-weighted mean is the whole file's
        mean = sum(c[f"alpha@{t}"] * c["tokens"] for c in by_category.values()) / sum(
            c["tokens"] for c in by_category.values())
        assert mean == pytest.approx(final[f"alpha@{t}"])
    # on-policy data: the distilled draft itself samples the responses
    on_policy = tmp_path / "on_policy.jsonl"
    assert main(["gen-data", "--target", str(tiny_hf / "model"), "--generator", str(out / "final"),
                 "--prompts", str(tiny_hf / "prompts.jsonl"), "--out", str(on_policy), "--temperature", "1.0",
                 "--max-new-tokens", "8", "--dtype", "fp32", "--limit", "6", "--no-progress"]) == 0
    rows = [json.loads(line) for line in on_policy.read_text().splitlines()]
    assert len(rows) == 6 and {r["generator"] for r in rows} == {str(out / "final")}
    assert "tempspec-train distill" in (out / "final" / "README.md").read_text()
    # a second distill into the same directory must not silently overwrite the run
    assert main(["distill", "--target", str(tiny_hf / "model"), "--data", str(data), "--out-dir", str(out)]
                + DISTILL) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--divergence", "nope"], "argument --divergence: invalid choice: 'nope'"),
    (["--tau-kd", "-1"], "tau_kd"),
    (["--mode", "both"], "argument --mode: invalid choice: 'both'"),
    (["--feature-taps", "1,x"], "argument --feature-taps: expected comma-separated integers"),
    (["--init", "feature", "--feature-taps", "2"], "must be block indices of the target, 0..1"),
    (["--feature-taps", "1"], "feature_taps are for feature heads"),
])
def test_distill_bad_input(tiny_hf, data, tmp_path, capsys, args, message):
    try:
        code = main(["distill", "--target", str(tiny_hf / "model"), "--data", str(data),
                     "--out-dir", str(tmp_path / "r")] + DISTILL + args)
    except SystemExit as exc:  # refused by the argument parser, before anything loads
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_gen_data_missing_prompt_field(tiny_hf, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "hello"}) + "\n" + json.dumps({"text_field": "x"}) + "\n")
    code = main(["gen-data", "--target", str(tiny_hf / "model"), "--prompts", str(bad), "--out",
                 str(tmp_path / "o.jsonl"), "--temperature", "1", "--dtype", "fp32", "--no-progress"])
    assert code == 2 and "bad.jsonl:2" in capsys.readouterr().err


def test_gen_data_temperature_is_needed_only_to_sample(tiny_hf, tmp_path, capsys):
    prompts = tmp_path / "fixed.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"what is w{i}", "output": f"the answer w{i}"}) + "\n"
                               for i in range(3)))
    base = ["gen-data", "--target", str(tiny_hf / "model"), "--prompts", str(prompts), "--dtype", "fp32",
            "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "sampled.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--temperature is required" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sampled.jsonl").exists()
    assert main(base + ["--out", str(tmp_path / "fixed_out.jsonl"), "--generator", "data"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "fixed_out.jsonl").read_text().splitlines()]
    assert [r["response"].strip() for r in rows] == [f"the answer w{i}" for i in range(3)]
    assert all(r["temperature"] is None and r["generator"] == "data" for r in rows)


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_distill_under_torchrun_two_processes(tiny_hf, data, tmp_path):
    """The same command under torchrun: DistributedDataParallel over gloo on CPU, rank 0 writes the draft."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", "29613", "-m", "tempspec_trainer.cli", "distill",
           "--target", str(tiny_hf / "model"), "--data", str(data), "--out-dir", str(out), "--device", "cpu"] + DISTILL
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["step"] == 4
    assert (out / "final" / "model.safetensors").is_file()
    assert proc.stdout.count("final draft:") == 1  # only rank 0 reports
    assert log["world_size"] == 2 and "sequences x 2 processes" in (out / "final" / "README.md").read_text()


def test_gen_data_with_a_feature_head_writes_its_own_samples(tiny_hf, tmp_path):
    """On-policy data of an EAGLE-style head: the target reads the prompt, the head writes on its own features."""
    from tempspec_engine.models.feature_draft import FeatureDraft, FeatureDraftConfig, save_feature_draft
    from tempspec_engine.models.loading import load_target

    target = load_target(str(tiny_hf / "model"), torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    head = FeatureDraft(FeatureDraftConfig.for_target(target.model.config))
    save_feature_draft(head, tmp_path / "head", target_name=target.name)
    out = tmp_path / "on_policy_head.jsonl"
    args = ["gen-data", "--target", str(tiny_hf / "model"), "--generator", str(tmp_path / "head"),
            "--prompts", str(tiny_hf / "prompts.jsonl"), "--out", str(out), "--temperature", "0", "--max-new-tokens",
            "8", "--dtype", "fp32", "--limit", "5", "--batch-size", "2", "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and {r["generator"] for r in rows} == {str(tmp_path / "head")}
    assert all(1 <= len(r["response_ids"]) <= 8 and r["temperature"] == 0.0 for r in rows)
    # greedy: a second file from the same head holds the same responses
    assert main(args[:8] + [str(tmp_path / "again.jsonl")] + args[9:]) == 0
    again = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [r["response_ids"] for r in again] == [r["response_ids"] for r in rows]
