"""tempspec's fused CPU layer ops (csrc/layer_ops_cpu.cpp) against the readable references in
tempspec_engine/layer_ops.py (RMSNorm after the residual add, SiLU(gate) * up, RoPE with the KV-cache store), and the
dispatch rule."""
import pytest
import torch

from tempspec_engine import layer_ops as ops
from tempspec_engine.models.config import ModelConfig
from tempspec_engine.models.llama import Transformer

_C = ops._extension()
needs_kernel = pytest.mark.skipif(_C is None, reason="the extension is not built or this CPU lacks AVX2/FMA")
DTYPES = [torch.bfloat16, torch.float32]


def assert_within_one_step(y: torch.Tensor, ref: torch.Tensor) -> None:
    """y equals ref up to one rounding step of the dtype (bf16: 2^-8 relative; fp32: a few ulps); in bf16 most values
    are the very same bits (fp32 keeps the last bits of a different summation order or rsqrt)."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    yf, rf = y.float(), ref.float()
    rel = 2.0 ** -7 if y.dtype == torch.bfloat16 else 1e-6
    bound = rf.abs() * rel + 1e-6 * (1 + rf.abs().max())
    assert bool(((yf - rf).abs() <= bound).all()), f"max error {(yf - rf).abs().max().item()}"
    if y.dtype == torch.bfloat16:
        assert (y == ref).float().mean() > 0.95


@pytest.fixture
def policy(kernel_policy):
    """Sets TEMPSPEC_CPU_LAYER_OPS for one test (conftest.kernel_policy)."""
    return lambda value: kernel_policy("TEMPSPEC_CPU_LAYER_OPS", value, ops.cpu_layer_ops_enabled)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 64), (2, 7), (4, 13)])
def test_rms_norm_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    delta = torch.randn(shape, generator=g).to(dtype)
    w = (1 + torch.randn(shape[-1], generator=g) / 4).to(dtype)
    (y,) = _C.rms_norm_cpu(x, None, w, 1e-5)
    assert_within_one_step(y, ops.rms_norm_reference(x, w, 1e-5))
    h, y = _C.rms_norm_cpu(x, delta, w, 1e-5)
    h_ref, y_ref = ops.add_rms_norm_reference(x, delta, w, 1e-5)
    assert torch.equal(h, h_ref)  # the residual add rounds exactly as torch's
    assert_within_one_step(y, y_ref)


@needs_kernel
def test_bf16_rounding_of_special_values():
    """The vectorized rounding to bf16 is torch's, bit for bit, for ties, overflow to inf, infinities and NaN (the
    residual add of 16 values runs two vectors of 8)."""
    big = torch.finfo(torch.bfloat16).max
    x = torch.tensor([1, 1, 1, 256, big, big, -big, float("inf"), float("inf"), float("nan"), 0, -0.0, 3, 5, 7, 9],
                     dtype=torch.bfloat16)
    d = torch.tensor([2 ** -8, 3 * 2 ** -8, -2 ** -8, 1, big, big / 256, -big, -float("inf"), 1, 1, -0.0, -0.0,
                      2 ** -7, 2 ** -6, 2 ** -5, 2 ** -20], dtype=torch.bfloat16)
    h, _ = _C.rms_norm_cpu(x.view(1, 16), d.view(1, 16), torch.ones(16, dtype=torch.bfloat16), 1e-5)
    bits = lambda t: t.view(torch.int16)  # noqa: E731 (NaN != NaN: compare the bits)
    assert torch.equal(bits(h.view(16)), bits(x + d))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1536), (3, 4, 96), (2, 11)])
def test_silu_mul_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    gate = (torch.randn(shape, generator=g) * 4).to(dtype)
    gate.view(-1)[:3] = torch.tensor([-100.0, 100.0, 0.0]).to(dtype)  # exp's clamped ends and zero
    up = torch.randn(shape, generator=g).to(dtype)
    assert_within_one_step(_C.silu_mul_cpu(gate, up), ops.silu_mul_reference(gate, up))


def rope_inputs(dtype, B=2, T=3, H=6, Hkv=2, D=16, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H * D, generator=g).to(dtype).view(B, T, H, D)
    kv = torch.randn(B, T, 2 * Hkv * D, generator=g).to(dtype)
    k, v = kv[..., :Hkv * D].view(B, T, Hkv, D), kv[..., Hkv * D:].view(B, T, Hkv, D)  # strided, as projections give
    ang = torch.randn(B, T, 1, D // 2, generator=g)
    cos = torch.cat((ang.cos(), ang.cos()), -1).to(dtype)
    sin = torch.cat((-ang.sin(), ang.sin()), -1).to(dtype)
    caches = torch.randn(2, B + 1, Hkv, L, D, generator=g).to(dtype)
    slots = torch.stack([torch.randperm(L, generator=g)[:T] for _ in range(B)])
    return q, k, v, cos, sin, caches, slots


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 12])  # 8 values at a time where D/2 is a multiple of 8, else one at a time
def test_rope_store_matches_reference_bit_for_bit(dtype, D):
    """RoPE rounds as apply_rope's three operators do, so the kernel's query and stored keys are the reference's bits;
    the caches are row views (as KVCache.rows gives) and only the given slots change."""
    q, k, v, cos, sin, caches, slots = rope_inputs(dtype, D=D)
    ref_caches = caches.clone()
    out = _C.rope_store_cpu(q, k, v, cos, sin, caches[0, 1:], caches[1, 1:], slots)
    ref = ops.rope_store_reference(q, k, v, cos, sin, ref_caches[0, 1:], ref_caches[1, 1:], slots)
    assert out.shape == q.shape and out.is_contiguous()
    assert torch.equal(out, ref)
    assert torch.equal(caches, ref_caches)


@needs_kernel
def test_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 576, generator=g).bfloat16()
    d = torch.randn(9, 576, generator=g).bfloat16()
    w = torch.randn(576, generator=g).bfloat16()
    h, y = _C.rms_norm_cpu(x, d, w, 1e-5)
    s = _C.silu_mul_cpu(x, d)
    for m in (0, 4, 8):
        h1, y1 = _C.rms_norm_cpu(x[m:m + 1], d[m:m + 1], w, 1e-5)
        assert torch.equal(h1, h[m:m + 1]) and torch.equal(y1, y[m:m + 1])
        assert torch.equal(_C.silu_mul_cpu(x[m:m + 1], d[m:m + 1]), s[m:m + 1])


@needs_kernel
def test_bad_input_is_one_error():
    x, w = torch.randn(2, 8).bfloat16(), torch.randn(8).bfloat16()
    with pytest.raises(RuntimeError, match="same dtype"):
        _C.rms_norm_cpu(x, None, w.float(), 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must be \[8\]"):
        _C.rms_norm_cpu(x, None, w[:4], 1e-5)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        _C.silu_mul_cpu(x.double(), x.double())
    q, k, v, cos, sin, caches, slots = rope_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="outside the cache's 12"):
        _C.rope_store_cpu(q, k, v, cos, sin, caches[0, 1:], caches[1, 1:], slots + 12)
    with pytest.raises(RuntimeError, match="slots must be int64"):
        _C.rope_store_cpu(q, k, v, cos, sin, caches[0, 1:], caches[1, 1:], slots.int())


@needs_kernel
def test_custom_op_registration():
    """The torch.library ops (what torch.compile traces) pass torch's own consistency checks."""
    g = torch.Generator().manual_seed(6)
    x, d = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    w = torch.randn(16, generator=g)
    torch.library.opcheck(ops.rms_norm_cpu, (x, None, w, 1e-5))
    torch.library.opcheck(ops.rms_norm_cpu, (x, d, w, 1e-5))
    torch.library.opcheck(ops.silu_mul_cpu, (x, d))
    q, k, v, cos, sin, caches, slots = rope_inputs(torch.float32)
    torch.library.opcheck(ops.rope_store_cpu, (q, k, v, cos, sin, caches[0, 1:].clone(), caches[1, 1:].clone(), slots))



@needs_kernel
def test_dispatch(policy, monkeypatch):
    """Inference on CPU bf16/fp32 goes through the kernels; fp16, gradients, or the policy 0 go to the references."""
    calls = []
    for name in ("rms_norm_cpu", "silu_mul_cpu"):
        kernel = getattr(_C, name)
        monkeypatch.setattr(_C, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    x, w = torch.randn(2, 8), torch.randn(8)
    policy("auto")
    ops.rms_norm(x, w, 1e-5), ops.add_rms_norm(x, x, w, 1e-5), ops.silu_mul(x, x)
    assert calls == ["rms_norm_cpu", "rms_norm_cpu", "silu_mul_cpu"]
    calls.clear()
    ops.rms_norm(x.half(), w.half(), 1e-5)
    wg = w.clone().requires_grad_()
    y = ops.rms_norm(x, wg, 1e-5)
    y.sum().backward()
    assert wg.grad is not None
    policy("0")
    ops.rms_norm(x, w, 1e-5), ops.silu_mul(x, x)
    assert calls == []


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_transformer_with_the_kernels(policy, dtype):
    """A Transformer's cached forward (prefill, then a 3-token step at ragged positions) gives the same logits and
    caches with the kernels as with torch's operators, up to rounding."""
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=96)
    torch.manual_seed(7)
    model = Transformer(cfg).to(dtype).eval()
    tokens = torch.randint(0, 97, (2, 9))
    outs = []
    for value in ("0", "1"):
        policy(value)
        cache = model.new_cache(2, 16)
        with torch.inference_mode():
            first = model(tokens[:, :6], torch.arange(6).expand(2, 6), cache, kv_len=6, from_start=True)
            positions = torch.tensor([[6, 7, 8], [4, 5, 6]])
            step = model(tokens[:, 6:], positions, cache, kv_len=9)
        outs.append((first.float(), step.float(), cache.k[1].float()))
    tol = dict(rtol=0.05, atol=0.05) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **tol)
