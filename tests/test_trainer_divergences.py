"""tempspec_trainer.divergences against direct float64 computations, tau = 0 semantics, -inf logits, bf16 input and
bad input."""
import math

import pytest
import torch

import trainer_fixtures as tf
from tempspec_trainer.divergences import (DIVERGENCES, expected_acceptance, forward_kl, get_divergence, jsd,
                                          reverse_kl, tvd)

N, V = 5, 7
TAUS = [0.0, 0.5, 1.0, 2.0]

_one_thread = pytest.fixture(scope="module", autouse=True)(tf.one_thread)


def logits_pair(seed=0, scale=2.0, n=N, v=V):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


# ------------------------------------------------------------------------------------ float64 reference
def ref_log_softmax(row, tau):
    """log softmax(row / tau) of a list of floats, in float64 Python arithmetic (-inf entries stay -inf)."""
    z = [x / tau for x in row]
    top = max(z)
    lse = top + math.log(sum(math.exp(x - top) for x in z))
    return [x - lse for x in z]


def ref_dists(d_row, t_row, tau):
    """(q, log q, p, log p) for one row: at tau 0, p is one-hot on the first argmax of the target and q is the draft's
    softmax at temperature 1."""
    if tau == 0.0:
        best = max(range(len(t_row)), key=lambda i: (t_row[i], -i))  # first index of the maximum
        log_p = [0.0 if i == best else -math.inf for i in range(len(t_row))]
        log_q = ref_log_softmax(d_row, 1.0)
    else:
        log_p, log_q = ref_log_softmax(t_row, tau), ref_log_softmax(d_row, tau)
    return [math.exp(x) for x in log_q], log_q, [math.exp(x) for x in log_p], log_p


def ref_kl(a, log_a, log_b):
    total = 0.0
    for ai, la, lb in zip(a, log_a, log_b):
        if ai > 0:
            total += ai * (la - lb)
    return total


def reference(name, draft, target, tau, beta=0.5):
    """Per-row values [N] float64 of divergence `name`, computed row by row and token by token."""
    out = []
    for d_row, t_row in zip(draft.double().tolist(), target.double().tolist()):
        q, log_q, p, log_p = ref_dists(d_row, t_row, tau)
        if name == "fkl":
            out.append(ref_kl(p, log_p, log_q))
        elif name == "rkl":
            out.append(ref_kl(q, log_q, log_p))
        elif name == "jsd":
            m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
            log_m = [math.log(mi) if mi > 0 else -math.inf for mi in m]
            out.append(beta * ref_kl(p, log_p, log_m) + (1 - beta) * ref_kl(q, log_q, log_m))
        elif name == "tvd":
            out.append(0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q)))
        elif name == "alpha":  # expected acceptance: sum min(p, q) (= 1 - TVD); at tau 0 argmax agreement
            if tau == 0.0:
                out.append(float(max(range(len(d_row)), key=lambda i: (d_row[i], -i)) == p.index(1.0)))
            else:
                out.append(sum(min(pi, qi) for pi, qi in zip(p, q)))
    return torch.tensor(out, dtype=torch.float64)


def call(name, draft, target, tau, beta=0.5):
    if name == "jsd":
        return jsd(draft, target, tau, beta=beta)
    if name == "alpha":
        return expected_acceptance(draft, target, tau)
    return {"fkl": forward_kl, "rkl": reverse_kl, "tvd": tvd}[name](draft, target, tau)


# ------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("name,beta", [("fkl", None), ("rkl", None), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.9),
                                       ("tvd", None), ("alpha", None)])
def test_matches_float64_reference(name, beta, tau):
    if name == "rkl" and tau == 0.0:
        pytest.skip("reverse KL is undefined at tau 0 (tested to raise below)")
    for seed in range(3):
        draft, target = logits_pair(seed)
        got = call(name, draft, target, tau, beta or 0.5)
        want = reference(name, draft, target, tau, beta or 0.5)
        assert got.shape == (N,) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_reference_values_differ_across_tau():
    """Guards the reference itself: the temperature must change the values (tau enters both softmaxes)."""
    draft, target = logits_pair(1)
    values = [forward_kl(draft, target, t) for t in TAUS]
    for a, b in zip(values, values[1:]):
        assert not torch.allclose(a, b, atol=1e-3)


def test_get_divergence_names():
    assert set(DIVERGENCES) == {"fkl", "rkl", "jsd", "tvd"}
    assert get_divergence("fkl") is forward_kl and get_divergence("rkl") is reverse_kl
    assert get_divergence("jsd") is jsd and get_divergence("tvd") is tvd


# ------------------------------------------------------------------------------------ tau = 0
def test_tau0_is_cross_entropy_of_target_greedy_token():
    """At tau 0, p is one-hot on the target's argmax and q is the draft at temperature 1: FKL = -log q(argmax),
    TVD = 1 - q(argmax), expected acceptance = [argmax agree]. Sharpening the target does not change anything."""
    draft, target = logits_pair(2)
    best = target.argmax(-1)
    log_q = torch.log_softmax(draft.double(), -1)
    q_best = log_q.exp().gather(-1, best[:, None])[:, 0]
    torch.testing.assert_close(forward_kl(draft, target, 0.0).double(), -log_q.gather(-1, best[:, None])[:, 0])
    torch.testing.assert_close(tvd(draft, target, 0.0).double(), 1.0 - q_best)
    assert torch.equal(expected_acceptance(draft, target, 0.0), (draft.argmax(-1) == best).float())
    for fn in (forward_kl, tvd, jsd):
        torch.testing.assert_close(fn(draft, target * 10.0, 0.0), fn(draft, target, 0.0))
    # the draft is not sharpened at tau 0: scaling it changes the loss
    assert not torch.allclose(forward_kl(draft * 3.0, target, 0.0), forward_kl(draft, target, 0.0))


def test_tau0_ties_pick_first_argmax():
    draft = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    target = torch.tensor([[1.0, 3.0, 3.0, 0.0]])  # tokens 1 and 2 tie: p is one-hot on 1
    want = -torch.log_softmax(draft, -1)[0, 1]
    torch.testing.assert_close(forward_kl(draft, target, 0.0)[0], want)
    assert expected_acceptance(draft, target, 0.0).item() == 0.0  # the draft's argmax is 2


def test_reverse_kl_at_tau0_raises():
    draft, target = logits_pair()
    with pytest.raises(ValueError, match="tau = 0"):
        reverse_kl(draft, target, 0.0)


# ------------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_identical_logits(tau):
    _, target = logits_pair(3)
    for fn in (forward_kl, reverse_kl, jsd, tvd):
        torch.testing.assert_close(fn(target.clone(), target, tau), torch.zeros(N), atol=1e-6, rtol=0)
    torch.testing.assert_close(expected_acceptance(target.clone(), target, tau), torch.ones(N))
    assert torch.equal(expected_acceptance(target.clone(), target, 0.0), torch.ones(N))


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("scale", [0.1, 2.0, 50.0])
def test_bounds_and_acceptance_identity(tau, scale):
    draft, target = logits_pair(4, scale=scale, n=16)
    d = tvd(draft, target, tau)
    assert bool(((d >= 0) & (d <= 1)).all())
    torch.testing.assert_close(expected_acceptance(draft, target, tau), 1.0 - d)
    for fn in (forward_kl, reverse_kl):
        assert bool((fn(draft, target, tau) >= -1e-6).all())
    for beta in (0.2, 0.5):  # 0 <= JSD(beta) <= H(beta), the entropy of the mixing weights
        h = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        j = jsd(draft, target, tau, beta=beta)
        assert bool(((j >= -1e-6) & (j <= h + 1e-5)).all())
    if scale == 50.0:  # nearly one-hot, disjoint: TVD near (but not above) 1
        assert float(d.max()) > 0.9


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd", "alpha"])
def test_bf16_logits_reduce_in_fp32(name, tau):
    """bf16 input gives fp32 output equal to the fp32 computation on the same (bf16-rounded) values, and close to
    the computation on the unrounded fp32 logits."""
    if name == "rkl" and tau == 0.0:
        pytest.skip("undefined at tau 0")
    draft, target = logits_pair(5, n=32, v=50)
    d16, t16 = draft.bfloat16(), target.bfloat16()
    got = call(name, d16, t16, tau)
    assert got.dtype == torch.float32
    assert torch.equal(got, call(name, d16.float(), t16.float(), tau))
    if name != "alpha":  # argmax agreement may flip on rounding; the smooth values stay close
        torch.testing.assert_close(got, call(name, draft, target, tau), atol=0.05, rtol=0.05)


# ------------------------------------------------------------------------------------ -inf logits
def masked_pair(seed=6):
    draft, target = logits_pair(seed)
    target[:, 2] = float("-inf")
    target[0, 4] = float("-inf")
    return draft, target


@pytest.mark.parametrize("tau", TAUS)
def test_masked_target_tokens(tau):
    """Tokens the target excludes (-inf) contribute nothing to p: FKL, JSD, TVD stay finite and match the
    reference; reverse KL is +inf (q puts mass where p has none), as it should be."""
    draft, target = masked_pair()
    for name in ("fkl", "jsd", "tvd", "alpha"):
        got = call(name, draft, target, tau)
        assert bool(torch.isfinite(got).all()), name
        torch.testing.assert_close(got.double(), reference(name, draft, target, tau), rtol=1e-5, atol=1e-6)
    if tau > 0:
        assert bool(torch.isinf(reverse_kl(draft, target, tau)).all())


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
def test_token_masked_in_both_is_ignored(name, tau):
    """A token that both models exclude changes no value: same result as on the vocabulary without it."""
    draft, target = logits_pair(7)
    draft[:, 3] = target[:, 3] = float("-inf")
    keep = [i for i in range(V) if i != 3]
    got = call(name, draft, target, tau)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, call(name, draft[:, keep], target[:, keep], tau), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", TAUS)
def test_forward_kl_gradient_with_masked_target(tau):
    """Backprop through forward KL with -inf target logits: finite gradient, equal to (q - p) / tau (q - p at
    tau 0, where the draft is at temperature 1)."""
    draft, target = masked_pair()
    draft.requires_grad_(True)
    forward_kl(draft, target, tau).sum().backward()
    assert bool(torch.isfinite(draft.grad).all())
    scale = 1.0 if tau == 0.0 else tau
    q = torch.softmax(draft.detach() / scale, -1)
    if tau == 0.0:
        p = torch.nn.functional.one_hot(target.argmax(-1), V).float()
    else:
        p = torch.softmax(target / tau, -1)
    torch.testing.assert_close(draft.grad, (q - p) / scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fkl", "rkl", "tvd"])
def test_gradients_finite_with_token_masked_in_both(name):
    draft, target = logits_pair(8)
    draft[:, 1] = target[:, 1] = float("-inf")
    draft.requires_grad_(True)
    call(name, draft, target, 1.0).sum().backward()
    assert bool(torch.isfinite(draft.grad).all())
    assert bool((draft.grad[:, 1] == 0).all())


def test_jsd_gradient_finite_with_token_masked_in_both():
    draft, target = logits_pair(8)
    draft[:, 1] = target[:, 1] = float("-inf")
    draft.requires_grad_(True)
    jsd(draft, target, 1.0).sum().backward()
    assert bool(torch.isfinite(draft.grad).all())


def test_jsd_gradient_finite_with_masked_target_only():
    draft, target = masked_pair()
    draft.requires_grad_(True)
    jsd(draft, target, 1.0, beta=0.3).sum().backward()
    assert bool(torch.isfinite(draft.grad).all())


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("tau", [0.5, 1.0])
@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd", "alpha"])
def test_shape_mismatch_raises(name, tau):
    draft, target = logits_pair()
    for d, t in ((draft, target[:, :-1]), (draft[:1], target), (draft[None], target)):
        with pytest.raises(ValueError, match="same shape"):
            call(name, d, t, tau)


@pytest.mark.parametrize("name", ["fkl", "jsd", "tvd"])
def test_shape_mismatch_raises_at_tau0(name):
    draft, target = logits_pair()
    with pytest.raises(ValueError, match="same shape"):
        call(name, draft, target[:, :-1], 0.0)


def test_expected_acceptance_shape_mismatch_raises_at_tau0():
    draft, target = logits_pair()
    with pytest.raises(ValueError, match="same shape"):
        expected_acceptance(draft[:1], target, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        expected_acceptance(draft, torch.cat([target, target[:, :1]], dim=1), 0.0)


@pytest.mark.parametrize("tau", [-0.5, -1e-9, float("nan")])
@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd", "alpha"])
def test_bad_tau_raises(name, tau):
    draft, target = logits_pair()
    with pytest.raises(ValueError, match="tau"):
        call(name, draft, target, tau)


@pytest.mark.parametrize("bad", ["kl", "FKL", "", "js"])
def test_unknown_divergence_raises(bad):
    with pytest.raises(ValueError, match="unknown divergence"):
        get_divergence(bad)


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5])
def test_jsd_beta_outside_unit_interval_raises(beta):
    draft, target = logits_pair()
    with pytest.raises(ValueError, match="beta"):
        jsd(draft, target, 1.0, beta=beta)
