"""Every backend equals the readable reference token for token, given the uniforms."""
import pytest
import torch
from conftest import backend_params, make_case

from tempspec_engine import sample, speculative_sample
from tempspec_engine.reference import reference_sample, reference_speculative_sample

SHAPES = [(1, 1, 7), (3, 4, 300), (5, 2, 1000), (2, 3, 5003)]


def _check_equal(device, backend, B, k, V, relation, dtype, seed):
    draft, target, tokens, temperature, uniforms = make_case(B, k, V, relation=relation, dtype=dtype, device=device, seed=seed)
    out = speculative_sample(draft, target, tokens, temperature, uniforms=uniforms, backend=backend)
    ref_accepted, ref_tokens = reference_speculative_sample(draft.cpu(), target.cpu(), tokens.cpu(), temperature.cpu(), uniforms.cpu())
    assert out.accepted.dtype == torch.int64 and out.tokens.dtype == torch.int64
    assert out.accepted.device == draft.device and out.tokens.shape == (B, k + 1)
    torch.testing.assert_close(out.accepted.cpu(), ref_accepted, rtol=0, atol=0)
    torch.testing.assert_close(out.tokens.cpu(), ref_tokens, rtol=0, atol=0)


@backend_params()
@pytest.mark.parametrize("B,k,V", SHAPES)
@pytest.mark.parametrize("relation", ["random", "close", "equal"])
def test_speculative_sample_matches_reference_fp32(device, backend, B, k, V, relation):
    _check_equal(device, backend, B, k, V, relation, torch.float32, seed=B * 100 + k * 10 + V)


@backend_params()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_speculative_sample_matches_reference_low_precision(device, backend, dtype):
    """Half-precision logits are read as they are and upcast to fp32, so the reference on the same tensors agrees."""
    _check_equal(device, backend, 4, 3, 777, "close", dtype, seed=7)


@backend_params()
@pytest.mark.parametrize("V", [1, 7, 5003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_matches_reference(device, backend, V, dtype):
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(5, V, generator=g) * 3).to(device=device, dtype=dtype)
    temperature = torch.tensor([0.0, 1e-4, 0.3, 1.0, 10.0], device=device)
    uniforms = torch.rand(5, generator=g).to(device)
    out = sample(logits, temperature, uniforms=uniforms, backend=backend)
    ref = reference_sample(logits.cpu(), temperature.cpu(), uniforms.cpu())
    assert out.dtype == torch.int64 and out.device == logits.device
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


@backend_params()
def test_same_seed_same_output(device, backend):
    draft, target, tokens, temperature, _ = make_case(6, 4, 500, relation="close", device=device, seed=3)
    runs = []
    for _ in range(2):
        gen = torch.Generator(device=device).manual_seed(1234)
        runs.append(speculative_sample(draft, target, tokens, temperature, generator=gen, backend=backend))
    torch.testing.assert_close(runs[0].tokens, runs[1].tokens, rtol=0, atol=0)
    torch.testing.assert_close(runs[0].accepted, runs[1].accepted, rtol=0, atol=0)


@backend_params()
def test_output_layout(device, backend):
    """Accepted draft tokens first, then exactly one emitted token at index `accepted`, then -1."""
    B, k = 12, 4
    draft, target, tokens, temperature, uniforms = make_case(B, k, 64, relation="close", device=device, seed=11)
    out = speculative_sample(draft, target, tokens, temperature, uniforms=uniforms, backend=backend)
    for b in range(B):
        n = int(out.accepted[b])
        assert 0 <= n <= k
        assert torch.equal(out.tokens[b, :n], tokens[b, :n])
        assert 0 <= int(out.tokens[b, n]) < 64
        assert bool((out.tokens[b, n + 1:] == -1).all())
