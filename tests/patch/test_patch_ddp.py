"""apply_llmkern_kernels on a model wrapped by llmkern's DDP (2 gloo ranks): the patch is per module, so
it goes through the wrapper, and two steps on half batches give the gradients and parameters of one
process training the patched model on the whole batch."""
import pytest
import torch

from llmkern.testing import run_distributed

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
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_model

    from llmkern.parallel import DistributedDataParallel
    from llmkern.patch import apply_llmkern_kernels

    ddp = DistributedDataParallel(make_model("llama"))
    report = apply_llmkern_kernels(ddp)  # patched through the wrapper
    assert "fused_linear_cross_entropy" in report.patched
    half = ids.shape[0] // world
    rows = slice(rank * half, (rank + 1) * half)
    losses = _train(ddp, ids[rows], labels[rows], STEPS)
    return torch.stack(losses), {n: p.detach().clone() for n, p in ddp.module.named_parameters()}


@pytest.mark.distributed
def test_patched_model_under_ddp():
    from conftest import make_model

    from llmkern.patch import apply_llmkern_kernels

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 97, (4, 12), generator=g)
    labels = ids.clone()  # every row has T - 1 predicted tokens: the per-rank means average to the global mean
    results = run_distributed(_rank, 2, (ids, labels), timeout=300)
    single = make_model("llama")
    apply_llmkern_kernels(single)
    want_losses = _train(single, ids, labels, STEPS)
    rank_losses = torch.stack([r[0] for r in results])  # (ranks, steps): each rank's half-batch loss
    torch.testing.assert_close(rank_losses.mean(0)[0], want_losses[0], rtol=1e-5, atol=0)
    for name, p in single.named_parameters():
        for _, params in results:
            torch.testing.assert_close(params[name], p.detach(), rtol=1e-4, atol=1e-6, msg=name)
