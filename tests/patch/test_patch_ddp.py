"""apply_llmkern_kernels on a model wrapped by llmkern's DDP (2 gloo ranks): the patch is per module, so
it goes through the wrapper, and two steps on half batches give the gradients and parameters of one
process training the patched model on the whole batch."""
import pytest
import torch

from llmkern.testing import run_distributed


def _make_model(arch):
    """tests/patch/conftest.py's make_model, loaded by path: `from conftest import ...` inside a test or
    a rank gets whichever conftest.py was imported last under that name (in the whole suite,
    tests/peft's, whose make_model builds another model: the ranks then indexed past its vocabulary)."""
    import importlib.util
    import sys
    from pathlib import Path
    name = "_llmkern_tests_patch_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("conftest.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].make_model(arch)

pytest.importorskip("transformers")

STEPS = 2


def _train(model, ids, labels, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _rank(rank, world, ids, labels):
    from llmkern.parallel import DistributedDataParallel
    from llmkern.patch import apply_llmkern_kernels

    ddp = DistributedDataParallel(_make_model("llama"))
    report = apply_llmkern_kernels(ddp)  # patched through the wrapper
    assert "fused_linear_cross_entropy" in report.patched
    half = ids.shape[0] // world
    rows = slice(rank * half, (rank + 1) * half)
    losses = _train(ddp, ids[rows], labels[rows], STEPS)
    return torch.stack(losses), {n: p.detach().clone() for n, p in ddp.module.named_parameters()}


@pytest.mark.distributed
def test_patched_model_under_ddp():
    from llmkern.patch import apply_llmkern_kernels

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 97, (4, 12), generator=g)
    labels = ids.clone()  # every row has T - 1 predicted tokens: the per-rank means average to the global mean
    results = run_distributed(_rank, 2, (ids, labels), timeout=300)
    single = _make_model("llama")
    apply_llmkern_kernels(single)
    want_losses = _train(single, ids, labels, STEPS)
    rank_losses = torch.stack([r[0] for r in results])  # (ranks, steps): each rank's half-batch loss
    torch.testing.assert_close(rank_losses.mean(0)[0], want_losses[0], rtol=1e-5, atol=0)
    for name, p in single.named_parameters():
        for _, params in results:
            torch.testing.assert_close(params[name], p.detach(), rtol=1e-4, atol=1e-6, msg=name)
