"""tempspec's bf16 linear kernel for CPUs (csrc/linear_cpu.cpp), each of its variants (avx2, avx512bf16) this CPU
runs, against the readable reference: the fp32 product x.float() @ w.float().T (+ bias) rounded once to bf16; and
the dispatch rule of tempspec_engine.linear."""
import pytest
import torch
import torch.nn.functional as F

from tempspec_engine import linear as linear_mod
from tempspec_engine.models.config import ModelConfig
from tempspec_engine.models.llama import Transformer

_C = linear_mod._extension()
needs_kernel = pytest.mark.skipif(_C is None or not _C.linear_bf16_cpu_supported(),
                                  reason="the extension is not built or this CPU lacks AVX2/FMA")
# the kernel's variants this CPU runs: each is checked on its own ("avx512bf16" only on CPUs with AVX-512 BF16)
ISAS = [pytest.param("avx2", marks=needs_kernel),
        pytest.param("avx512bf16", marks=pytest.mark.skipif(
            _C is None or _C.linear_bf16_cpu_isa() != "avx512bf16", reason="this CPU lacks AVX-512 BF16"))]


def reference(x, w, b=None):
    """fp32 products and sums, one rounding to bf16 at the end."""
    y = x.float() @ w.float().T
    return y if b is None else y + b.float()


def assert_rounded_from(y: torch.Tensor, ref32: torch.Tensor) -> None:
    """y (bf16) is ref32 rounded to bf16, up to one bf16 step and fp32 summation-order noise."""
    assert y.dtype == torch.bfloat16 and y.shape == ref32.shape
    err = (y.float() - ref32).abs()
    bound = ref32.abs() * 2.0 ** -8 + 1e-4 * (1 + ref32.abs().max())
    assert bool((err <= bound).all()), f"max error {err.max().item()} beyond one bf16 step"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("K", [1, 7, 8, 31, 33, 64, 577])
@pytest.mark.parametrize("N", [1, 3, 4, 13, 32, 45])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 13, 70])
def test_kernel_matches_reference(K, N, M, isa):
    g = torch.Generator().manual_seed(K * 1000 + N * 10 + M)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    assert_rounded_from(_C.linear_bf16_cpu(x, w, isa=isa), reference(x, w))
    assert_rounded_from(_C.linear_bf16_cpu(x, w, b, isa=isa), reference(x, w, b))


@needs_kernel
def test_kernel_variant():
    """The default variant is the best this CPU runs; asking for one it cannot run is refused in one line."""
    isa = _C.linear_bf16_cpu_isa()
    assert isa in ("avx2", "avx512bf16") and linear_mod.kernel_isa() == isa
    x, w = torch.randn(3, 40).bfloat16(), torch.randn(5, 40).bfloat16()
    assert torch.equal(_C.linear_bf16_cpu(x, w), _C.linear_bf16_cpu(x, w, isa=isa))
    with pytest.raises(RuntimeError, match="isa sse is not one this CPU runs"):
        _C.linear_bf16_cpu(x, w, isa="sse")


@needs_kernel
def test_variant_variable(kernel_policy):
    """TEMPSPEC_CPU_LINEAR_ISA picks the variant the engine's calls run; one the CPU cannot run is refused."""
    kernel_policy("TEMPSPEC_CPU_LINEAR_ISA", "avx2", linear_mod.kernel_isa)
    assert linear_mod.kernel_isa() == "avx2"
    x, w = torch.randn(3, 40).bfloat16(), torch.randn(5, 40).bfloat16()
    assert torch.equal(linear_mod.kernel_linear(x, w), _C.linear_bf16_cpu(x, w, isa="avx2"))
    kernel_policy("TEMPSPEC_CPU_LINEAR_ISA", "neon", linear_mod.kernel_isa)
    with pytest.raises(ValueError, match="TEMPSPEC_CPU_LINEAR_ISA must be auto or a variant this CPU runs"):
        linear_mod.kernel_isa()


@needs_kernel
def test_kernel_leading_dims_and_empty():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=g).bfloat16()
    w = torch.randn(33, 64, generator=g).bfloat16()
    y = _C.linear_bf16_cpu(x, w)
    assert y.shape == (2, 5, 33)
    assert_rounded_from(y, reference(x, w))
    assert _C.linear_bf16_cpu(x[:, :0], w).shape == (2, 0, 33)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("K", [576, 577, 600])
def test_kernel_rows_do_not_depend_on_the_batch(isa, K):
    """Row m of the product is the same bits whether it is computed alone or among 70 rows (verification of k+1
    tokens gives the logits k+1 decodes give); an odd N leaves a last tile of one weight row, K = 577 a tail past the
    last 8 inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(70, K, generator=g).bfloat16()
    w = torch.randn(301, K, generator=g).bfloat16()
    y = _C.linear_bf16_cpu(x, w, isa=isa)
    for m in (0, 1, 2, 63, 64, 69):
        assert torch.equal(_C.linear_bf16_cpu(x[m:m + 1], w, isa=isa), y[m:m + 1])
    for a, b in ((3, 8), (8, 17), (60, 70)):
        assert torch.equal(_C.linear_bf16_cpu(x[a:b], w, isa=isa), y[a:b])


@needs_kernel
def test_kernel_rejects_bad_input():
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        _C.linear_bf16_cpu(torch.zeros(2, 8), w)
    with pytest.raises(RuntimeError, match="last dimension"):
        _C.linear_bf16_cpu(torch.zeros(2, 7, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.linear_bf16_cpu(torch.zeros(2, 4, dtype=torch.bfloat16), w.T)


@needs_kernel
def test_custom_op_registration():
    """The torch.library op (what torch.compile traces) passes torch's own consistency checks."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, generator=g).bfloat16()
    w = torch.randn(8, 16, generator=g).bfloat16()
    torch.library.opcheck(linear_mod.linear_bf16_cpu, (x, w, None))
    torch.library.opcheck(linear_mod.linear_bf16_cpu, (x, w, torch.randn(8, generator=g).bfloat16()))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 5, 70])
@pytest.mark.parametrize("K", [64, 577])
def test_many_weights_in_one_call(isa, M, K):
    """Several weights of one K in one call: each output is the bits of its own call (with or without a bias), its
    shape x's leading dimensions and its N; tiles of different weights share the threads."""
    g = torch.Generator().manual_seed(M * 1000 + K)
    x = torch.randn(M, K, generator=g).bfloat16().view(M, 1, K)
    weights = [torch.randn(n, K, generator=g).bfloat16() for n in (300, 1, 13, 4)]
    biases = [torch.randn(300, generator=g).bfloat16(), None, None, torch.randn(4, generator=g).bfloat16()]
    outs = _C.linear_bf16_cpu_many(x, weights, biases, isa)
    assert [o.shape for o in outs] == [(M, 1, w.shape[0]) for w in weights]
    for w, b, out in zip(weights, biases, outs):
        assert torch.equal(out, _C.linear_bf16_cpu(x, w, b, isa=isa))
    assert all(torch.equal(a, _C.linear_bf16_cpu(x, w, isa=isa))
               for a, w in zip(_C.linear_bf16_cpu_many(x, weights, [], isa), weights))


@needs_kernel
def test_many_weights_reject_bad_input():
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="no weight"):
        _C.linear_bf16_cpu_many(x, [], [])
    with pytest.raises(RuntimeError, match="the same K"):
        _C.linear_bf16_cpu_many(x, [w, torch.zeros(4, 9, dtype=torch.bfloat16)], [])
    with pytest.raises(RuntimeError, match="1 biases for 2 weights"):
        _C.linear_bf16_cpu_many(x, [w, w], [None])


@needs_kernel
def test_linears(policy):
    """linear.linears: one kernel call for every layer under bf16 inference, each result its layer's own; anything
    that needs gradients (or fp32) runs the layers one by one, gradients reaching each weight."""
    policy("1")
    torch.manual_seed(6)
    layers = [linear_mod.Linear(40, n, bias=bias).bfloat16() for n, bias in ((24, True), (8, False))]
    x = torch.randn(3, 2, 40).bfloat16()
    with torch.inference_mode():
        outs = linear_mod.linears(x, layers)
        assert all(torch.equal(o, _C.linear_bf16_cpu(x, l.weight, l.bias)) for o, l in zip(outs, layers))
    outs = linear_mod.linears(x, layers)
    assert all(o.requires_grad and torch.equal(o.detach(), F.linear(x, l.weight, l.bias)) for o, l in zip(outs, layers))
    sum(o.float().sum() for o in outs).backward()
    assert all(l.weight.grad is not None for l in layers)
    torch.library.opcheck(linear_mod.linears_bf16_cpu, (x, [l.weight.detach() for l in layers],
                                                        [layers[0].bias.detach(), None]))


@pytest.fixture
def policy(kernel_policy):
    """Sets TEMPSPEC_CPU_LINEAR for one test (conftest.kernel_policy)."""
    return lambda value: kernel_policy("TEMPSPEC_CPU_LINEAR", value, linear_mod.cpu_kernel_max_rows)



@needs_kernel
@pytest.mark.parametrize("onednn_bf16", [False, True])
def test_auto_policy_rows(policy, monkeypatch, onednn_bf16):
    """auto: every call through the kernel where torch has no fast bf16 product, or where the kernel's avx512bf16
    variant runs; with oneDNN's bf16 product and the avx2 variant, calls of up to ONEDNN_CROSSOVER_ROWS["avx2"] input
    rows through the kernel and larger ones (a prefill) through F.linear."""
    monkeypatch.setattr(linear_mod, "torch_bf16_matmul_is_fast", lambda: onednn_bf16)
    monkeypatch.setattr(linear_mod, "kernel_isa", lambda: "avx512bf16")
    policy("auto")
    assert linear_mod.ONEDNN_CROSSOVER_ROWS["avx512bf16"] == linear_mod.ALL_ROWS
    assert linear_mod.cpu_kernel_max_rows() == linear_mod.ALL_ROWS
    monkeypatch.setattr(linear_mod, "kernel_isa", lambda: "avx2")
    policy("auto")
    limit = linear_mod.ONEDNN_CROSSOVER_ROWS["avx2"]
    assert linear_mod.cpu_kernel_max_rows() == (limit if onednn_bf16 else linear_mod.ALL_ROWS)
    calls = []
    kernel = _C.linear_bf16_cpu_many  # (linear's calls go through kernel_linears)
    monkeypatch.setattr(_C, "linear_bf16_cpu_many", lambda *a: calls.append(a[0].shape) or kernel(*a))
    w = torch.randn(24, 40).bfloat16()
    with torch.inference_mode():
        linear_mod.linear(torch.randn(2, limit // 2, 40).bfloat16(), w)
        linear_mod.linear(torch.randn(limit + 1, 40).bfloat16(), w)
    assert calls == ([(2, limit // 2, 40)] if onednn_bf16 else [(2, limit // 2, 40), (limit + 1, 40)])
    policy("1")
    assert linear_mod.cpu_kernel_max_rows() == linear_mod.ALL_ROWS


needs_avx512bf16 = pytest.mark.skipif(_C is None or _C.linear_bf16_cpu_isa() != "avx512bf16",
                                      reason="this CPU lacks AVX-512 BF16")


@needs_avx512bf16
@pytest.mark.parametrize("N, K", [(1, 1), (32, 64), (45, 7), (70, 576)])
def test_packed_layout(N, K):
    """linear_bf16_cpu_pack: packed[t, p, 2 i + h] = w[32 t + i, 2 p + h], zero beyond N and K; a call given the packed
    weight returns what a call packing it itself returns."""
    g = torch.Generator().manual_seed(N * 100 + K)
    w = torch.randn(N, K, generator=g).bfloat16()
    packed = _C.linear_bf16_cpu_pack(w)
    tiles, pairs = -(-N // 32), -(-K // 2)
    assert packed.shape == (tiles, pairs, 64) and packed.dtype == torch.bfloat16
    padded = torch.zeros(tiles * 32, pairs * 2, dtype=torch.bfloat16)
    padded[:N, :K] = w
    for t in range(tiles):
        for p in range(pairs):
            for i in range(32):
                assert torch.equal(packed[t, p, 2 * i:2 * i + 2], padded[32 * t + i, 2 * p:2 * p + 2])
    x = torch.randn(3, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    assert torch.equal(_C.linear_bf16_cpu(x, w, b, isa="avx512bf16", packed=packed),
                       _C.linear_bf16_cpu(x, w, b, isa="avx512bf16"))


@needs_avx512bf16
def test_packed_weights_rejected_when_wrong():
    """A packed weight that cannot be its weight's (shape, dtype, layout) or a list of the wrong length is refused."""
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    good = _C.linear_bf16_cpu_pack(w)
    with pytest.raises(RuntimeError, match=r"packed weight 0 must be linear_bf16_cpu_pack of weight 0"):
        _C.linear_bf16_cpu(x, w, isa="avx512bf16", packed=_C.linear_bf16_cpu_pack(torch.zeros(4, 10).bfloat16()))
    with pytest.raises(RuntimeError, match="packed weight 1 must be"):
        _C.linear_bf16_cpu_many(x, [w, w], [], "avx512bf16", [good, good.float()])
    with pytest.raises(RuntimeError, match="1 packed weights for 2 weights"):
        _C.linear_bf16_cpu_many(x, [w, w], [], "avx512bf16", [good])
    with pytest.raises(RuntimeError, match=r"must be a bfloat16 CPU tensor \[N, K\]"):
        _C.linear_bf16_cpu_pack(torch.zeros(4, 8))


@needs_avx512bf16
def test_packed_weight_follows_its_weight(policy):
    """packed_weight and Linear.kernel_args pack once and again only when the weight changes: in place (an optimizer step,
    load_state_dict) or by a new tensor; a view of a weight (the engine's head rows) is packed as itself."""
    policy("1")
    g = torch.Generator().manual_seed(7)
    layer = linear_mod.Linear(40, 70).bfloat16()
    x = torch.randn(5, 40, generator=g).bfloat16()

    def fresh():
        return _C.linear_bf16_cpu(x, layer.weight.detach().clone(), layer.bias.detach().clone(), isa="avx512bf16")

    with torch.inference_mode():
        first = layer.kernel_args()[2]  # the packed weight
        assert layer.kernel_args()[2] is first and torch.equal(layer(x), fresh())
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer's in-place step
    with torch.inference_mode():
        assert layer.kernel_args()[2] is not first and torch.equal(layer(x), fresh())
        layer.load_state_dict({"weight": torch.randn(70, 40, generator=g).bfloat16(), "bias": layer.bias.detach()})
        assert torch.equal(layer(x), fresh())
    layer.weight = torch.nn.Parameter(torch.randn(70, 40, generator=g).bfloat16())
    with torch.inference_mode():
        assert torch.equal(layer(x), fresh())
    w = torch.randn(90, 40, generator=g).bfloat16()
    view = w[:50]
    packed = linear_mod.packed_weight(view)
    assert linear_mod.packed_weight(w[:50]) is packed  # a new view object of the same rows: the same entry
    assert torch.equal(linear_mod.kernel_linear(x, w[:50]), _C.linear_bf16_cpu(x, w[:50].clone(), isa="avx512bf16"))
    w[:50] = 0.0
    assert linear_mod.packed_weight(w[:50]) is not packed
    assert not linear_mod.kernel_linear(x, w[:50]).any()
    with torch.inference_mode():  # no version counter to tell a change by: the avx2 variant reads it as it is
        w_inference = torch.randn(3, 40, generator=g).bfloat16()
        assert linear_mod.packed_weight(w_inference) is None
        assert torch.equal(linear_mod.kernel_linear(x, w_inference), _C.linear_bf16_cpu(x, w_inference, isa="avx2"))
        made_here = linear_mod.Linear(40, 8).bfloat16()  # a layer built under inference: the same rule
        assert made_here.kernel_args() is None  # (under avx512bf16: nothing to run but through the avx2 variant)
        assert torch.equal(made_here(x), _C.linear_bf16_cpu(x, made_here.weight, made_here.bias, isa="avx2"))
        assert all(torch.equal(a, _C.linear_bf16_cpu(x, made_here.weight, made_here.bias, isa="avx2"))
                   for a in linear_mod.linears(x, [made_here, made_here]))


@needs_kernel
def test_dispatch(policy):
    """With the kernel on, bf16 CPU inference goes through it; fp32 and anything needing gradients goes to F.linear."""
    policy("1")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 40, generator=g).bfloat16()
    w = torch.randn(24, 40, generator=g).bfloat16()
    assert torch.equal(linear_mod.linear(x, w), _C.linear_bf16_cpu(x, w))
    wg = w.clone().requires_grad_()
    y = linear_mod.linear(x, wg)
    assert y.requires_grad and torch.equal(y.detach(), F.linear(x, w))
    y.float().sum().backward()
    assert wg.grad is not None
    xf, wf = x.float(), w.float()
    assert torch.equal(linear_mod.linear(xf, wf), F.linear(xf, wf))


@needs_kernel
def test_transformer_logits_with_the_kernel(policy, monkeypatch):
    """A bf16 Transformer runs every projection and its head through the kernel under inference, and its logits are
    within bf16 rounding of the same model through F.linear."""
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=96)
    torch.manual_seed(4)
    model = Transformer(cfg).bfloat16().eval()
    tokens = torch.randint(0, 97, (2, 9))
    positions = torch.arange(9).expand(2, 9)
    calls = []
    one, many = _C.linear_bf16_cpu, _C.linear_bf16_cpu_many

    def counted_one(*args):
        calls.append(1)
        return one(*args)

    def counted_many(*args):
        calls.append(len(args[1]))
        return many(*args)

    monkeypatch.setattr(_C, "linear_bf16_cpu", counted_one)
    monkeypatch.setattr(_C, "linear_bf16_cpu_many", counted_many)
    with torch.inference_mode():
        policy("0")
        ref = model(tokens, positions, None).float()
        assert not calls
        policy("1")
        out = model(tokens, positions, None).float()
    assert calls == [3, 1, 2, 1] * 2 + [1]  # per block: q, k, v in one call, o, gate and up in one, down; the head
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
