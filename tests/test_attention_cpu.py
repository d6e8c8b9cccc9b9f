"""tempspec's CPU attention kernels, for a few queries (csrc/attention_cpu.cpp) and for a causal prefill
(csrc/prefill_attention_cpu.cpp), against the readable reference (tempspec_engine.attention.attention_reference, itself
checked against torch's SDPA), their batch invariance, and the dispatch of tempspec_engine.attention.attend and of the
transformer's prefill (from_start)."""
import pytest
import torch
import torch.nn.functional as F

from tempspec_engine import attention as att
from tempspec_engine.models.config import ModelConfig
from tempspec_engine.models.llama import Transformer

needs_kernel = pytest.mark.skipif(not att.kernel_available(),
                                  reason="the extension is not built or this CPU lacks AVX2/FMA")
needs_prefill_kernel = pytest.mark.skipif(not att.cpu_has_avx512bf16(),
                                          reason="the extension is not built or this CPU lacks AVX-512 BF16")


def cache_like(B, Hkv, L, D, dtype, g):
    """k, v as the engine passes them: the first L positions of a longer [B, Hkv, max_len, D] cache."""
    k = torch.randn(B, Hkv, L + 9, D, generator=g).to(dtype)[:, :, :L]
    v = torch.randn(B, Hkv, L + 9, D, generator=g).to(dtype)[:, :, :L]
    return k, v


def queries(B, H, T, D, dtype, g):
    """q as the engine passes it: a [B, T, H, D] projection viewed as [B, H, T, D]."""
    return torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2)


def causal_mask(B, T, L, g):
    """Each query sees the keys up to a random position of its own (one query sees none)."""
    last = torch.randint(0, L, (B, T), generator=g)
    last[0, 0] = -1
    return torch.arange(L).view(1, 1, 1, L) <= last.view(B, 1, T, 1)


def test_reference_is_sdpa():
    """The reference states SDPA's semantics (fp32, GQA, bool mask where every query sees a key)."""
    g = torch.Generator().manual_seed(0)
    q, (k, v) = queries(2, 6, 4, 16, torch.float32, g), cache_like(2, 3, 11, 16, torch.float32, g)
    mask = torch.arange(11).view(1, 1, 1, 11) <= torch.tensor([[3, 5, 7, 10], [0, 1, 2, 3]]).view(2, 1, 4, 1)
    for m in (None, mask):
        torch.testing.assert_close(att.attention_reference(q, k, v, m),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True))
    blind = torch.zeros(2, 1, 4, 11, dtype=torch.bool)
    assert torch.equal(att.attention_reference(q, k, v, blind), torch.zeros_like(q))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hkv,T,L,D", [(1, 9, 3, 1, 300, 64), (2, 4, 4, 5, 40, 128), (3, 8, 2, 3, 17, 12),
                                           (1, 2, 1, 7, 5, 80), (2, 6, 3, 2, 1, 8)])
def test_kernel_matches_reference(dtype, B, H, Hkv, T, L, D):
    g = torch.Generator().manual_seed(B * 100 + T * 10 + D)
    q, (k, v) = queries(B, H, T, D, dtype, g), cache_like(B, Hkv, L, D, dtype, g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    for mask in (None, causal_mask(B, T, L, g)):
        out = att.kernel_attention(q, k, v, mask)
        assert out.shape == q.shape and out.dtype == dtype
        torch.testing.assert_close(out, att.attention_reference(q, k, v, mask), **tol)
    # a mask broadcast over the heads and one per head
    per_head = torch.rand(B, H, T, L, generator=g) < 0.5
    torch.testing.assert_close(att.kernel_attention(q, k, v, per_head), att.attention_reference(q, k, v, per_head),
                               **tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_do_not_depend_on_the_others(dtype):
    """A query row's result is the same bits alone, among T rows, among B rows, and over a longer cache whose extra
    keys it does not see (verification attends exactly as decoding does)."""
    g = torch.Generator().manual_seed(1)
    B, H, T, L, D = 3, 6, 5, 64, 64
    q, (k, v) = queries(B, H, T, D, dtype, g), cache_like(B, 2, L, D, dtype, g)
    last = torch.randint(20, 40, (B, T), generator=g)
    mask = torch.arange(L).view(1, 1, 1, L) <= last.view(B, 1, T, 1)
    out = att.kernel_attention(q, k, v, mask)
    for b in range(B):
        for t in range(T):
            alone = att.kernel_attention(q[b:b + 1, :, t:t + 1], k[b:b + 1], v[b:b + 1], mask[b:b + 1, :, t:t + 1])
            assert torch.equal(alone[0, :, 0], out[b, :, t])
            n = int(last[b, t]) + 1  # the keys it sees, no mask
            short = att.kernel_attention(q[b:b + 1, :, t:t + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
            assert torch.equal(short[0, :, 0], out[b, :, t])


@needs_kernel
def test_kernel_rejects_bad_input():
    q = torch.zeros(1, 4, 1, 8)
    k = v = torch.zeros(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="all be bfloat16 or all float32"):
        att.kernel_attention(q, k.bfloat16(), v)
    with pytest.raises(RuntimeError, match="kv_heads dividing"):
        att.kernel_attention(torch.zeros(1, 3, 1, 8), k, v)
    with pytest.raises(RuntimeError, match="contiguous"):
        strided = torch.zeros(1, 2, 8, 3).transpose(2, 3)  # [1, 2, 3, 8], the last dimension with stride 3
        att.kernel_attention(q, strided, strided)
    with pytest.raises(RuntimeError, match="bool"):
        att.kernel_attention(q, k, v, torch.ones(1, 1, 1, 3))
    with pytest.raises(RuntimeError, match=r"mask must be .*\[1 or 1, 4 or 1, 1, 3\], got Bool \[1, 1, 1, 4\]"):
        att.kernel_attention(q, k, v, torch.ones(1, 1, 1, 4, dtype=torch.bool))


@needs_kernel
def test_custom_op_registration():
    """The torch.library op (what torch.compile traces) passes torch's own consistency checks."""
    g = torch.Generator().manual_seed(2)
    q, (k, v) = queries(1, 4, 2, 8, torch.bfloat16, g), cache_like(1, 2, 6, 8, torch.bfloat16, g)
    torch.library.opcheck(att.attention_cpu, (q, k, v, None))
    torch.library.opcheck(att.attention_cpu, (q, k, v, torch.rand(1, 1, 2, 6, generator=g) < 0.7))


@pytest.fixture
def policy(kernel_policy):
    """Sets TEMPSPEC_CPU_ATTENTION for one test (conftest.kernel_policy)."""
    return lambda value: kernel_policy("TEMPSPEC_CPU_ATTENTION", value, att.cpu_attention_enabled)



@needs_kernel
def test_dispatch(policy):
    """attend: the kernel for up to MAX_KERNEL_QUERIES queries, SDPA beyond and with the policy off; causal=True is
    the lower-triangular mask on both paths."""
    policy("auto")
    g = torch.Generator().manual_seed(3)
    q, (k, v) = queries(2, 4, 3, 16, torch.bfloat16, g), cache_like(2, 2, 9, 16, torch.bfloat16, g)
    assert torch.equal(att.attend(q, k, v), att.kernel_attention(q, k, v))
    n = att.MAX_KERNEL_QUERIES + 1
    qn, (kn, vn) = queries(1, 4, n, 16, torch.float32, g), cache_like(1, 2, n, 16, torch.float32, g)
    tril = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
    sdpa = F.scaled_dot_product_attention(qn, kn, vn, is_causal=True, enable_gqa=True)
    assert torch.equal(att.attend(qn, kn, vn, causal=True), sdpa)
    torch.testing.assert_close(sdpa, att.attention_reference(qn, kn, vn, tril))
    qs, ks, vs = qn[:, :, :5], kn[:, :, :5], vn[:, :, :5]
    assert torch.equal(att.attend(qs, ks, vs, causal=True), att.kernel_attention(qs, ks, vs, tril[..., :5, :5]))
    with pytest.raises(ValueError, match="as many keys as queries"):
        att.attend(qs, kn, vn, causal=True)
    policy("0")
    assert torch.equal(att.attend(q, k, v), F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


@pytest.mark.parametrize("T", [6, 40])
def test_prefill_from_start_matches_the_masked_prefill(T):
    """Transformer.forward(from_start=True) (causal attention, no mask) writes the same cache and returns the same
    features as the general masked path, for a ragged right-padded batch (fp32), on both sides of the kernel's
    query limit."""
    cfg = ModelConfig(vocab_size=61, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, intermediate_size=64)
    torch.manual_seed(5)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 61, (2, T))
    positions = torch.arange(T).expand(2, T)
    caches = [model.new_cache(2, T + 4) for _ in range(2)]
    with torch.inference_mode():
        _, masked = model(tokens, positions, caches[0], kv_len=T, compute_logits=False, return_features=True)
        _, causal = model(tokens, positions, caches[1], kv_len=T, compute_logits=False, return_features=True,
                          from_start=True)
    torch.testing.assert_close(causal, masked, rtol=1e-5, atol=1e-5)
    for layer in range(cfg.n_layers):
        torch.testing.assert_close(caches[1].k[layer], caches[0].k[layer])
        torch.testing.assert_close(caches[1].v[layer], caches[0].v[layer])


@needs_prefill_kernel
@pytest.mark.parametrize("B,H,Hkv,T,D", [(1, 9, 3, 33, 64), (2, 4, 2, 130, 64), (1, 4, 1, 70, 128), (1, 2, 2, 64, 64),
                                         (1, 3, 3, 1, 64), (2, 6, 3, 200, 128)])
def test_prefill_kernel_matches_reference(B, H, Hkv, T, D):
    """Causal attention of a whole prompt: within two bf16 steps (the output's rounding and the weights' rounding to
    bf16 before their product with the values) of the fp32 reference, and no further from it than torch's bf16 SDPA
    is by more than one step."""
    g = torch.Generator().manual_seed(T * 10 + D)
    q, (k, v) = queries(B, H, T, D, torch.bfloat16, g), cache_like(B, Hkv, T, D, torch.bfloat16, g)
    out = att.kernel_prefill_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    want = att.attention_reference(q, k, v, torch.ones(T, T, dtype=torch.bool).tril().view(1, 1, T, T)).float()
    ours = (out.float() - want).abs().max().item()
    sdpa = (F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).float() - want).abs().max().item()
    assert ours <= 2 ** -6 and ours <= sdpa + 2 ** -7, (ours, sdpa)


@needs_prefill_kernel
def test_prefill_kernel_rows_do_not_depend_on_the_prompt_length_or_the_batch():
    """A query's result depends on its own keys alone: a prompt's first n queries attend as the prompt cut to n does,
    and a row of a right-padded batch as that row alone (what lets the GPU's padded prefill and the CPU's row by row
    one give the same text)."""
    g = torch.Generator().manual_seed(4)
    q, (k, v) = queries(2, 9, 150, 64, torch.bfloat16, g), cache_like(2, 3, 150, 64, torch.bfloat16, g)
    full = att.kernel_prefill_attention(q, k, v)
    for n in (33, 64, 97):
        cut = att.kernel_prefill_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n])
        assert torch.equal(cut, full[:, :, :n])
    alone = att.kernel_prefill_attention(q[1:], k[1:], v[1:])
    assert torch.equal(alone, full[1:])


@needs_prefill_kernel
def test_prefill_kernel_rejects_bad_input():
    from tempspec_engine import _C

    g = torch.Generator().manual_seed(5)
    q, (k, v) = queries(1, 4, 40, 64, torch.bfloat16, g), cache_like(1, 2, 40, 64, torch.bfloat16, g)
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        _C.prefill_attention_cpu(q.float(), k.float(), v.float(), 0.125)
    with pytest.raises(RuntimeError, match="head dimension 64 or 128"):
        _C.prefill_attention_cpu(q[..., :32], k[..., :32], v[..., :32], 0.125)
    with pytest.raises(RuntimeError, match="as many keys as queries"):
        _C.prefill_attention_cpu(q, k[:, :, :39], v[:, :, :39], 0.125)
    with pytest.raises(RuntimeError, match="kv_heads dividing"):
        _C.prefill_attention_cpu(q, k[:, :1].expand(1, 3, 40, 64), v[:, :1].expand(1, 3, 40, 64), 0.125)
    torch.library.opcheck(att.prefill_attention_cpu, (q, k, v))


@needs_prefill_kernel
def test_prefill_dispatch(policy):
    """attend(causal=True) sends a bf16 prefill of more than MAX_KERNEL_QUERIES queries with head dimension 64 or 128
    to the prefill kernel; fp32, other head dimensions and the policy off go to SDPA."""
    policy("auto")
    g = torch.Generator().manual_seed(6)
    n = att.MAX_KERNEL_QUERIES + 8
    q, (k, v) = queries(1, 4, n, 64, torch.bfloat16, g), cache_like(1, 2, n, 64, torch.bfloat16, g)
    assert torch.equal(att.attend(q, k, v, causal=True), att.kernel_prefill_attention(q, k, v))
    for qq, kk, vv in ((q.float(), k.float(), v.float()), (q[..., :32], k[..., :32], v[..., :32])):
        assert torch.equal(att.attend(qq, kk, vv, causal=True),
                           F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True))
    policy("0")
    assert torch.equal(att.attend(q, k, v, causal=True),
                       F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
