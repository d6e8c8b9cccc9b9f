"""GPU-only checks (skipped without CUDA): realistic vocabularies in every logit dtype against the reference,
CUDA-graph capture, and the cpu C++ backend agreeing with the GPU backends on the same inputs."""
import pytest
import torch
from conftest import make_case

from tempspec_engine import available_backends, sample, speculative_sample
from tempspec_engine.reference import reference_speculative_sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in available_backends("cuda")]
TEMPS = torch.tensor([0.0, 1e-4, 0.3, 0.7, 1.0, 1.3, 2.0, 10.0])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("V", [32000, 32001, 49152, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("relation", ["close", "equal", "random"])
def test_large_vocabulary_matches_reference(backend, V, dtype, relation):
    draft, target, tokens, temperature, uniforms = make_case(8, 4, V, relation=relation, dtype=dtype, seed=V,
                                                             temperature=TEMPS)
    out = speculative_sample(draft.cuda(), target.cuda(), tokens.cuda(), temperature.cuda(), uniforms=uniforms.cuda(),
                             backend=backend)
    ref_accepted, ref_tokens = reference_speculative_sample(draft, target, tokens, temperature, uniforms)
    torch.testing.assert_close(out.accepted.cpu(), ref_accepted, rtol=0, atol=0)
    torch.testing.assert_close(out.tokens.cpu(), ref_tokens, rtol=0, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_replay_equals_eager(backend):
    inputs = [t.cuda() for t in make_case(64, 4, 128256, relation="close", dtype=torch.bfloat16, seed=1,
                                          temperature=torch.ones(64))]

    def step():
        return speculative_sample(*inputs[:4], uniforms=inputs[4], backend=backend, validate=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    eager = step()
    torch.cuda.synchronize()
    assert torch.equal(captured.accepted, eager.accepted) and torch.equal(captured.tokens, eager.tokens)


def test_gpu_backends_agree_with_cpu_backend_at_scale():
    if "cpu" not in available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    inputs = make_case(64, 4, 128256, relation="close", dtype=torch.bfloat16, seed=2, temperature=TEMPS.repeat(8))
    cpu = speculative_sample(*inputs[:4], uniforms=inputs[4], backend="cpu")
    for backend in GPU_BACKENDS:
        gpu = speculative_sample(*[t.cuda() for t in inputs[:4]], uniforms=inputs[4].cuda(), backend=backend)
        mismatched_rows = int(((gpu.tokens.cpu() != cpu.tokens).any(-1) | (gpu.accepted.cpu() != cpu.accepted)).sum())
        assert mismatched_rows == 0, f"{backend}: {mismatched_rows} of 64 rows differ from the cpu backend"


# Filters and lenience at scale (semantics: reference.py). Rows: greedy, no filter, each filter alone, combined,
# lossy; bf16 logits make exact ties at the top-k / top-p boundaries common.
FILTER_ROWS = dict(
    top_k=torch.tensor([0, 0, 50, 0, 0, 40, 1, 1000]),
    top_p=torch.tensor([1.0, 1.0, 1.0, 0.9, 1.0, 0.95, 1.0, 0.8]),
    min_p=torch.tensor([0.0, 0.0, 0.0, 0.0, 0.05, 0.01, 0.0, 0.02]),
    lenience=torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5, 0.7, 0.3, 1.0]),
)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("V", [32000, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relation", ["close", "random"])
def test_filters_at_scale_match_reference(backend, V, dtype, relation):
    from tempspec_engine.reference import reference_sample

    draft, target, tokens, temperature, uniforms = make_case(8, 4, V, relation=relation, dtype=dtype, seed=V + 1,
                                                             temperature=TEMPS)
    rows = {n: t.cuda() for n, t in FILTER_ROWS.items()}
    out = speculative_sample(draft.cuda(), target.cuda(), tokens.cuda(), temperature.cuda(), uniforms=uniforms.cuda(),
                             backend=backend, **rows)
    ref_accepted, ref_tokens = reference_speculative_sample(draft, target, tokens, temperature, uniforms,
                                                            **FILTER_ROWS)
    torch.testing.assert_close(out.accepted.cpu(), ref_accepted, rtol=0, atol=0)
    torch.testing.assert_close(out.tokens.cpu(), ref_tokens, rtol=0, atol=0)
    filters = {n: rows[n] for n in ("top_k", "top_p", "min_p")}
    drawn = sample(target[:, 0].cuda(), temperature.cuda(), uniforms=uniforms[:, 0].cuda(), backend=backend, **filters)
    ref = reference_sample(target[:, 0], temperature, uniforms[:, 0],
                           *(FILTER_ROWS[n] for n in ("top_k", "top_p", "min_p")))
    torch.testing.assert_close(drawn.cpu(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_filter_kernels_with_everything_off_equal_the_plain_kernels(backend):
    inputs = [t.cuda() for t in make_case(16, 4, 128256, relation="close", dtype=torch.bfloat16, seed=5,
                                          temperature=TEMPS.repeat(2))]
    plain = speculative_sample(*inputs[:4], uniforms=inputs[4], backend=backend)
    off = speculative_sample(*inputs[:4], uniforms=inputs[4], backend=backend, validate=False,
                             top_k=torch.zeros(16, dtype=torch.int64, device="cuda"),
                             top_p=torch.ones(16, device="cuda"), min_p=torch.zeros(16, device="cuda"),
                             lenience=torch.ones(16, device="cuda"))
    assert torch.equal(plain.tokens, off.tokens) and torch.equal(plain.accepted, off.accepted)
