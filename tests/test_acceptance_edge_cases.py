"""Edge cases of the acceptance op, each handled exactly on every backend (checked against the reference and against
the hand-derived answer)."""
import torch
from conftest import backend_params, make_case

from tempspec_engine import speculative_sample
from tempspec_engine.reference import reference_speculative_sample

NEG_INF = float("-inf")


def _run(device, backend, draft, target, tokens, temperature, uniforms):
    args = [t.to(device) for t in (draft, target, tokens)]
    temperature = temperature.to(device) if isinstance(temperature, torch.Tensor) else temperature
    out = speculative_sample(*args, temperature, uniforms=uniforms.to(device), backend=backend)
    return out.accepted.cpu(), out.tokens.cpu()


@backend_params()
def test_equal_distributions_accept_everything(device, backend):
    draft, target, tokens, _, uniforms = make_case(4, 3, 50, relation="equal", seed=1, temperature=torch.ones(4))
    accepted, out = _run(device, backend, draft, target, tokens, 1.0, uniforms)
    assert bool((accepted == 3).all())
    assert torch.equal(out[:, :3], tokens)


@backend_params()
def test_zero_residual_falls_back_to_target(device, backend):
    """p == q and the draft token is masked in both: rejected (p(x) = 0), residual all zero, drawn from p."""
    V = 16
    logits = torch.randn(1, 2, V, generator=torch.Generator().manual_seed(0))
    logits[..., 3] = NEG_INF
    draft, target = logits[:, :1].clone(), logits.clone()
    target[:, 0] = draft[:, 0]
    tokens = torch.tensor([[3]])
    for u in (0.0, 0.37, 0.999):
        uniforms = torch.tensor([[0.5, u]])
        accepted, out = _run(device, backend, draft, target, tokens, 0.8, uniforms)
        ref_accepted, ref_out = reference_speculative_sample(draft, target, tokens, torch.tensor([0.8]), uniforms)
        assert int(accepted) == 0 and int(out[0, 0]) != 3
        assert torch.equal(out, ref_out) and torch.equal(accepted, ref_accepted)


@backend_params()
def test_draft_probability_zero_is_accepted(device, backend):
    """q(x) = 0 < p(x): the ratio is infinite, so the token is accepted whatever u."""
    V = 10
    g = torch.Generator().manual_seed(2)
    draft = torch.randn(1, 1, V, generator=g)
    draft[0, 0, 4] = NEG_INF
    target = torch.randn(1, 2, V, generator=g)
    accepted, out = _run(device, backend, draft, target, torch.tensor([[4]]), 1.0, torch.tensor([[0.999, 0.5]]))
    assert int(accepted) == 1 and int(out[0, 0]) == 4


@backend_params()
def test_target_masked_token_is_always_rejected(device, backend):
    """p(x) = 0: rejected even with u = 0, and masked target tokens are never emitted."""
    V = 10
    g = torch.Generator().manual_seed(3)
    draft = torch.randn(1, 1, V, generator=g)
    target = torch.randn(1, 2, V, generator=g)
    target[0, :, :5] = NEG_INF
    for u in (0.0, 0.5, 0.999):
        accepted, out = _run(device, backend, draft, target, torch.tensor([[2]]), 1.0, torch.tensor([[0.0, u]]))
        assert int(accepted) == 0 and 5 <= int(out[0, 0]) < V


@backend_params()
def test_smaller_draft_vocabulary_is_padded(device, backend):
    draft, target, tokens, temperature, uniforms = make_case(3, 2, 40, relation="close", seed=4,
                                                             temperature=torch.tensor([0.0, 0.5, 1.0]))
    target = torch.cat([target, torch.randn(3, 3, 9)], dim=-1)  # the target has 9 extra tokens
    accepted, out = _run(device, backend, draft, target, tokens, temperature, uniforms)
    padded = torch.cat([draft, torch.full((3, 2, 9), NEG_INF)], dim=-1)
    ref_accepted, ref_out = reference_speculative_sample(padded, target, tokens, temperature, uniforms)
    assert torch.equal(accepted, ref_accepted) and torch.equal(out, ref_out)


@backend_params()
def test_extreme_temperatures_and_odd_vocabulary(device, backend):
    """T = 1e-4 behaves like greedy, T = 10 like near-uniform; V = 4099 is no multiple of any block size."""
    for t in (1e-4, 10.0):
        draft, target, tokens, temperature, uniforms = make_case(3, 3, 4099, relation="close", seed=5,
                                                                 temperature=torch.full((3,), t))
        accepted, out = _run(device, backend, draft, target, tokens, temperature, uniforms)
        ref_accepted, ref_out = reference_speculative_sample(draft, target, tokens, temperature, uniforms)
        assert torch.equal(accepted, ref_accepted) and torch.equal(out, ref_out)
        assert bool(torch.isfinite(out.float()).all())


@backend_params()
def test_greedy_rows_follow_target_argmax_with_first_index_ties(device, backend):
    V = 12
    target = torch.zeros(2, 3, V)
    target[:, :, 5] = 3.0
    target[:, :, 9] = 3.0  # tie: the first index (5) is the argmax
    target[1, 1, 9] = 4.0  # row 1, position 1: argmax 9
    draft = torch.randn(2, 2, V)
    tokens = torch.tensor([[5, 5], [5, 7]])
    accepted, out = _run(device, backend, draft, target, tokens, 0.0, torch.rand(2, 3))
    assert accepted.tolist() == [2, 1]
    assert out.tolist() == [[5, 5, 5], [5, 9, -1]]


@backend_params()
def test_mixed_per_row_temperatures(device, backend):
    """Greedy and sampled rows in one batch are each decided by their own temperature."""
    draft, target, tokens, _, uniforms = make_case(4, 2, 30, relation="close", seed=6, temperature=torch.zeros(4))
    temperature = torch.tensor([0.0, 0.7, 0.0, 1.3])
    accepted, out = _run(device, backend, draft, target, tokens, temperature, uniforms)
    ref_accepted, ref_out = reference_speculative_sample(draft, target, tokens, temperature, uniforms)
    assert torch.equal(accepted, ref_accepted) and torch.equal(out, ref_out)
