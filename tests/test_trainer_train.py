"""tempspec_trainer.train on CPU: a few distillation steps from the tiny target lower the held-out divergence, the saved
draft reloads exactly through the engine's loader and decodes losslessly, an interrupted run resumes to the same
weights, and bad configurations are refused."""
import copy
import dataclasses
import json
import shutil
import types
from pathlib import Path

import pytest
import torch

import trainer_fixtures as tf
from tempspec_engine.models.draft_checkpoint import WEIGHTS_FILE, load_draft, read_draft_info
from tempspec_trainer import train
from tempspec_trainer.divergences import forward_kl
from tempspec_trainer.train import BatchSchedule, DistillConfig, Distiller, distill, lr_factor, make_batch

_one_thread = pytest.fixture(scope="module", autouse=True)(tf.one_thread)

N_ROWS = 200  # 12 response tokens each: enough that a few steps generalize to the held-out rows


@pytest.fixture(scope="module")
def target():
    return tf.tiny_target()


@pytest.fixture(scope="module")
def data_file(target, tmp_path_factory):
    rows = tf.sampled_rows(target, N_ROWS, prompt_len=6, response_len=12, temperature=1.0, seed=0)
    return str(tf.write_jsonl(tmp_path_factory.mktemp("data") / "t1.jsonl", rows))


def config(data_file, out_dir, **overrides) -> DistillConfig:
    base = dict(data=[data_file], out_dir=str(out_dir), tau_kd=1.0, mode="online", divergence="fkl",
                init="layers:0", precision="fp32", batch_size=4, lr=1e-2, warmup_steps=2, steps=30, seq_len=64,
                eval_rows=32, eval_every=10, save_every=10, eval_temperatures=(0.0, 1.0), device="cpu", seed=0)
    base.update(overrides)
    return DistillConfig(**base)


def logits(model, tokens):
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None).float()


def held_out_fkl(d: Distiller) -> float:
    """Forward KL at tau 1 over the held-out response tokens, computed directly from both models."""
    tokens, mask = make_batch(d.eval_seqs, "cpu")
    return float(forward_kl(logits(d.draft, tokens)[mask], logits(d.teacher, tokens)[mask], 1.0).mean())


def held_out_loss(d: Distiller) -> float:
    with torch.no_grad():
        return float(d.loss(d.eval_seqs, *make_batch(d.eval_seqs, "cpu")))


@pytest.fixture(scope="module")
def online_run(target, data_file, tmp_path_factory):
    """30 steps of online FKL at tau 1 from the target's layer 0; held-out figures before and after."""
    d = Distiller(config(data_file, tmp_path_factory.mktemp("online")), target=target, progress=False)
    before = dict(fkl=held_out_fkl(d), loss=held_out_loss(d))
    final = d.run()
    after = dict(fkl=held_out_fkl(d), loss=held_out_loss(d))
    return types.SimpleNamespace(d=d, final=final, before=before, after=after)


# ------------------------------------------------------------------------------------ pieces
def test_make_batch_masks_response_predictions():
    tokens, mask = make_batch([([1, 2, 3, 4, 5], 2), ([6, 7, 8], 1)], "cpu")
    assert tokens.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    # position t is trained iff token t+1 is a response token: row 0 predicts 3, 4, 5; row 1 predicts 7, 8
    assert mask.tolist() == [[False, True, True, True, False], [True, True, False, False, False]]


def test_batch_schedule_is_a_pure_function_of_the_index():
    seqs = [([i, i + 1], 1) for i in range(10)]
    sched = BatchSchedule(seqs, 3, seed=5)
    epoch0 = [s for g in range(3) for s in sched(g)]
    assert len(set(map(str, epoch0))) == 9  # 3 batches of 3 distinct rows per epoch (one row left over)
    assert sched(4) == BatchSchedule(seqs, 3, seed=5)(4) and sched(0) != sched(3)  # epoch 1 is reshuffled
    with pytest.raises(ValueError, match="fewer than batch_size"):
        BatchSchedule(seqs[:2], 3, seed=0)


def test_lr_factor_warmup_and_cosine(data_file, tmp_path):
    cfg = config(data_file, tmp_path, warmup_steps=4, steps=20, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cfg) == 1.0 and lr_factor(20, cfg) == pytest.approx(0.1)
    assert lr_factor(12, cfg) == pytest.approx(0.55)  # halfway through the cosine
    values = [lr_factor(s, cfg) for s in range(4, 21)]
    assert values == sorted(values, reverse=True)


def test_draft_of_all_layers_starts_at_zero_divergence(target, data_file, tmp_path):
    """A 'draft' that copies every target layer is the target: zero loss and full acceptance at any temperature
    (checks that the loss compares the right positions of the right models)."""
    d = Distiller(config(data_file, tmp_path, init="layers:0,1"), target=target, progress=False)
    assert held_out_loss(d) == pytest.approx(0.0, abs=1e-5)
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in d.evaluate().values())
    d1 = Distiller(config(data_file, tmp_path, init="layers:0"), target=target, progress=False)
    assert held_out_loss(d1) > 0.5


# ------------------------------------------------------------------------------------ online training
def test_online_fkl_lowers_held_out_divergence(online_run):
    before, after = online_run.before, online_run.after
    assert after["fkl"] < before["fkl"] - 0.1, (before, after)
    assert after["loss"] == pytest.approx(after["fkl"], rel=1e-5)  # the run's loss is that same divergence
    history = online_run.d.history
    assert [h["step"] for h in history] == list(range(31))
    assert set(history[0]) == {"step", "alpha@0", "alpha@1"}  # the evaluation before training
    assert {"alpha@0", "alpha@1"} <= set(history[10]) and "alpha@0" not in history[9]
    assert all(0.0 <= history[-1][k] <= 1.0 for k in ("alpha@0", "alpha@1"))


def test_training_leaves_target_and_shared_embeddings_alone(online_run, target):
    fresh = tf.tiny_target()
    for (name, p), q in zip(target.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(p, q), name
    d = online_run.d
    assert torch.equal(d.draft.embed_tokens.weight, target.model.embed_tokens.weight)
    assert not d.draft.embed_tokens.weight.requires_grad


def test_final_draft_reloads_to_the_same_logits(online_run, target):
    """save_final writes bf16 weights: the reloaded draft (cast back to the fp32 target's dtype) must equal the
    trained draft with its own weights rounded to bf16, exactly. Rounding both sides once is exact (bf16 -> fp32 is
    lossless), so torch.equal and not a tolerance."""
    d = online_run.d
    info = read_draft_info(online_run.final)
    assert info["shares_target_embeddings"] and info["target"] == {"name": "tiny-target", "vocab_size": tf.VOCAB}
    meta = info["metadata"]
    assert meta["final"] and meta["step"] == 30 and meta["recipe"]["tau_kd"] == 1.0
    assert meta["teacher"] == "tiny-target"
    assert (online_run.final.parent / "train_log.json").is_file()
    from safetensors.torch import load_file

    stored = load_file(str(online_run.final / WEIGHTS_FILE))
    assert "embed_tokens.weight" not in stored and all(v.dtype == torch.bfloat16 for v in stored.values())

    loaded = load_draft(online_run.final, target.model)
    assert loaded.embed_tokens is target.model.embed_tokens  # shared, not copied
    rounded = copy.deepcopy(d.draft).eval()
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name != "embed_tokens.weight":
                p.copy_(p.bfloat16().float())
    tokens = make_batch(d.eval_seqs, "cpu")[0]
    got, want = logits(loaded, tokens), logits(rounded, tokens)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    assert not torch.equal(got, logits(d.draft, tokens))  # the rounding is real: the comparison above can fail


def test_checkpoint_reloads_exactly(online_run, target, tmp_path):
    """Checkpoints keep the draft's own dtype (fp32 here): reloading one gives the weights of that step exactly. The
    two newest are kept, the last step's included (so a finished run can be extended); resuming a copy of the run
    from step 20 must reproduce the final fp32 weights bit for bit."""
    ckpts = sorted((online_run.final.parent / train.CHECKPOINTS).glob("step-*"))
    assert [c.name for c in ckpts] == ["step-000020", "step-000030"]
    ckpts = ckpts[:1]
    shutil.copytree(ckpts[-1], tmp_path / train.CHECKPOINTS / ckpts[-1].name)
    d2 = Distiller(config(online_run.d.cfg.data[0], tmp_path), target=target, progress=False)
    assert d2.resume() and d2.step == 20
    loaded = load_draft(ckpts[-1], target.model)
    tokens = make_batch(d2.eval_seqs, "cpu")[0]
    assert torch.equal(logits(loaded, tokens), logits(d2.draft, tokens))
    assert not torch.equal(logits(loaded, tokens), logits(online_run.d.draft, tokens))
    d2.run()
    for (name, p), q in zip(d2.draft.state_dict().items(), online_run.d.draft.state_dict().values()):
        assert torch.equal(p, q), name


def test_engine_decodes_with_trained_draft(online_run, target):
    """The final directory is a draft spec for the engine; greedy speculative output equals greedy target-only."""
    from tempspec_engine.engine import SpeculativeEngine

    engine = SpeculativeEngine(target, str(online_run.final), device="cpu", dtype=torch.float32, k=3, max_len=128)
    assert engine.draft.model.n_layers == 1
    prompts = [[5, 6, 7], [9], [20, 30, 40, 50, 60], tf.PROMPTS[0]]
    base = engine.generate(prompts, 0.0, 24, speculative=False, batch_size=4)
    spec = engine.generate(prompts, 0.0, 24, batch_size=4)
    for b, s in zip(base, spec):
        assert s.token_ids == b.token_ids and len(s.token_ids) >= 1
    assert sum(s.stats.accepted + s.stats.rejections for s in spec) > 0  # the draft was used
    assert sum(s.stats.accepted for s in spec) > 0


# ------------------------------------------------------------------------------------ resume
def run_interrupted(cfg, target, monkeypatch, stop_at: int) -> Distiller:
    """Runs cfg until the end of step `stop_at`, then raises KeyboardInterrupt as Ctrl-C between steps would."""
    d = Distiller(cfg, target=target, progress=False)

    def barrier(world):
        if d.step == stop_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_barrier", barrier)
    try:
        with pytest.raises(KeyboardInterrupt):
            d.run()
    finally:
        monkeypatch.undo()
    return d


@pytest.fixture(scope="module")
def resumed(target, data_file, tmp_path_factory):
    """An uninterrupted 4-step run and the same run interrupted after step 2 (a checkpoint) and resumed."""
    mp = pytest.MonkeyPatch()
    cfg = config(data_file, tmp_path_factory.mktemp("full"), steps=4, save_every=2, eval_every=2, warmup_steps=1)
    full = Distiller(cfg, target=target, progress=False)
    full.run()
    cut_cfg = dataclasses.replace(cfg, out_dir=str(tmp_path_factory.mktemp("cut")))
    cut = run_interrupted(cut_cfg, target, mp, stop_at=2)
    again = Distiller(cut_cfg, target=target, progress=False)
    assert again.resume() and again.step == 2
    final = again.run()
    return types.SimpleNamespace(cfg=cut_cfg, full=full, cut=cut, again=again, final=final)


def test_resume_reproduces_uninterrupted_weights(resumed):
    full, again = resumed.full.draft.state_dict(), resumed.again.draft.state_dict()
    assert full.keys() == again.keys()
    for name in full:
        assert torch.equal(full[name], again[name]), name
    # the comparison can fail: the weights at step 2 differ from those at step 4
    assert not torch.equal(resumed.cut.draft.state_dict()["norm.weight"], full["norm.weight"])


def test_resume_continues_history(resumed):
    full, again = resumed.full.history, resumed.again.history
    assert [h["step"] for h in again] == [0, 1, 2, 3, 4] == [h["step"] for h in full]
    for a, b in zip(full, again):
        timing = ("train_tokens_per_s", "elapsed_s")  # wall-clock figures differ between runs
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    log = json.loads((resumed.final.parent / "train_log.json").read_text())
    assert log["step"] == 4 and [h["step"] for h in log["history"]] == [0, 1, 2, 3, 4]


def test_interrupt_checkpoint_holds_the_step_weights(resumed, target):
    ckpt = resumed.final.parent / train.CHECKPOINTS / "step-000002"
    loaded = load_draft(ckpt, target.model)
    tokens = make_batch(resumed.cut.eval_seqs, "cpu")[0]
    assert torch.equal(logits(loaded, tokens), logits(resumed.cut.draft, tokens))


def test_resume_with_changed_tau_raises(resumed, target):
    cfg = dataclasses.replace(resumed.cfg, tau_kd=0.5)
    with pytest.raises(ValueError, match="tau_kd"):
        distill(cfg, resume=True, target=target, progress=False)
    longer = Distiller(dataclasses.replace(resumed.cfg, steps=6), target=target, progress=False)
    assert longer.resume() and longer.step == 4  # from the last step's checkpoint: a finished run can be extended


def test_resume_refuses_another_recipe_data_or_world(resumed, target, tmp_path):
    """Beyond MAY_CHANGE_ON_RESUME every field must be the checkpoint's (weight decay and the clip too), the data
    files' bytes must be the same (rows appended would move the held-out split), and so must the number of
    processes."""
    for change in (dict(weight_decay=0.1), dict(grad_clip=0.5), dict(batch_size=2)):
        name = next(iter(change))
        with pytest.raises(ValueError, match=name):
            Distiller(dataclasses.replace(resumed.cfg, **change), target=target, progress=False).resume()
    grown = tmp_path / "t1.jsonl"
    shutil.copy(resumed.cfg.data[0], grown)
    with open(grown, "a") as f:
        f.write(open(resumed.cfg.data[0]).readline())
    out = tmp_path / "run"
    shutil.copytree(resumed.cfg.out_dir, out)
    with pytest.raises(ValueError, match="data files changed"):
        Distiller(dataclasses.replace(resumed.cfg, out_dir=str(out), data=[str(grown)]), target=target,
                  progress=False).resume()
    state_file = sorted((out / train.CHECKPOINTS).glob("step-*"))[-1] / train.STATE_FILE
    state = torch.load(state_file, weights_only=False)
    torch.save({**state, "world_size": 2}, state_file)
    with pytest.raises(ValueError, match="trained by 2 processes"):
        Distiller(dataclasses.replace(resumed.cfg, out_dir=str(out)), target=target, progress=False).resume()


def test_resume_config_keeps_the_checkpoints_recipe(resumed):
    """A resume takes every field it is not given from the checkpoint, not from the defaults."""
    cfg = train.resume_config(resumed.cfg.out_dir, dict(data=resumed.cfg.data, out_dir=resumed.cfg.out_dir, steps=9))
    assert cfg == dataclasses.replace(resumed.cfg, steps=9)
    assert cfg.lr == 1e-2 != DistillConfig(data=[], out_dir="").lr  # the checkpoint's, not the default


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(resumed, target, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(resumed.cfg.out_dir, out)
    ckpts = sorted((out / train.CHECKPOINTS).glob("step-*"))
    assert [c.name for c in ckpts] == ["step-000002", "step-000004"]
    state_file = ckpts[-1] / train.STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:100])  # a write cut short
    d = Distiller(dataclasses.replace(resumed.cfg, out_dir=str(out)), target=target, progress=False)
    with pytest.warns(UserWarning, match="step-000004: its trainer_state.pt cannot be read"):
        assert d.resume()
    assert d.step == 2


def test_only_the_newest_readable_state_is_read(resumed, monkeypatch):
    """Finding the checkpoint to resume reads the newest state file alone, not every kept one."""
    read, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, **kw: read.append(Path(f).parent.name) or load(f, **kw))
    ckpt, state = next(train.readable_checkpoints(Path(resumed.cfg.out_dir)))
    assert (ckpt.name, state["step"], read) == ("step-000004", 4, ["step-000004"])


def test_nonfinite_gradient_stops_before_the_update(target, data_file, tmp_path, monkeypatch):
    """A finite loss with a non-finite gradient norm stops the run before the optimizer writes NaN weights."""
    d = Distiller(config(data_file, tmp_path, steps=3, eval_rows=0), target=target, progress=False)
    before = {k: v.clone() for k, v in d.draft.state_dict().items()}
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, clip: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="non-finite gradient norm"):
        d.run()
    assert all(torch.equal(v, before[k]) for k, v in d.draft.state_dict().items())


def test_existing_run_without_resume_raises(resumed, target):
    with pytest.raises(ValueError, match="already holds a run"):
        distill(resumed.cfg, target=target, progress=False)


# ------------------------------------------------------------------------------------ other modes
def test_offline_lowers_held_out_cross_entropy(target, data_file, tmp_path):
    d = Distiller(config(data_file, tmp_path, mode="offline"), target=target, progress=False)
    tokens, mask = make_batch(d.eval_seqs, "cpu")
    targets = tokens[:, 1:][mask[:, :-1]]

    def ce():
        return float(torch.nn.functional.cross_entropy(logits(d.draft, tokens)[mask], targets))

    before = ce()
    assert held_out_loss(d) == pytest.approx(before, rel=1e-5)
    final = d.run()
    assert ce() < before - 0.1
    assert read_draft_info(final)["metadata"]["recipe"]["mode"] == "offline"


@pytest.mark.parametrize("divergence,tau", [("rkl", 1.0), ("jsd", 0.5), ("tvd", 2.0), ("fkl", 0.0), ("jsd", 0.0)])
def test_other_divergences_train(target, data_file, tmp_path, divergence, tau):
    """Each divergence trains (finite losses) and lowers itself on the held-out rows (lr 3e-3: at 1e-2 the
    mode-seeking RKL and JSD overshoot in so few, so small batches)."""
    d = Distiller(config(data_file, tmp_path, divergence=divergence, tau_kd=tau, steps=20, eval_every=20, lr=3e-3),
                  target=target, progress=False)
    before = held_out_loss(d)
    d.run()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in d.history[1:])
    assert held_out_loss(d) < before


def test_bf16_precision_runs(target, data_file, tmp_path):
    d = Distiller(config(data_file, tmp_path, precision="bf16", steps=3), target=target, progress=False)
    final = d.run()
    assert next(d.draft.parameters()).dtype == torch.float32  # fp32 master weights under bf16 autocast
    assert len(d.history) == 4 and load_draft(final, target.model).norm.weight.dtype == torch.float32


@pytest.mark.parametrize("fast", [True, False])
def test_auto_precision_follows_the_cpus_bf16_speed(target, data_file, tmp_path, monkeypatch, fast):
    """precision "auto" trains in bf16 only where the CPU multiplies bf16 fast, and the run's recipe (its model card,
    its checkpoints) records what it resolved to, not "auto"."""
    monkeypatch.setattr(train, "torch_bf16_matmul_is_fast", lambda: fast)
    d = Distiller(config(data_file, tmp_path, precision="auto", steps=2, warmup_steps=1, eval_every=2),
                  target=target, progress=False)
    want = "bf16" if fast else "fp32"
    assert d.cfg.precision == want and d._autocast().fast_dtype == torch.bfloat16
    assert d._autocast()._enabled is fast
    d.run()
    meta = read_draft_info(tmp_path / train.FINAL)
    assert json.dumps(meta).count(f'"precision": "{want}"') == 1 and '"auto"' not in json.dumps(meta)
    for explicit in ("bf16", "fp32"):
        assert train.resolve_precision(explicit, torch.device("cpu")) == explicit


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("overrides,match", [
    (dict(data=["/nonexistent/t1.jsonl"]), "does not exist"),
    (dict(data=[]), "no data"),
    (dict(divergence="kl"), "unknown divergence"),
    (dict(tau_kd=-0.5), "tau_kd"),
    (dict(tau_kd=float("nan")), "tau_kd"),
    (dict(tau_kd=float("inf")), "tau_kd"),
    (dict(divergence="rkl", tau_kd=0.0), "reverse KL"),
    (dict(mode="sequence"), "mode"),
    (dict(precision="fp16"), "precision"),
    (dict(steps=0), "steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(eval_temperatures=(0.0, -1.0)), "eval temperatures"),
    (dict(eval_temperatures=(float("nan"),)), "eval temperatures"),
    (dict(eval_temperatures=()), "eval temperatures"),
    (dict(grad_clip=float("nan")), "grad_clip"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(lr=float("nan")), "lr must"),
    (dict(lr=0.0), "lr must"),
    (dict(min_lr_ratio=-3.0), "min_lr_ratio"),
    (dict(min_lr_ratio=float("nan")), "min_lr_ratio"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(jsd_beta=2.0), "jsd_beta"),
    (dict(eval_decode_prompts=0), "eval_decode_prompts"),
])
def test_bad_config_raises(target, data_file, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        Distiller(config(data_file, tmp_path, **overrides), target=target, progress=False)
    assert not (tmp_path / train.CHECKPOINTS).exists() and not (tmp_path / train.FINAL).exists()


def test_data_from_another_vocabulary_raises(target, tmp_path):
    """Rows generated by a model with a larger vocabulary (ids up to 95) cannot train a draft for this target."""
    other = tf.tiny_target(seed=1, vocab=96, tokenizer=False)
    rows = tf.sampled_rows(other, 40, seed=2)
    assert max(max(r["prompt_ids"] + r["response_ids"]) for r in rows) >= tf.VOCAB
    path = tf.write_jsonl(tmp_path / "other.jsonl", rows)
    with pytest.raises(ValueError, match="outside the target's vocabulary of 64"):
        Distiller(config(str(path), tmp_path / "out"), target=target, progress=False)


def test_too_little_data_raises(target, tmp_path):
    path = tf.write_jsonl(tmp_path / "small.jsonl", tf.sampled_rows(target, 3, seed=0))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        Distiller(config(str(path), tmp_path / "out"), target=target, progress=False)


def test_rows_not_trained_on_are_reported(target, data_file, tmp_path):
    rows = [json.loads(line) for line in open(data_file)]
    rows += [dict(rows[0], index=10_000, response_ids=[]), dict(rows[1], index=10_001, prompt_ids=[1] * 64)]
    path = tf.write_jsonl(tmp_path / "with_unusable.jsonl", rows)
    with pytest.warns(UserWarning, match=f"2 of {len(rows)} rows are not trained on"):
        Distiller(config(str(path), tmp_path / "out"), target=target, progress=False)


# ------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_online_training_on_cuda(data_file, tmp_path, precision):
    """The same run on the GPU: the held-out loss falls and the final draft reloads on CUDA to the trained logits."""
    target = tf.tiny_target()  # its own copy: the Distiller moves the teacher to the GPU
    d = Distiller(config(data_file, tmp_path, device="cuda", precision=precision), target=target, progress=False)
    assert d.device.type == "cuda" and next(d.draft.parameters()).is_cuda
    tokens, mask = make_batch(d.eval_seqs, d.device)
    with torch.no_grad():
        before = float(d.loss(d.eval_seqs, tokens, mask))
    final = d.run()
    with torch.no_grad():
        after = float(d.loss(d.eval_seqs, tokens, mask))
    assert after < before - 0.1, (before, after)
    if precision == "bf16":  # a bf16 teacher: the draft's logits need the trainer's autocast; fp32 checks the reload
        return
    loaded = load_draft(final, d.teacher, device="cuda")
    rounded = copy.deepcopy(d.draft).eval()
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name != "embed_tokens.weight":
                p.copy_(p.bfloat16().float())
    torch.testing.assert_close(logits(loaded, tokens), logits(rounded, tokens), atol=1e-4, rtol=1e-4)


def test_stop_requests_leave_ignored_signals_alone():
    """nohup ignores SIGHUP (a background job SIGINT): the trainer keeps them ignored, catches the others, and puts
    every handler back afterwards."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM)}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with train.StopRequests() as stop:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop._handle
            stop._handle(signal.SIGTERM, None)
            assert stop.agreed(1, torch.device("cpu")) and stop.reason == "stopped by SIGTERM"
            with pytest.raises(KeyboardInterrupt):  # a second signal: at once
                stop._handle(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
