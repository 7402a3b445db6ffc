"""What the fused-op tests (rms_norm, layer_norm, swiglu, rope, cross_entropy,
fused_linear_cross_entropy) share: their backend parameters and the one-thread fixture."""
import pytest
import torch


def backend_params(unavailable, only=None):
    """pytest params of the backends an op runs on; `unavailable` is the op module's UNAVAILABLE."""
    out = [pytest.param("cpu", id="cpu"),
           pytest.param("triton", id="triton", marks=pytest.mark.skipif("triton" in unavailable,
                                                                        reason=unavailable.get("triton", ""))),
           pytest.param("ref", id="ref"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
    return [p for p in out if only is None or p.id in only]


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: intra-op threads cost more than they give on the shared 2-core machines (the
    partial sums of several threads run in test_two_threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
