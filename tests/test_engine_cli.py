"""The `tempspec generate` command on a tiny local Hugging Face model (saved to a temporary folder)."""
import pytest

pytest.importorskip("transformers")

from engine_fixtures import tiny_llama_hf, word_tokenizer  # noqa: E402
from tempspec_engine.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(62)]
    tok = word_tokenizer(words)
    tok.chat_template = "{% for m in messages %}w5 {{ m['content'] }} w6 {% endfor %}"
    tiny_llama_hf(vocab=64, layers=2, scale=4.0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_generate_streams_text(model_dir, capsys):
    args = ["generate", "--prompt", "w3 w4", "--target", str(model_dir), "--draft", "layers:0", "--device", "cpu",
            "--dtype", "fp32", "--temperature", "0", "--max-new-tokens", "8"]
    assert main(args) == 0
    greedy = capsys.readouterr()
    assert greedy.out.strip().startswith("w") and "tokens/step" in greedy.err
    assert main(args + ["--no-speculative", "--quiet"]) == 0
    assert capsys.readouterr().out == greedy.out  # lossless: same greedy text without the draft


def test_generate_batch_and_errors(model_dir, capsys):
    base = ["generate", "--target", str(model_dir), "--draft", "layers:0", "--device", "cpu", "--dtype", "fp32"]
    assert main(base + ["--prompt", "w3", "--prompt", "w7 w8 w9", "--temperature", "0.8", "--seed", "1",
                        "--max-new-tokens", "5", "--no-chat"]) == 0
    out = capsys.readouterr().out
    assert "=== 0 ===" in out and "=== 1 ===" in out
    with pytest.raises(SystemExit) as exc:  # refused by the argument parser, before the model loads
        main(base + ["--prompt", "w3", "--temperature", "-1"])
    assert exc.value.code == 2 and "argument --temperature" in capsys.readouterr().err


def test_generate_step_options(model_dir, capsys):
    """--alternatives, --no-confidence-stop, --verify-slope and --k-min reach the engine; the greedy text stays the
    target's. A cost model that prices each verified token at 50 decodes leaves all 8 steps to the target alone (an
    exploration would come after 16), unless --k-min 1 asks for a draft in every step."""
    base = ["generate", "--prompt", "w3 w4", "--target", str(model_dir), "--device", "cpu", "--dtype", "fp32",
            "--temperature", "0", "--max-new-tokens", "8"]
    assert main(base + ["--no-speculative", "--quiet"]) == 0
    want = capsys.readouterr().out
    for extra in (["--alternatives", "0", "--no-confidence-stop"], ["--alternatives", "5"]):
        assert main(base + ["--draft", "layers:0"] + extra) == 0
        got = capsys.readouterr()
        assert got.out == want and "alternatives taken" in got.err
    assert main(base + ["--draft", "layers:0", "--verify-slope", "50", "--seed", "0"]) == 0
    got = capsys.readouterr()
    assert got.out == want and "8 steps (8 without a draft)" in got.err
    assert main(base + ["--draft", "layers:0", "--verify-slope", "50", "--seed", "0", "--k-min", "1"]) == 0
    got = capsys.readouterr()
    assert got.out == want and "(0 without a draft)" in got.err  # --k-min 1: a draft in every step all the same
    with pytest.raises(SystemExit) as exc:
        main(base + ["--draft", "layers:0", "--verify-slope", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(err) == 1 and "--verify-slope" in err[0] and "finite number >= 0" in err[0]
    for draft, value, word in (("layers:0", "-1", "alternatives must be an integer >= 0"),
                               ("lookup", "2", "alternatives need a model draft")):
        assert main(base + ["--draft", draft, "--alternatives", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0]


def test_generate_with_filters_and_lenience(model_dir, capsys):
    base = ["generate", "--prompt", "w3 w4", "--target", str(model_dir), "--draft", "layers:0", "--device", "cpu",
            "--dtype", "fp32", "--temperature", "1", "--max-new-tokens", "6", "--seed", "3"]
    for extra in (["--top-k", "5", "--top-p", "0.9", "--min-p", "0.05"], ["--lenience", "0.5"],
                  ["--top-p", "0.8", "--filter-target-only"]):
        assert main(base + extra) == 0
        assert "tokens/step" in capsys.readouterr().err
    for extra, word in ((["--top-p", "0"], "--top-p"), (["--top-k", "-2"], "--top-k"),
                        (["--lenience", "2"], "--lenience")):
        with pytest.raises(SystemExit) as exc:  # refused by the argument parser, before the model loads
            main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and word in err[0]
