"""An emulated .cu built into a torch extension with g++ (as llmkern._C_emu is): results on CPU tensors,
and a kernel error reaching Python as a RuntimeError that names the kernel."""
import os

import pytest
import torch

from emu_build import BASE_FLAGS, CACHE, INCLUDES, KERNELS, _digest


@pytest.fixture(scope="module")
def ops(program):  # `program` skips the module where g++ or the CUDA headers are missing
    from torch.utils.cpp_extension import load

    source = KERNELS / "torch_ops.cu"
    build_dir = CACHE / f"torch_ops-{_digest(source, BASE_FLAGS)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # A .cu source would be handed to nvcc: compile it as C++ through a one-line wrapper, as setup.py does.
    wrapper = build_dir / "torch_ops_emu.cpp"
    text = f'#include "{source}"\n'
    if not wrapper.exists() or wrapper.read_text() != text:  # a new mtime would make ninja rebuild
        wrapper.write_text(text)
    os.environ.setdefault("MAX_JOBS", "1")
    load(
        name="cuemu_torch_ops",
        sources=[str(wrapper)],
        extra_include_paths=[str(p) for p in INCLUDES[:4]],  # torch's own come from load()
        extra_cflags=["-O2", "-DLLMKERN_EMU=1", *BASE_FLAGS[1:]],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.cuemu_test


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
