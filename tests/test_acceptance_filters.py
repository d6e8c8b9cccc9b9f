"""Top-k / top-p / min-p filters and lenient (lossy) acceptance (semantics: tempspec_engine/reference.py).

- The keep rule itself on hand-derived rows (ties at each boundary, HF order: top-p measured after top-k).
- Every backend with filter-capable ops equals the reference token for token given the uniforms, for each filter
  alone and combined, per-row mixes (rows with no filter, greedy rows) and lenience; backends without them refuse.
- Statistics (chi-square at significance 1e-3, fixed seeds): the first emitted token is distributed as F(p) when the
  draft tokens are drawn from F(q); with lenience eps it follows `lenient_emitted_distribution`; `sample` follows
  F(softmax). Power checks show the test rejects the unfiltered target and the lossless distribution.
- Argument validation and normalization (numpy / torch scalars, off values, the fast path).
"""
import os

import numpy as np
import pytest
import torch
from conftest import BACKEND_CASES, make_case
from test_acceptance_lossless import ALPHA, chi_square_pvalue

from tempspec_engine import BackendUnavailableError, sample, speculative_sample
from tempspec_engine.backends import resolve_backend
from tempspec_engine.reference import (
    filtered_weights,
    lenient_emitted_distribution,
    reference_sample,
    reference_speculative_sample,
)

FILTER_CASES = [(d, b) for d, b in BACKEND_CASES if resolve_backend(b, torch.device(d)).supports_filters]


def filter_backend_params():
    """pytest params (device, backend) for every runnable backend that supports filters and lenience."""
    return pytest.mark.parametrize("device,backend", FILTER_CASES, ids=[f"{d}-{b}" for d, b in FILTER_CASES])


def skip_if_interpreted(device, backend):
    """The Triton interpreter runs each program in Python (phase 0's threshold search is dozens of passes per row):
    the statistical tests (thousands of rows) are left to compiled backends; the exactness tests cover it."""
    if backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("too slow in the Triton interpreter (covered by the comparisons with the reference)")


def _row(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def _keep(logits, top_k=0, top_p=1.0, min_p=0.0, t=1.0):
    """Indices the reference keeps in one logit row."""
    w = filtered_weights(_row(logits), torch.tensor(t), torch.tensor(top_k), torch.tensor(top_p), torch.tensor(min_p))
    return torch.nonzero(w > 0).flatten().tolist()


# ---------------------------------------------------------------------------------------------------------------
# The keep rule, by hand.

LN2 = float(np.log(2.0))


def test_top_k_keeps_every_token_tied_with_the_kth_logit():
    logits = [3.0, 1.0, 2.0, 2.0, 0.0, -1.0]
    assert _keep(logits, top_k=1) == [0]
    assert _keep(logits, top_k=2) == [0, 2, 3]  # the 2nd largest logit (2.0) is tied: both kept
    assert _keep(logits, top_k=4) == [0, 1, 2, 3]
    assert _keep(logits, top_k=6) == _keep(logits, top_k=100) == _keep(logits) == list(range(6))


def test_top_p_keeps_the_smallest_head_reaching_top_p_and_its_ties():
    # weights exp(-n ln2) are exactly 1, 1/2, 1/4 in fp32. Row A: probabilities .5, .25, .25 (total 2).
    row_a = [0.0, -LN2, -LN2]
    assert _keep(row_a, top_p=0.5) == [0]  # the mass of {0} is exactly 0.5 * total: enough
    assert _keep(row_a, top_p=0.5000001) == [0, 1, 2]  # the tie at .25 is kept whole
    # Row B: probabilities .4, .2, .2, .1, .1 (total 2.5)
    row_b = [0.0, -LN2, -LN2, -2 * LN2, -2 * LN2]
    assert _keep(row_b, top_p=0.39) == [0]
    assert _keep(row_b, top_p=0.41) == [0, 1, 2]
    assert _keep(row_b, top_p=0.79) == [0, 1, 2]
    assert _keep(row_b, top_p=0.81) == [0, 1, 2, 3, 4]


def test_top_p_is_measured_after_top_k():
    # probabilities .4, .2, .2, .1, .1; after top_k=1 only token 0 remains (mass 1), so any top_p keeps it alone;
    # after top_k=3: .5, .25, .25, so top_p=0.5 keeps token 0 only (it would need 0.4 + 0.2 + 0.2 without top-k).
    logits = [0.0, -LN2, -LN2, -2 * LN2, -2 * LN2]
    assert _keep(logits, top_k=1, top_p=0.99) == [0]
    assert _keep(logits, top_k=3, top_p=0.5) == [0]
    assert _keep(logits, top_p=0.5) == [0, 1, 2]


def test_min_p_is_relative_to_the_max_probability():
    logits = [0.0, -LN2, -LN2, -2 * LN2, -2 * LN2]  # prob / max prob: 1, .5, .5, .25, .25
    assert _keep(logits, min_p=0.5) == [0, 1, 2]  # ratio exactly 0.5 is kept
    assert _keep(logits, min_p=0.51) == [0]
    assert _keep(logits, min_p=0.25, top_k=2) == [0, 1, 2]  # intersection with top-k (ties kept)
    # temperature first: at T = 2 the ratios are sqrt'ed (.71, .5), so min_p=0.6 keeps tokens 0..2
    assert _keep(logits, min_p=0.6, t=2.0) == [0, 1, 2]


def test_filters_off_leave_the_weights_bit_identical():
    logits = torch.randn(3, 4, 97, generator=torch.Generator().manual_seed(0)) * 3
    t = torch.full((3, 4), 0.7)
    off = filtered_weights(logits, t, torch.zeros(3, 4, dtype=torch.int64), torch.ones(3, 4), torch.zeros(3, 4))
    assert torch.equal(off, torch.exp((logits - logits.amax(-1, keepdim=True)) / 0.7))


def test_lenient_emitted_distribution_formula():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.1, 0.4, 0.4])
    torch.testing.assert_close(lenient_emitted_distribution(p, q, 1.0), p.double())
    dist = lenient_emitted_distribution(p, q, 0.5)
    # accepted mass min(q, 2p) = .1, .1, .4, 0 (0.6); residual max(0, p - q/2) = .45, .25, 0, 0 -> .643, .357
    expected = torch.tensor([0.1, 0.1, 0.4, 0.0], dtype=torch.float64) + 0.4 * torch.tensor([0.45, 0.25, 0, 0]) / 0.7
    torch.testing.assert_close(dist, expected)
    assert abs(float(dist.sum()) - 1.0) < 1e-12
    # rows: each row is its own distribution (a row whose residual is all zero falls back to its p)
    rows = lenient_emitted_distribution(torch.stack([p, q, p]), torch.stack([q, q, p]), 0.5)
    for row, (pp, qq) in zip(rows, ((p, q), (q, q), (p, p))):
        torch.testing.assert_close(row, lenient_emitted_distribution(pp, qq, 0.5))
    torch.testing.assert_close(rows[1], q.double())  # p = q: all accepted


# ---------------------------------------------------------------------------------------------------------------
# Every backend equals the reference given the uniforms.

B = 6
FILTER_CONFIGS = {
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.05),
    "combined": dict(top_k=40, top_p=0.9, min_p=0.02),
    "per_row_mix": dict(top_k=torch.tensor([0, 3, 0, 50, 0, 1]), top_p=torch.tensor([1.0, 1.0, 0.7, 0.95, 1.0, 0.5]),
                        min_p=torch.tensor([0.0, 0.0, 0.0, 0.01, 0.1, 0.0])),
    "lenience": dict(lenience=torch.tensor([1.0, 0.3, 0.7, 0.5, 0.9, 0.1])),
    "lenience_and_filters": dict(top_k=torch.tensor([0, 3, 0, 50, 0, 1]), top_p=0.9,
                                 lenience=torch.tensor([1.0, 0.3, 0.7, 0.5, 0.9, 0.1])),
}
# Rows 0 and 5 are greedy, row 4 nearly so.
TEMPS = torch.tensor([0.0, 0.7, 1.0, 1.5, 1e-4, 0.0])


def _as_rows(config, device):
    """Settings as [B] tensors on `device` (numbers broadcast), for the reference and the call."""
    full = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "lenience": 1.0}
    full.update(config)
    out = {}
    for name, value in full.items():
        dtype = torch.int64 if name == "top_k" else torch.float32
        out[name] = value.to(device) if isinstance(value, torch.Tensor) else torch.full((B,), value, dtype=dtype,
                                                                                          device=device)
    return out


def _check_against_reference(device, backend, config, k, V, relation, dtype=torch.float32, seed=0):
    draft, target, tokens, temperature, uniforms = make_case(B, k, V, relation=relation, dtype=dtype, device=device,
                                                             seed=seed, temperature=TEMPS)
    out = speculative_sample(draft, target, tokens, temperature, uniforms=uniforms, backend=backend,
                             **{n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in config.items()})
    rows = {n: v.cpu() for n, v in _as_rows(config, "cpu").items()}
    ref_accepted, ref_tokens = reference_speculative_sample(draft.cpu(), target.cpu(), tokens.cpu(), temperature.cpu(),
                                                            uniforms.cpu(), **rows)
    assert out.accepted.device == draft.device
    torch.testing.assert_close(out.accepted.cpu(), ref_accepted, rtol=0, atol=0)
    torch.testing.assert_close(out.tokens.cpu(), ref_tokens, rtol=0, atol=0)
    return ref_accepted, ref_tokens


@filter_backend_params()
@pytest.mark.parametrize("config", list(FILTER_CONFIGS), ids=list(FILTER_CONFIGS))
@pytest.mark.parametrize("k,V,relation", [(3, 300, "close"), (2, 5003, "random"), (4, 64, "equal")])
def test_filtered_speculative_sample_matches_reference(device, backend, config, k, V, relation):
    _check_against_reference(device, backend, FILTER_CONFIGS[config], k, V, relation, seed=V + k)


@filter_backend_params()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_filtered_low_precision_logits_match_reference(device, backend, dtype):
    """bf16 logits produce many exact ties: the tie rules are exercised at every boundary."""
    _check_against_reference(device, backend, FILTER_CONFIGS["lenience_and_filters"], 3, 777, "close", dtype, seed=3)
    _check_against_reference(device, backend, FILTER_CONFIGS["per_row_mix"], 3, 777, "close", dtype, seed=4)


@pytest.mark.parametrize("name,relation", [("top_k", "random"), ("top_p", "close"), ("min_p", "random"),
                                           ("combined", "random"), ("lenience", "random")])
def test_reference_filters_change_the_outcome(name, relation):
    """Guards the comparisons above against vacuity: on such inputs each setting changes the emitted tokens."""
    filtered = _check_against_reference("cpu", "torch", FILTER_CONFIGS[name], 3, 300, relation, seed=303)
    plain = _check_against_reference("cpu", "torch", {}, 3, 300, relation, seed=303)
    assert not torch.equal(filtered[1], plain[1])


@filter_backend_params()
@pytest.mark.parametrize("V", [7, 5003])
def test_filtered_sample_matches_reference(device, backend, V):
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(B, V, generator=g) * 3).to(device)
    uniforms = torch.rand(B, generator=g).to(device)
    rows = _as_rows(FILTER_CONFIGS["per_row_mix"], device)
    out = sample(logits, TEMPS.to(device), uniforms=uniforms, backend=backend, top_k=rows["top_k"],
                 top_p=rows["top_p"], min_p=rows["min_p"])
    ref = reference_sample(logits.cpu(), TEMPS, uniforms.cpu(), rows["top_k"].cpu(), rows["top_p"].cpu(),
                           rows["min_p"].cpu())
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


@filter_backend_params()
def test_filter_kernel_with_everything_off_equals_the_plain_kernel(device, backend):
    """validate=False passes all-off tensors to the filter-capable op: it must agree bit for bit with the
    temperature-only op, including lenience = 1 (lossless)."""
    draft, target, tokens, temperature, uniforms = make_case(B, 3, 1000, relation="close", device=device, seed=8,
                                                             temperature=TEMPS)
    plain = speculative_sample(draft, target, tokens, temperature, uniforms=uniforms, backend=backend)
    rows = _as_rows({}, device)
    off = speculative_sample(draft, target, tokens, temperature, uniforms=uniforms, backend=backend, validate=False,
                             **rows)
    assert torch.equal(plain.tokens, off.tokens) and torch.equal(plain.accepted, off.accepted)
    plain_sample = sample(target[:, 0], temperature, uniforms=uniforms[:, 0], backend=backend)
    off_sample = sample(target[:, 0], temperature, uniforms=uniforms[:, 0], backend=backend, validate=False,
                        top_k=rows["top_k"], top_p=rows["top_p"], min_p=rows["min_p"])
    assert torch.equal(plain_sample, off_sample)


@filter_backend_params()
def test_lenience_one_is_bit_identical_to_lossless(device, backend):
    draft, target, tokens, temperature, uniforms = make_case(B, 4, 300, relation="random", device=device, seed=9,
                                                             temperature=TEMPS)
    filters = dict(top_k=torch.tensor([0, 3, 0, 50, 0, 1], device=device), top_p=0.9)
    lossless = speculative_sample(draft, target, tokens, temperature, uniforms=uniforms, backend=backend, **filters)
    eps_one = speculative_sample(draft, target, tokens, temperature, uniforms=uniforms, backend=backend,
                                 validate=False, lenience=torch.ones(B, device=device), **filters)
    assert torch.equal(lossless.tokens, eps_one.tokens) and torch.equal(lossless.accepted, eps_one.accepted)


@pytest.fixture
def torch_without_filters(monkeypatch):
    """The torch backend as a backend without filter-capable ops would be (e.g. an extension built before them)."""
    import tempspec_engine.backends as backends

    real = backends._load

    def load(name, device):
        backend, why = real(name, device)
        if name == "torch":
            backend = backends.Backend("torch", backend.speculative_sample, backend.sample)
        return backend, why

    monkeypatch.setattr(backends, "_load", load)


def test_backends_without_filters_refuse_them(torch_without_filters):
    draft, target, tokens, temperature, uniforms = make_case(2, 2, 20)
    with pytest.raises(BackendUnavailableError, match="top_k"):
        speculative_sample(draft, target, tokens, temperature, uniforms=uniforms, backend="torch", top_p=0.9)
    with pytest.raises(BackendUnavailableError, match="lenience"):
        speculative_sample(draft, target, tokens, temperature, uniforms=uniforms, backend="torch", lenience=0.5)
    with pytest.raises(BackendUnavailableError, match="top_k"):
        sample(target[:, 0], 1.0, uniforms=uniforms[:, 0], backend="torch", top_k=3)
    # off values take the temperature-only path, which every backend has
    speculative_sample(draft, target, tokens, temperature, uniforms=uniforms, backend="torch", top_k=0, top_p=1.0,
                       min_p=0.0, lenience=1.0)


def test_auto_routes_filtered_calls_to_a_capable_backend():
    for device in {d for d, _ in BACKEND_CASES}:
        assert resolve_backend("auto", torch.device(device), filtered=True).supports_filters


# ---------------------------------------------------------------------------------------------------------------
# Statistics.

V_STAT = 8
K_STAT = 2
N_STAT = 6000
STAT_FILTERS = {"top_k": dict(top_k=3), "top_p": dict(top_p=0.8), "min_p": dict(min_p=0.15),
                "combined": dict(top_k=5, top_p=0.9, min_p=0.05)}


def _stat_pair(seed=0):
    """Target [K+1, V] and a draft [K, V] far enough from it that many tokens are rejected."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(K_STAT + 1, V_STAT, generator=g) * 1.5
    draft = 0.5 * target[:K_STAT] + 1.2 * torch.randn(K_STAT, V_STAT, generator=g)
    return draft, target


def _filtered_probs(logits, t, top_k=0, top_p=1.0, min_p=0.0):
    """F(softmax(logits / t)) of one row [V], float64."""
    w = filtered_weights(logits, torch.tensor(t), torch.tensor(top_k), torch.tensor(top_p), torch.tensor(min_p))
    return (w / w.sum()).double()


def _draft_tokens(draft, t, n, filters, seed):
    """[n, K] draft tokens drawn (torch.multinomial) from the filtered draft distribution of each position."""
    g = torch.Generator().manual_seed(seed)
    cols = [torch.multinomial(_filtered_probs(draft[i], t, **filters), n, replacement=True, generator=g)
            for i in range(draft.shape[0])]
    return torch.stack(cols, dim=1)


def _pvalue_on_support(samples, probs):
    """Chi-square p-value of samples [n] against probs [V], after checking that no sample has probability 0 (the
    zero bins are then left out, as the pooled bin of chi_square_pvalue cannot hold an expected count of 0)."""
    assert bool((probs[samples] > 0).all()), "a token of probability 0 (removed by the filters) was emitted"
    support = torch.nonzero(probs > 0).flatten()
    index = torch.full((probs.numel(),), -1, dtype=torch.int64)
    index[support] = torch.arange(support.numel())
    return chi_square_pvalue(index[samples], probs[support])


def _first_tokens(device, backend, t, filters, lenience=None, seed=0):
    draft, target = _stat_pair(seed)
    tokens = _draft_tokens(draft, t, N_STAT, filters, seed=42)
    gen = torch.Generator(device=device).manual_seed(7)
    out = speculative_sample(draft.expand(N_STAT, K_STAT, V_STAT).contiguous().to(device),
                             target.expand(N_STAT, K_STAT + 1, V_STAT).contiguous().to(device), tokens.to(device), t,
                             generator=gen, backend=backend, lenience=lenience, **filters)
    return out.tokens[:, 0].cpu(), draft, target


@filter_backend_params()
@pytest.mark.parametrize("name", list(STAT_FILTERS))
@pytest.mark.parametrize("t", [0.3, 1.0, 2.0])
def test_first_token_is_distributed_as_filtered_target(device, backend, name, t):
    skip_if_interpreted(device, backend)
    filters = STAT_FILTERS[name]
    first, _, target = _first_tokens(device, backend, t, filters)
    pvalue = _pvalue_on_support(first, _filtered_probs(target[0], t, **filters))
    assert pvalue > ALPHA, f"first-token distribution differs from F(p) (chi-square p = {pvalue:.2e})"


@pytest.mark.parametrize("name", list(STAT_FILTERS))
def test_chi_square_detects_the_unfiltered_target(name):
    """Power check: samples of F(p) are rejected against the unfiltered p at this sample size."""
    _, target = _stat_pair()
    probs = _filtered_probs(target[0], 1.0, **STAT_FILTERS[name])
    samples = torch.multinomial(probs, N_STAT, replacement=True, generator=torch.Generator().manual_seed(1))
    assert chi_square_pvalue(samples, _filtered_probs(target[0], 1.0)) < 1e-6


@filter_backend_params()
@pytest.mark.parametrize("eps", [0.3, 0.7])
@pytest.mark.parametrize("filters", [{}, {"top_k": 5}], ids=["no_filter", "top_k"])
def test_lenient_first_token_follows_the_formula(device, backend, eps, filters):
    skip_if_interpreted(device, backend)
    t = 1.0
    first, draft, target = _first_tokens(device, backend, t, filters, lenience=eps)
    p = _filtered_probs(target[0], t, **filters)
    q = _filtered_probs(draft[0], t, **filters)
    expected = lenient_emitted_distribution(p, q, eps)
    pvalue = _pvalue_on_support(first, expected)
    assert pvalue > ALPHA, f"lenient first-token distribution differs from the formula (chi-square p = {pvalue:.2e})"
    # power: the lossy distribution is measurably not the target's at this sample size
    assert _pvalue_on_support(first, p) < 1e-6


@filter_backend_params()
@pytest.mark.parametrize("name", list(STAT_FILTERS))
@pytest.mark.parametrize("t", [0.3, 1.0, 2.0])
def test_sampler_is_distributed_as_filtered_softmax(device, backend, name, t):
    skip_if_interpreted(device, backend)
    logits = torch.randn(V_STAT, generator=torch.Generator().manual_seed(5)) * 2
    gen = torch.Generator(device=device).manual_seed(9)
    drawn = sample(logits.expand(N_STAT, V_STAT).contiguous().to(device), t, generator=gen, backend=backend,
                   **STAT_FILTERS[name]).cpu()
    pvalue = _pvalue_on_support(drawn, _filtered_probs(logits, t, **STAT_FILTERS[name]))
    assert pvalue > ALPHA, f"sampler distribution differs from F(softmax) (chi-square p = {pvalue:.2e})"


# ---------------------------------------------------------------------------------------------------------------
# Validation and normalization.

@pytest.fixture
def case():
    return make_case(2, 3, 20, seed=0)


def _call(case, **overrides):
    draft, target, tokens, temperature, uniforms = case
    args = dict(draft_logits=draft, target_logits=target, draft_tokens=tokens, temperature=temperature,
                uniforms=uniforms)
    args.update(overrides)
    return speculative_sample(**args)


@pytest.mark.parametrize("overrides,match", [
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_p": 1e-50}, "top_p"),  # 0 in fp32
    ({"top_p": torch.tensor([0.5, 0.0])}, "top_p"),
    ({"top_p": torch.tensor([0.5, float("nan")])}, "top_p"),
    ({"top_p": torch.tensor([0.5, 0.5, 0.5])}, "top_p"),
    ({"top_p": "high"}, "top_p"),
    ({"top_p": 0.5 + 0j}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": 3.0}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_k": np.bool_(True)}, "top_k"),
    ({"top_k": torch.tensor([1.0, 2.0])}, "top_k"),
    ({"top_k": torch.tensor([True, False])}, "top_k"),
    ({"top_k": torch.tensor([1, -2])}, "top_k"),
    ({"top_k": torch.ones(2, 1, dtype=torch.int64)}, "top_k"),
    ({"min_p": 1.0}, "min_p"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": float("nan")}, "min_p"),
    ({"min_p": torch.tensor([0.1, 1.0])}, "min_p"),
    ({"min_p": False}, "min_p"),
    ({"lenience": 0.0}, "lenience"),
    ({"lenience": 1.01}, "lenience"),
    ({"lenience": float("nan")}, "lenience"),
    ({"lenience": torch.tensor([0.5, 0.0])}, "lenience"),
    ({"lenience": torch.tensor([0.5, 0.5], dtype=torch.complex64)}, "lenience"),
    ({"temperature": True}, "temperature"),
    ({"temperature": 1 + 1j}, "temperature"),
    ({"temperature": np.complex64(1)}, "temperature"),
])
def test_bad_filter_arguments_raise_value_error_naming_them(case, overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(case, **overrides)


def test_sample_validates_its_filters():
    logits = torch.randn(3, 10)
    for kwargs, match in [({"top_k": -3}, "top_k"), ({"top_p": 2.0}, "top_p"), ({"min_p": torch.ones(3)}, "min_p")]:
        with pytest.raises(ValueError, match=match):
            sample(logits, 1.0, **kwargs)
    with pytest.raises(TypeError):
        sample(logits, 1.0, lenience=0.5)  # lenience only concerns the acceptance test


@pytest.mark.parametrize("scalar", [np.float32(0.7), np.float64(0.7), torch.tensor(0.7), 0.7])
def test_numpy_and_torch_scalars_are_accepted(case, scalar):
    reference = _call(case, temperature=0.7, top_p=0.7, min_p=0.01, top_k=4)
    out = _call(case, temperature=scalar, top_p=scalar, min_p=np.float32(0.01), top_k=np.int64(4))
    assert torch.equal(out.tokens, reference.tokens)
    out = _call(case, temperature=scalar, top_p=scalar, min_p=0.01, top_k=torch.tensor(4))
    assert torch.equal(out.tokens, reference.tokens)


def test_off_values_take_the_temperature_only_path(case, monkeypatch):
    """Numbers at their off value (and all-off tensors when validated) never reach the filter-capable ops."""
    import tempspec_engine.ops as ops

    chosen = []
    real = ops.resolve_backend

    def spy(name, device, filtered=False):
        chosen.append(filtered)
        return real(name, device, filtered)

    monkeypatch.setattr(ops, "resolve_backend", spy)
    _call(case, top_k=0, top_p=1.0, min_p=0.0, lenience=1.0)
    _call(case, top_k=torch.zeros(2, dtype=torch.int64), top_p=torch.ones(2), lenience=np.float32(1.0))
    _call(case, top_k=10**30)  # any top_k >= V keeps every token
    assert chosen == [False, False, True]
    _call(case, top_p=torch.ones(2), validate=False)  # tensors are not read without validation
    assert chosen[-1] is True
