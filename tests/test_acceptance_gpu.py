"""GPU-only checks (skipped without CUDA): realistic vocabularies in every logit dtype against the reference,
CUDA-graph capture, and the cpu C++ backend agreeing with the GPU backends on the same inputs."""
import pytest
import torch
from conftest import make_case

from tempspec_engine import available_backends, speculative_sample
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
