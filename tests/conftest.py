"""Shared fixtures: the devices and backends to test, and input builders for the acceptance op.

Without a GPU, Triton kernels run on CPU tensors in the interpreter (TRITON_INTERPRET must be set before triton is
imported, hence here). With a GPU, every test also runs on CUDA with the cuda and triton backends.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tempspec_engine import available_backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKEND_CASES = [(device, name) for device in DEVICES for name in available_backends(device)]


def backend_params():
    """pytest params (device, backend) for every runnable backend on every device."""
    return pytest.mark.parametrize("device,backend", BACKEND_CASES, ids=[f"{d}-{b}" for d, b in BACKEND_CASES])


def make_case(B, k, V, *, relation="random", scale=2.0, seed=0, dtype=torch.float32, device="cpu", temperature=None):
    """Random (draft_logits [B,k,V], target_logits [B,k+1,V], draft_tokens [B,k], temperature [B], uniforms [B,k+1]).

    relation: "random" (independent draft and target), "close" (target = draft + small noise) or "equal".
    Draft tokens are sampled from the draft's own temperature softmax (argmax of the draft for T = 0 rows).
    """
    g = torch.Generator().manual_seed(seed)
    draft = torch.randn(B, k, V, generator=g) * scale
    target = torch.randn(B, k + 1, V, generator=g) * scale
    if relation == "close":
        target[:, :k] = draft + 0.1 * torch.randn(B, k, V, generator=g)
    elif relation == "equal":
        target[:, :k] = draft
    if temperature is None:
        choices = torch.tensor([0.0, 1e-4, 0.3, 1.0, 10.0])
        temperature = choices[torch.arange(B) % len(choices)]
    draft_tokens = draft_sample(draft, temperature, g)
    uniforms = torch.rand(B, k + 1, generator=g)
    return (draft.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype), draft_tokens.to(device),
            temperature.to(device), uniforms.to(device))


def draft_sample(draft, temperature, generator):
    """Tokens [B, k] drawn from softmax(draft / T) per row (argmax where T == 0), with torch.multinomial."""
    B, k, V = draft.shape
    greedy = temperature == 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    probs = torch.softmax(draft.float() / safe_t[:, None, None], dim=-1).reshape(B * k, V)
    drawn = torch.multinomial(probs, 1, generator=generator).reshape(B, k)
    return torch.where(greedy[:, None], draft.float().argmax(-1), drawn)


@pytest.fixture
def kernel_policy(monkeypatch):
    """set(variable, value, *decisions): sets a CPU kernel's policy variable (TEMPSPEC_CPU_LINEAR, ...) for one test
    and forgets the cached decisions (lru_cache functions) that read it, before and after."""
    cached = []

    def set_policy(variable, value, *decisions):
        monkeypatch.setenv(variable, value)
        for decision in decisions:
            decision.cache_clear()
            cached.append(decision)
    yield set_policy
    monkeypatch.undo()
    for decision in cached:
        decision.cache_clear()
