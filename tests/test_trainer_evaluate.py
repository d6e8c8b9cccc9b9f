"""tempspec_trainer.evaluate: teacher-forced acceptance per row (each row's positions land in its own row, batched or
alone, for draft models and feature heads), the ratio estimator's standard error (formula and calibration), and
paired differences."""
import math

import pytest
import torch

import trainer_fixtures as tf
from tempspec_engine.models.draft import make_draft
from tempspec_trainer.evaluate import acceptance_by_row, expected_acceptance_over, ratio_se, summarize
from test_engine_feature_draft import feature_head

_one_thread = pytest.fixture(scope="module", autouse=True)(tf.one_thread)
TEMPS = (0.0, 0.7, 1.0)


@pytest.fixture(scope="module")
def target():
    return tf.tiny_target()


@pytest.fixture(scope="module")
def seqs(target):
    rows = tf.sampled_rows(target, 9, prompt_len=5, response_len=10, temperature=1.0, seed=3)
    # ragged: responses of 10, 8, 6, 4, 10, ... tokens
    return [(r["prompt_ids"] + r["response_ids"][:10 - 2 * (i % 4)], len(r["prompt_ids"])) for i, r in enumerate(rows)]


@pytest.mark.parametrize("kind", ["model", "feature"])
def test_rows_batched_equal_rows_alone(target, seqs, kind):
    draft = make_draft("layers:0", target, "cpu", torch.float32).model if kind == "model" else feature_head(target)
    sums, counts = acceptance_by_row(draft, target.model, seqs, TEMPS, 4, "cpu")
    assert sums.shape == (len(seqs), len(TEMPS)) and counts.shape == (len(seqs),)
    for r, seq in enumerate(seqs):
        alone_sums, alone_counts = acceptance_by_row(draft, target.model, [seq], TEMPS, 1, "cpu")
        assert int(alone_counts[0]) == int(counts[r])
        assert torch.allclose(alone_sums[0], sums[r], atol=1e-5)
    # every response token is scored once (a feature head's index t predicts token t+2)
    assert torch.equal(counts, torch.tensor([len(ids) - n for ids, n in seqs]))
    means = expected_acceptance_over(draft, target.model, seqs, TEMPS, 4, "cpu")
    assert means == pytest.approx({f"alpha@{t:g}": float(sums[:, i].sum() / counts.sum())
                                   for i, t in enumerate(TEMPS)})


def test_ratio_se_formula_and_one_row():
    ratio, se = ratio_se(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2, 2, 4]))
    assert ratio == pytest.approx(0.75)
    assert se == pytest.approx(math.sqrt(1.5 * 0.5) / 8)  # residuals -0.5, 0.5, 0
    assert math.isnan(ratio_se(torch.tensor([1.0]), torch.tensor([3]))[1])


def test_ratio_se_is_calibrated():
    """Rows of 5-40 tokens whose acceptance rate varies by row: over 2000 simulated evaluations of 60 rows the
    spread of the estimate matches the mean reported standard error within 10%."""
    gen = torch.Generator().manual_seed(0)
    estimates, errors = [], []
    for _ in range(2000):
        counts = torch.randint(5, 41, (60,), generator=gen)
        rates = torch.rand(60, generator=gen) * 0.6 + 0.1
        sums = torch.binomial(counts.double(), rates.double(), generator=gen)
        ratio, se = ratio_se(sums, counts)
        estimates.append(ratio)
        errors.append(se)
    spread = float(torch.tensor(estimates).std())
    assert sum(errors) / len(errors) == pytest.approx(spread, rel=0.1)


def test_summarize_gives_paired_differences():
    counts = torch.tensor([4, 6, 5, 5])
    a = torch.tensor([[1.0, 2.0], [3.0, 3.0], [2.0, 2.0], [4.0, 1.0]])
    b = a + torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # b accepts 4 more positions at T=0
    diff = summarize(b - a, counts, (0.0, 1.0))
    assert diff["alpha@0"] == pytest.approx(4 / 20) and diff["alpha@1"] == pytest.approx(2 / 20)
    assert set(diff) == {"alpha@0", "alpha@0_se", "alpha@1", "alpha@1_se"}
    assert diff["alpha@0_se"] < summarize(b, counts, (0.0, 1.0))["alpha@0_se"]  # pairing removes the row effects
