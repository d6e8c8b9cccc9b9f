"""Adaptive lookahead: expected tokens per step, per-position acceptance estimates, and the choice of k."""
import random

import pytest

from tempspec_engine.adaptive_k import AdaptiveK, expected_tokens


def test_expected_tokens():
    assert expected_tokens(0.5, 3) == pytest.approx((1 - 0.5 ** 4) / (1 - 0.5))  # Leviathan et al.
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0
    assert expected_tokens([0.5, 1.0, 1.0], 3) == pytest.approx(1 + 0.5 * 3)  # a copied span: all or nothing
    assert expected_tokens([0.5, 1.0, 1.0], 1) == pytest.approx(1.5)


def simulate(chance_first: float, chance_next: float, draft_s: float, verify_s, steps=400, seed=0) -> AdaptiveK:
    """Runs AdaptiveK on a synthetic draft: draft 1 accepted with chance_first, each later one (after accepted
    ones) with chance_next; verify_s(k) seconds per verification."""
    est, rng = AdaptiveK(k_max=8), random.Random(seed)
    for _ in range(steps):
        k = est.choose([0.0])
        a = 0
        while a < k and rng.random() < (chance_first if a == 0 else chance_next):
            a += 1
        est.update(k, [0.0], [a], draft_s * k, verify_s(k))
    return est


def test_per_position_estimates_and_choice():
    # n-gram lookup: a coin flip for the first token, then the copied span holds; drafting is free and
    # verification nearly flat in k: the longest lookahead pays
    lookup = simulate(0.5, 0.95, 1e-5, lambda k: 0.05 * (1 + 0.01 * k))
    alphas = lookup.acceptance(0.0)
    assert abs(alphas[0] - 0.5) < 0.1 and min(alphas[1:4]) > 0.85
    assert lookup.choose([0.0]) >= 6
    # a model draft with i.i.d. acceptance 0.3 and a draft step costing 20% of a verification: short lookahead
    model = simulate(0.3, 0.3, 0.01, lambda k: 0.05 * (1 + 0.02 * k))
    assert abs(model.acceptance(0.0)[0] - 0.3) < 0.1
    assert model.choose([0.0]) <= 2
    # unmeasured temperatures fall back to the prior; the first steps use initial_k
    assert model.acceptance(1.0) == pytest.approx([0.6] * 8)
    assert AdaptiveK(initial_k=3).choose([0.0]) == 3


def test_confidence_calibration_starts_at_the_confidence_and_learns():
    est = AdaptiveK(k_max=4)
    assert est.confident_acceptance(0.0, 0.95) == pytest.approx(0.95)  # the prior: a draft's confidence
    for _ in range(200):  # confident drafts that are always rejected
        est.update(2, [0.0], [0], 0.01, 0.05, confidences=[[0.95, 0.97]])
    assert est.confident_acceptance(0.0, 0.95) < 0.02
    assert est.calibration[0.0][9] == [0.0, 200.0]  # only the reached draft counts
    assert est.confident_acceptance(0.0, 0.55) == pytest.approx(0.55)  # other bins and temperatures: the prior
    assert est.confident_acceptance(1.0, 0.95) == pytest.approx(0.95)
    for _ in range(50):  # accepted drafts of confidence 0.3 (bin 3); a row without confidences changes nothing
        est.update(1, [0.0, 0.0], [1, 0], 0.01, 0.05, confidences=[[0.3], None])
    assert est.calibration[0.0][3] == [50.0, 50.0] and est.confident_acceptance(0.0, 0.35) > 0.95


def test_draft_chain_drafts_while_one_more_token_pays():
    """With a draft forward costing 7% of a verification (the shipped feature head's share), confident drafts
    continue, a 5% one ends the chain; a costly draft stops at once; k_max always ends it."""
    cheap = AdaptiveK(k_max=6, fixed_costs=(0.07, 1.0))
    chain = cheap.chain([0.0])
    assert chain.extend([0.99]) and chain.extend([0.99]) and not chain.extend([0.05])
    assert chain.k == 3 and chain.confidences == [[0.99, 0.99, 0.05]]
    chain = cheap.chain([0.0])
    assert [chain.extend([1.0]) for _ in range(6)] == [True] * 5 + [False]
    assert not AdaptiveK(k_max=6, fixed_costs=(1.0, 1.0)).chain([0.0]).extend([0.9])
    # a batch continues while its rows together gain: two confident rows carry two unsure ones at this cost
    chain = cheap.chain([0.0] * 4)
    assert chain.extend([0.99, 0.99, 0.3, 0.3]) and not cheap.chain([0.0] * 4).extend([0.2, 0.2, 0.2, 0.2])
    # the wider the batch, the dearer one more verified position: a draft of confidence 0.6 continues alone, not in
    # a batch of 8 such rows
    assert cheap.chain([0.0]).extend([0.6]) and not cheap.chain([0.0] * 8).extend([0.6] * 8)
    # unmeasured costs (no timings yet): the first steps draft initial_k tokens, as choose() does
    chain = AdaptiveK(k_max=8, initial_k=3).chain([0.0])
    assert [chain.extend([0.5]) for _ in range(3)] == [True, True, False]


def test_the_cost_model_prices_every_verified_token_of_the_batch():
    """With fixed costs a forward over n tokens (all rows) costs 1 + slope (n - 1) times one: one row verifying k+1
    tokens costs 1 + 0.05 k, 4 rows verifying 2 each 1.35; so the same acceptance picks a shorter lookahead for a
    batch of 8 rows than for one."""
    est = AdaptiveK(k_max=8, fixed_costs=(0.07, 1.0))
    assert est.verify_cost(4) == pytest.approx(1.2) and est.verify_cost(1, rows=4) == pytest.approx(1.35)
    assert est.step_cost(2, rows=4) == pytest.approx(2 * 0.07 * 1.15 + 1 + 0.05 * 11)
    assert est.choose([0.0]) == 3 and est.choose([0.0] * 8) == 1  # (the prior acceptance, 0.6)
    measured = AdaptiveK(k_max=8)  # measured timings are those of the batch running: rows change nothing
    measured.update(2, [0.0], [1], 0.02, 0.1)
    assert measured.step_cost(2, rows=8) == measured.step_cost(2) == pytest.approx(0.02 + 0.1)


def test_no_draft_where_none_pays_and_a_draft_every_explore_every_steps():
    """With k_min = 0 choose() answers 0 where the target alone is faster than any lookahead (a weak draft in a wide
    batch at a steep slope), but after explore_every such answers in a row it answers the best k >= 1 once, so that
    the acceptance estimates keep learning; one row of the same draft drafts."""
    est = AdaptiveK(k_min=0, k_max=4, prior_alpha=0.3, fixed_costs=(0.066, 1.0), verify_slope_prior=0.12,
                    explore_every=3)
    # 4 rows: k = 0 costs 1 + 0.12 * 3 = 1.36 for 4 tokens (2.94 per unit); k = 1 costs 0.066 * 1.36 + 1 + 0.12 * 7
    # = 1.93 for 4 * 1.3 tokens (2.69 per unit)
    # each exploration that changes nothing doubles the gap before the next one
    assert [est.choose([0.0] * 4) for _ in range(12)] == [0, 0, 0, 1] + [0] * 6 + [1, 0]
    assert est.choose([0.0]) >= 1  # one row: 1.3 tokens for 1.19 beats 1 for 1 (and the gap is 3 again)
    assert [est.choose([0.0] * 4) for _ in range(4)] == [0, 0, 0, 1]
    # proposals for one row of the four (lookup matches): only that row gains from a lookahead, all four are verified
    lookup = AdaptiveK(k_min=0, k_max=8, prior_alpha=0.9, fixed_costs=(0.0, 1.0), verify_slope_prior=0.12)
    assert lookup.choose([0.0] * 4) >= 4 and lookup.choose([0.0], rows=4) == 0
    assert AdaptiveK(k_max=4, prior_alpha=0.3, fixed_costs=(0.066, 1.0),
                     verify_slope_prior=0.12).choose([0.0] * 4) == 1  # k_min = 1 (the default) never answers 0
    assert AdaptiveK(k_min=0, k_max=4, prior_alpha=0.3, fixed_costs=(0.066, 1.0),
                     verify_slope_prior=0.05).choose([0.0] * 4) >= 1  # a flatter machine: drafting pays


def test_a_step_of_the_target_alone_teaches_its_time_only():
    """update(k=0): the acceptance counts stay as they were (nothing was proposed, no decay), the measured time of a
    plain step becomes the cost of k = 0."""
    est = AdaptiveK(k_min=0, k_max=4)
    est.update(2, [0.0], [1], 0.02, 0.1)
    counts = [list(c) for c in est.counts[0.0]]
    est.update(0, [0.0], [0], 0.0, 0.05)
    assert est.counts[0.0] == counts and est.verify_time[0] == 0.05 and est.step_cost(0) == pytest.approx(0.05)
    fixed = AdaptiveK(k_min=0, k_max=4, fixed_costs=(0.07, 1.0))
    fixed.update(0, [0.0], [0], 0.0, 0.05)
    assert fixed.counts == {} and fixed.verify_time == {} and fixed.step_cost(0) == pytest.approx(1.0)
