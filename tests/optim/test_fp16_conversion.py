"""The CPU kernels' fp16 conversions (csrc/include/llmkern/cpu_float.h: F16C/AVX-512 instructions for
whole vectors, integer code for the tails) are bit-exact against torch's own conversions, for every
fp16 value and for fp32 values at the rounding boundaries. Checked through fused_sgd_, whose update
with p = 0, lr = 1 is exactly -g, and with lr = 0 leaves the fp32 master as it was."""
import pytest
import torch

from llmkern.ops.fused_sgd import UNAVAILABLE, fused_sgd_

pytestmark = pytest.mark.skipif("cpu" in UNAVAILABLE, reason=UNAVAILABLE.get("cpu", ""))


def _sgd(master: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    copy = torch.empty(master.shape, dtype=torch.float16)
    fused_sgd_([master], [grad], [], [copy], torch.ones(()), torch.zeros(()), torch.ones(()), lr=lr, backend="cpu")
    return copy


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.float16 else t.view(torch.int32)


@pytest.mark.parametrize("offset", [0, 3])  # 3: the vector loop starts off its 16-element alignment
def test_every_fp16_gradient_loads_exactly(offset):
    g = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    g = g[torch.isfinite(g)][offset:].contiguous()  # 63488 finite values, subnormals included
    master = torch.zeros(g.numel())
    copy = _sgd(master, g, lr=1.0)
    want = torch.zeros(g.numel()) - g.float()  # 0 - g, so +0 stays +0 as in the kernel's p - lr·g
    assert torch.equal(_bits(master), _bits(want)), "fp16 -> fp32 loads differ from torch's"
    assert torch.equal(_bits(copy), _bits(want.half())), "fp32 -> fp16 stores of representable values differ"


def test_fp32_masters_round_to_fp16_like_torch():
    h = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    mids = (h[:-1] + h[1:]) / 2  # ties: round to nearest even
    above, below = torch.nextafter(mids, torch.tensor(float("inf"))), torch.nextafter(mids, torch.tensor(0.0))
    # (no inf master: the update reads 0 · p, which is nan for p = inf)
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 1e6, 2.0 ** -24, 2.0 ** -25,
                          2.0 ** -26, 3 * 2.0 ** -26, 1e-30, 0.0])
    x = torch.cat([h, mids, above, below, edges])
    x = torch.cat([x, -x, torch.randn(10001) * 1000])
    copy = _sgd(x.clone(), torch.zeros_like(x), lr=0.0)
    assert torch.equal(_bits(copy), _bits(x.half())), "fp32 -> fp16 rounding differs from torch's"
    nan = _sgd(torch.full((37,), float("nan")), torch.zeros(37), lr=0.0)
    assert torch.isnan(nan).all()
