"""The engine runs the acceptance op without input validation in its loop; NaN/+inf logits from a model must still
fail loudly (FloatingPointError after the loop), never come back as text."""
import pytest
import torch

from engine_fixtures import tiny_target
from tempspec_engine.engine import SpeculativeEngine


def _poison(loaded, value):
    """Makes the model's output head produce `value` for token 5 from now on."""
    with torch.no_grad():
        loaded.model.embed_tokens.weight[5].fill_(value)  # tied head: logit 5 becomes NaN/inf for every row


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_logits_raise(speculative, value):
    target = tiny_target()
    engine = SpeculativeEngine(target, "random", device="cpu", dtype=torch.float32, k=2, max_len=64)
    engine.generate([[1, 2, 3]], 0.7, 4, speculative=speculative, seed=0)  # fine before
    _poison(target, value)
    with pytest.raises(FloatingPointError, match="NaN or \\+inf"):
        engine.generate([[1, 2, 3]], 0.7, 4, speculative=speculative, seed=0)
