"""tempspec_trainer.data: generating a dataset through a real SpeculativeEngine (tiny target, word tokenizer), resuming
an interrupted file, prompt-file formats, mixtures and token sequences."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import trainer_fixtures as tf  # noqa: E402
from tempspec_engine.engine import SpeculativeEngine  # noqa: E402
from tempspec_trainer.data import (dataset_responses, generate_dataset, mix_datasets, read_prompt_file,  # noqa: E402
                                   read_rows, token_sequences)

FIELDS = {"index", "source", "prompt", "prompt_ids", "response_ids", "response", "temperature", "finish_reason",
          "generator"}
MAX_NEW = 8
GEN = dict(max_new_tokens=MAX_NEW, batch_size=4, chunk=2, progress=False)


_one_thread = pytest.fixture(scope="module", autouse=True)(tf.one_thread)


@pytest.fixture(scope="module")
def engine():
    return SpeculativeEngine(tf.tiny_target(), "none", device="cpu", dtype=torch.float32, max_len=128)


@pytest.fixture
def prompt_file(tmp_path):
    return str(tf.write_prompt_file(tmp_path / "prompts.jsonl", tf.PROMPTS[:5]))


# ------------------------------------------------------------------------------------ generate_dataset
def test_one_row_per_prompt_with_documented_fields(engine, prompt_file, tmp_path):
    out = tmp_path / "gen" / "t07.jsonl"  # the parent directory does not exist yet
    summary = generate_dataset(engine, prompt_file, str(out), 0.7, seed=1, **GEN)
    assert summary == {"written": 5, "skipped": 0, "too_long": 0, "path": str(out)}
    rows = tf.read_jsonl(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    tok = engine.tokenizer
    user, assistant = tf.TOKENS.index("<|user|>"), tf.TOKENS.index("<|assistant|>")
    for r, prompt in zip(rows, tf.PROMPTS):
        assert set(r) == FIELDS
        assert r["prompt"] == prompt and r["source"] == prompt_file
        assert r["temperature"] == 0.7 and r["generator"] == "tiny-target"
        assert r["prompt_ids"] == engine.encode(prompt, chat_template=True)
        assert r["prompt_ids"][0] == user and r["prompt_ids"][-1] == assistant
        ids = r["response_ids"]
        assert 1 <= len(ids) <= MAX_NEW and all(0 <= t < tf.VOCAB for t in ids)
        if ids[-1] == tf.EOS_ID:
            assert r["finish_reason"] == "eos" and tf.EOS_ID not in ids[:-1]
        else:
            assert r["finish_reason"] == "length" and len(ids) == MAX_NEW
        assert r["response"] == tok.decode(ids, skip_special_tokens=True)


def test_rows_keep_the_prompt_rows_category(engine, tmp_path):
    """Spec-Bench rows carry a category; the generated rows keep it (per-category evaluation), others have none."""
    prompts = tmp_path / "bench.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in [
        {"question_id": 1, "category": "qa", "turns": [tf.PROMPTS[0]]},
        {"question_id": 2, "category": "translation", "turns": [tf.PROMPTS[1], "again"]},
        {"question_id": 3, "turns": [tf.PROMPTS[2]]}]))
    out = tmp_path / "gen.jsonl"
    generate_dataset(engine, str(prompts), str(out), 0.0, **GEN)
    rows = tf.read_jsonl(out)
    assert [r.get("category") for r in rows] == ["qa", "translation", None]
    assert set(rows[0]) == FIELDS | {"category"} and set(rows[2]) == FIELDS
    # a category that is not a string is refused in one line naming the file and line, like any broken prompt row
    prompts.write_text(json.dumps({"category": "qa", "turns": ["a"]}) + "\n" +
                       json.dumps({"category": 7, "turns": ["b"]}) + "\n")
    with pytest.raises(ValueError, match=r"bench\.jsonl:2: 'category' must be a string, got 7"):
        generate_dataset(engine, str(prompts), str(tmp_path / "bad.jsonl"), 0.0, **GEN)


def test_greedy_rows_match_single_prompt_generation(engine, prompt_file, tmp_path):
    """At T = 0 each row holds its own prompt's greedy continuation (no mix-up across the batch or the chunks)."""
    out = tmp_path / "t0.jsonl"
    generate_dataset(engine, prompt_file, str(out), 0.0, **GEN)
    rows = tf.read_jsonl(out)
    assert len({tuple(r["response_ids"]) for r in rows}) > 1  # the prompts lead to different responses
    for r in rows:
        (want,) = engine.generate([r["prompt"]], 0.0, MAX_NEW, chat_template=True, speculative=False)
        assert r["response_ids"] == want.token_ids and r["prompt_ids"] == want.prompt_ids


def test_second_call_writes_nothing(engine, prompt_file, tmp_path):
    out = tmp_path / "t1.jsonl"
    generate_dataset(engine, prompt_file, str(out), 1.0, seed=0, **GEN)
    before = out.read_bytes()
    assert generate_dataset(engine, prompt_file, str(out), 1.0, seed=0, **GEN) == {
        "written": 0, "skipped": 5, "too_long": 0, "path": str(out)}
    assert out.read_bytes() == before


def test_limit_then_all_appends_only_the_rest(engine, prompt_file, tmp_path):
    out = tmp_path / "t1.jsonl"
    assert generate_dataset(engine, prompt_file, str(out), 1.0, limit=2, **GEN)["written"] == 2
    assert generate_dataset(engine, prompt_file, str(out), 1.0, **GEN) == {"written": 3, "skipped": 2,
                                                                            "too_long": 0, "path": str(out)}
    assert [r["index"] for r in tf.read_jsonl(out)] == [0, 1, 2, 3, 4]


def test_prompts_too_long_for_the_cache_are_skipped_with_a_warning(engine, prompt_file, tmp_path):
    """A prompt that cannot fit the KV cache beside max_new_tokens is skipped and counted. Chunks keep their
    positions and seeds, so a chunk without such a prompt holds the rows that a cache large enough writes."""
    lengths = [len(engine.encode(p, chat_template=True)) for p in tf.PROMPTS[:5]]
    longest = max(lengths)
    small = SpeculativeEngine(tf.tiny_target(), "none", device="cpu", dtype=torch.float32,
                              max_len=longest - 1 + MAX_NEW + engine.k_max + 1)  # every prompt but the longest
    out, ref = tmp_path / "small.jsonl", tmp_path / "ref.jsonl"
    with pytest.warns(UserWarning, match="longer than"):
        summary = generate_dataset(small, prompt_file, str(out), 1.0, seed=2, **GEN)
    long_ids = {i for i, n in enumerate(lengths) if n == longest}
    assert summary == {"written": 5 - len(long_ids), "skipped": 0, "too_long": len(long_ids), "path": str(out)}
    rows = tf.read_jsonl(out)
    assert [r["index"] for r in rows] == [i for i in range(5) if i not in long_ids]
    generate_dataset(engine, prompt_file, str(ref), 1.0, seed=2, **GEN)
    chunk_of = lambda i: i // GEN["chunk"]  # noqa: E731
    clean = {chunk_of(i) for i in range(5)} - {chunk_of(i) for i in long_ids}
    assert clean  # the comparison below is not empty
    assert [r for r in rows if chunk_of(r["index"]) in clean] == \
        [r for r in tf.read_jsonl(ref) if chunk_of(r["index"]) in clean]


def test_seed_changes_sampled_rows(engine, prompt_file, tmp_path):
    """Makes the resume test below meaningful: at T = 1 the rows depend on the seed."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    generate_dataset(engine, prompt_file, str(a), 1.0, seed=0, **GEN)
    generate_dataset(engine, prompt_file, str(b), 1.0, seed=1, **GEN)
    assert tf.read_jsonl(a) != tf.read_jsonl(b)


def interrupt(path, keep: int) -> None:
    """Leaves the first `keep` complete rows and half of the next line (a write cut short), like a killed run."""
    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in lines[:keep]) + lines[keep][: len(lines[keep]) // 2])


def test_resume_after_interruption_equals_uninterrupted_run(engine, prompt_file, tmp_path):
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    generate_dataset(engine, prompt_file, str(full), 1.0, seed=3, **GEN)
    cut.write_bytes(full.read_bytes())
    interrupt(cut, keep=2)  # the first chunk (2 prompts) was flushed, the second one was being written
    assert [r["index"] for r in read_rows(str(cut))] == [0, 1]  # the half-written line is ignored
    assert generate_dataset(engine, prompt_file, str(cut), 1.0, seed=3, **GEN) == {
        "written": 3, "skipped": 2, "too_long": 0, "path": str(cut)}
    rows = tf.read_jsonl(cut)  # every line parses: the partial line was removed, not appended to
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows == tf.read_jsonl(full)
    assert cut.read_bytes() == full.read_bytes()


def test_resume_inside_a_chunk_equals_uninterrupted_run(engine, prompt_file, tmp_path):
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    generate_dataset(engine, prompt_file, str(full), 1.0, seed=3, **GEN)
    cut.write_bytes(full.read_bytes())
    interrupt(cut, keep=3)  # rows 0-2 on disk: the second chunk (prompts 2, 3) was half written
    generate_dataset(engine, prompt_file, str(cut), 1.0, seed=3, **GEN)
    assert tf.read_jsonl(cut) == tf.read_jsonl(full)


def test_file_at_another_temperature_raises(engine, prompt_file, tmp_path):
    out = tmp_path / "mixed.jsonl"
    generate_dataset(engine, prompt_file, str(out), 0.5, limit=2, **GEN)
    before = out.read_bytes()
    with pytest.raises(ValueError, match="temperature 0.5"):
        generate_dataset(engine, prompt_file, str(out), 1.0, **GEN)
    assert out.read_bytes() == before


def test_resume_refuses_rows_of_another_kind(engine, prompt_file, tmp_path):
    """A file is resumed only by a run that writes rows of its kind: the same temperature, generator and cut."""
    out = tmp_path / "g.jsonl"
    generate_dataset(engine, prompt_file, str(out), 1.0, limit=2, **GEN)
    before = out.read_bytes()
    with pytest.raises(ValueError, match="generator 'tiny-target'"):
        generate_dataset(engine, prompt_file, str(out), 1.0, generator_name="other", **GEN)
    with pytest.raises(ValueError, match="--max-new-tokens 4"):
        generate_dataset(engine, prompt_file, str(out), 1.0, **dict(GEN, max_new_tokens=4))
    with pytest.raises(ValueError, match="temperature 1.0, not None"):
        dataset_responses(engine, prompt_file, str(out))
    assert out.read_bytes() == before
    with pytest.raises(ValueError, match="the prompt file itself"):
        generate_dataset(engine, prompt_file, prompt_file, 1.0, **GEN)


def test_fixed_data_appends_and_resumes(engine, tmp_path):
    """dataset_responses appends like generate_dataset: the rows already there stay, and the rest are added."""
    prompts = tf.write_jsonl(tmp_path / "p.jsonl", [{"instruction": f"w{i}", "output": f"w{i + 1}"} for i in range(4)])
    out = tmp_path / "fixed.jsonl"
    first = dataset_responses(engine, str(prompts), str(out), limit=2)
    assert (first["written"], first["skipped"]) == (2, 0)
    rest = dataset_responses(engine, str(prompts), str(out))
    assert (rest["written"], rest["skipped"]) == (2, 2)
    rows = tf.read_jsonl(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and all(r["generator"] == "data" for r in rows)
    with pytest.raises(ValueError, match="temperature None, not 0.5"):
        generate_dataset(engine, str(prompts), str(out), 0.5, **GEN)


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(chunk=0),
                                    dict(batch_size=0)])
def test_bad_generation_arguments_raise(engine, prompt_file, tmp_path, kwargs):
    args = dict(GEN, temperature=1.0)
    args.update(kwargs)
    temperature = args.pop("temperature")
    with pytest.raises(ValueError):
        generate_dataset(engine, prompt_file, str(tmp_path / "x.jsonl"), temperature, **args)
    assert not (tmp_path / "x.jsonl").exists()


# ------------------------------------------------------------------------------------ read_prompt_file
def test_read_prompt_file_formats(tmp_path):
    path = tf.write_jsonl(tmp_path / "p.jsonl", [
        {"instruction": "say a word", "input": "the cat", "output": "x"},  # Alpaca with input
        {"instruction": "say two words", "input": ""},  # Alpaca without input
        {"question_id": 7, "turns": ["first turn", "second turn"]},  # Spec-Bench
        {"question": "what is two and two", "answer": "#### 4"},  # GSM8K
        {"prompt": "plain prompt"},
    ])
    assert read_prompt_file(str(path)) == [(0, "say a word\n\nthe cat"), (1, "say two words"), (2, "first turn"),
                                           (3, "what is two and two"), (4, "plain prompt")]


@pytest.mark.parametrize("kind", ["instruction", "turns", "question"])
def test_read_prompt_file_of_fixture_kinds(tmp_path, kind):
    path = tf.write_prompt_file(tmp_path / f"{kind}.jsonl", tf.PROMPTS[:3], kind=kind)
    assert read_prompt_file(str(path)) == list(enumerate(tf.PROMPTS[:3]))


def test_read_prompt_file_offset_limit_and_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c"}\n{"prompt": "d"}\n')
    assert read_prompt_file(str(path)) == [(0, "a"), (2, "b"), (3, "c"), (4, "d")]  # index = line number
    assert read_prompt_file(str(path), limit=2) == [(0, "a"), (2, "b")]
    assert read_prompt_file(str(path), limit=2, offset=3) == [(3, "c"), (4, "d")]
    for bad in (dict(offset=-1), dict(limit=0)):
        with pytest.raises(ValueError):
            read_prompt_file(str(path), **bad)
    with pytest.raises(ValueError, match="no prompts"):
        read_prompt_file(str(path), offset=10)


@pytest.mark.parametrize("bad_line", ['{"output": "no prompt here"}', "this is not json", '{"turns": []}'])
def test_read_prompt_file_bad_row_names_file_and_line(tmp_path, bad_line):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "fine too"}\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=f"{path}:3"):
        read_prompt_file(str(path))


def test_read_rows_corrupt_middle_row_raises(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"index": 0}\n{"index": 1, "resp\n{"index": 2}\n')
    with pytest.raises(ValueError, match=":2"):
        read_rows(str(path))
    with pytest.raises(ValueError, match="missing.jsonl does not exist"):
        read_rows(str(tmp_path / "missing.jsonl"))
    assert read_rows(str(tmp_path / "missing.jsonl"), missing_ok=True) == []


# ------------------------------------------------------------------------------------ mix_datasets
def gen_rows(n, temperature):
    return [{"index": i, "prompt_ids": [1, 2], "response_ids": [3 + i % 5], "temperature": temperature}
            for i in range(n)]


@pytest.fixture
def sources(tmp_path):
    a = tf.write_jsonl(tmp_path / "t0.jsonl", gen_rows(10, 0.0))
    b = tf.write_jsonl(tmp_path / "t1.jsonl", gen_rows(10, 1.0))
    return str(a), str(b)


def by_temperature(rows):
    counts = {}
    for r in rows:
        counts[r["temperature"]] = counts.get(r["temperature"], 0) + 1
    return counts


def test_mix_respects_proportions(sources, tmp_path):
    a, b = sources
    out = tmp_path / "mix.jsonl"
    assert mix_datasets([(a, 1), (b, 3)], str(out), total=8, seed=0) == {a: 2, b: 6}
    rows = tf.read_jsonl(out)
    assert by_temperature(rows) == {0.0: 2, 1.0: 6}
    assert len({(r["temperature"], r["index"]) for r in rows}) == 8  # drawn without replacement
    # default total: the largest mixture every source can supply (b limits it: 10 / 0.75 -> 13 rows)
    assert mix_datasets([(a, 0.25), (b, 0.75)], str(out), seed=0) == {a: 3, b: 10}
    assert by_temperature(tf.read_jsonl(out)) == {0.0: 3, 1.0: 10}


def test_mix_is_shuffled_and_seeded(sources, tmp_path):
    a, b = sources
    outs = [tmp_path / f"m{s}.jsonl" for s in (0, 0, 1)]
    for out, seed in zip(outs, (0, 0, 1)):
        mix_datasets([(a, 1), (b, 1)], str(out), total=20, seed=seed)
    first, again, other = (tf.read_jsonl(o) for o in outs)
    assert first == again and first != other
    temps = [r["temperature"] for r in first]
    assert temps != sorted(temps) and temps != sorted(temps, reverse=True)


def test_mix_zero_proportion_takes_nothing(sources, tmp_path):
    a, b = sources
    assert mix_datasets([(a, 0), (b, 1)], str(tmp_path / "m.jsonl"), total=10) == {a: 0, b: 10}


def test_mix_rejects_bad_requests(sources, tmp_path):
    a, b = sources
    out = str(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="at most 13"):
        mix_datasets([(a, 1), (b, 3)], out, total=14)
    with pytest.raises(ValueError, match="at most 20"):
        mix_datasets([(a, 1), (b, 1)], out, total=21)
    for weights in ([-1, 2], [0, 0]):
        with pytest.raises(ValueError, match="proportions"):
            mix_datasets([(a, weights[0]), (b, weights[1])], out, total=4)
    with pytest.raises(ValueError):
        mix_datasets([], out)
    with pytest.raises(ValueError, match="missing.jsonl does not exist"):
        mix_datasets([(a, 1), (str(tmp_path / "missing.jsonl"), 1)], out)
    empty = tf.write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="no generated rows"):
        mix_datasets([(a, 1), (str(empty), 1)], out)
    for weight in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            mix_datasets([(a, weight), (b, 1)], out, total=4)


def test_mix_never_writes_over_a_source(sources):
    a, b = sources
    before = open(a).read()
    with pytest.raises(ValueError, match="also a source"):
        mix_datasets([(a, 1), (b, 1)], a, total=2)
    assert open(a).read() == before


@pytest.mark.parametrize("total", [1, 3, 5, 7, 13])
def test_mix_writes_exactly_the_total_asked(sources, tmp_path, total):
    a, b = sources
    out = tmp_path / "m.jsonl"
    for shares in ((1, 1), (1, 3), (2, 1)):
        taken = mix_datasets([(a, shares[0]), (b, shares[1])], str(out), total=total)
        assert sum(taken.values()) == len(tf.read_jsonl(out)) == total
        exact = total * shares[0] / sum(shares)  # each count is the exact share rounded down or up
        assert exact - 1 < taken[a] < exact + 1


# ------------------------------------------------------------------------------------ token_sequences
def test_token_sequences_truncation_and_skips():
    rows = [{"index": 0, "prompt_ids": [1, 2, 3], "response_ids": [4, 5, 6, 7]},
            {"index": 1, "prompt_ids": [1, 2], "response_ids": []},  # no response: skipped
            {"index": 2, "prompt_ids": [9] * 5, "response_ids": [8]},  # prompt fills max_len: skipped
            {"index": 3, "prompt_ids": [1], "response_ids": [2, 3]}]
    assert list(token_sequences(rows, max_len=5)) == [([1, 2, 3, 4, 5], 3), ([1, 2, 3], 1)]
    assert list(token_sequences(rows, max_len=100)) == [([1, 2, 3, 4, 5, 6, 7], 3), ([9] * 5 + [8], 5),
                                                        ([1, 2, 3], 1)]


@pytest.mark.parametrize("missing", ["prompt_ids", "response_ids"])
def test_token_sequences_rejects_rows_without_ids(missing):
    row = {"index": 4, "prompt_ids": [1], "response_ids": [2]}
    del row[missing]
    with pytest.raises(ValueError, match=missing):
        list(token_sequences([row], 16))


def test_generated_file_feeds_token_sequences(engine, prompt_file, tmp_path):
    out = tmp_path / "t1.jsonl"
    generate_dataset(engine, prompt_file, str(out), 1.0, **GEN)
    seqs = list(token_sequences(read_rows(str(out)), 128))
    rows = tf.read_jsonl(out)
    assert seqs == [(r["prompt_ids"] + r["response_ids"], len(r["prompt_ids"])) for r in rows]
    json.dumps(seqs)  # plain ints
