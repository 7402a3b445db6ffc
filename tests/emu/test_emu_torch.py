"""An emulated .cu built into a torch extension with g++ (as llmkern._C_emu is): results on CPU tensors,
and a kernel error reaching Python as a RuntimeError that names the kernel."""
import pytest
import torch

from emu_build import torch_ops_extension


@pytest.fixture(scope="module")
def ops(program):  # `program` skips the module where g++ or the CUDA headers are missing
    return torch_ops_extension()


def reference(x, a):
    y = (a * x.float()).view(-1, 128).flip(1).reshape(-1)
    return y.to(x.dtype)


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random:3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_op_matches_reference(ops, monkeypatch, schedule, dtype):
    monkeypatch.setenv("LLMKERN_EMU_SCHEDULE", schedule)  # read at each launch
    x = torch.randn(128 * 5, dtype=dtype)
    torch.testing.assert_close(ops.scale_reverse(x, 1.5), reference(x, 1.5))


def test_kernel_error_is_a_runtime_error_and_the_next_launch_works(ops):
    with pytest.raises(RuntimeError, match=r"kernel 'divergent_kernel'.*divergent barrier"):
        ops.divergent(torch.zeros(1))
    x = torch.randn(256)
    torch.testing.assert_close(ops.scale_reverse(x, -2.0), reference(x, -2.0))
    with pytest.raises(RuntimeError, match="divergent_kernel"):
        ops.divergent(torch.zeros(1))
