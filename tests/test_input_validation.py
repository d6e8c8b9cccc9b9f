"""Bad input raises a clear error naming the argument; nothing is clamped silently."""
import pytest
import torch
from conftest import make_case

from tempspec_engine import BackendUnavailableError, sample, speculative_sample


@pytest.fixture
def case():
    return make_case(2, 3, 20, seed=0)


def _call(case, **overrides):
    draft, target, tokens, temperature, uniforms = case
    args = dict(draft_logits=draft, target_logits=target, draft_tokens=tokens, temperature=temperature, uniforms=uniforms)
    args.update(overrides)
    return speculative_sample(**args)


@pytest.mark.parametrize("overrides,match", [
    (lambda c: {"target_logits": c[1][:, :3]}, "target_logits"),
    (lambda c: {"draft_logits": c[0][0]}, "draft_logits"),
    (lambda c: {"draft_logits": c[0].double()}, "draft_logits"),
    (lambda c: {"target_logits": c[1].half()}, "share a dtype"),
    (lambda c: {"draft_logits": torch.randn(2, 3, 25)}, "larger than target_logits"),
    (lambda c: {"draft_tokens": c[2].int()}, "draft_tokens"),
    (lambda c: {"draft_tokens": c[2][:, :2]}, "draft_tokens"),
    (lambda c: {"draft_tokens": torch.full_like(c[2], 20)}, "draft_tokens"),
    (lambda c: {"draft_tokens": torch.full_like(c[2], -1)}, "draft_tokens"),
    (lambda c: {"temperature": -0.5}, "temperature"),
    (lambda c: {"temperature": float("nan")}, "temperature"),
    (lambda c: {"temperature": torch.tensor([0.5, float("nan")])}, "temperature"),
    (lambda c: {"temperature": torch.tensor([0.5, -1.0])}, "temperature"),
    (lambda c: {"temperature": torch.ones(3)}, "temperature"),
    (lambda c: {"temperature": "hot"}, "temperature"),
    (lambda c: {"uniforms": torch.rand(2, 3)}, "uniforms"),
    (lambda c: {"uniforms": torch.rand(2, 4).double()}, "uniforms"),
    (lambda c: {"uniforms": torch.full((2, 4), 1.0)}, "uniforms"),
    (lambda c: {"uniforms": torch.full((2, 4), -0.1)}, "uniforms"),
])
def test_bad_arguments_raise_value_error_naming_them(case, overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(case, **overrides(case))


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_posinf_logits_are_refused(case, which, bad):
    tensors = [case[0].clone(), case[1].clone()]
    tensors[which][1, 0, 4] = bad
    name = ["draft_logits", "target_logits"][which]
    with pytest.raises(ValueError, match=name):
        _call(case, draft_logits=tensors[0], target_logits=tensors[1])


def test_all_masked_row_is_refused(case):
    target = case[1].clone()
    target[0, 1] = float("-inf")
    with pytest.raises(ValueError, match="target_logits.*all -inf"):
        _call(case, target_logits=target)


def test_unknown_and_unavailable_backends(case):
    with pytest.raises(ValueError, match="backend"):
        _call(case, backend="tpu")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        _call(case, backend="cuda")


def test_generator_on_wrong_device(case):
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    with pytest.raises(ValueError, match="generator"):
        _call(case, uniforms=None, generator=torch.Generator(device="cuda"))


def test_sample_validates_its_arguments():
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match="logits"):
        sample(logits[0], 1.0)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, -1.0)
    with pytest.raises(ValueError, match="uniforms"):
        sample(logits, 1.0, uniforms=torch.rand(2))
    bad = logits.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        sample(bad, 1.0)
