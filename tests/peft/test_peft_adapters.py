"""apply_adapters (series Houlsby / parallel He et al.) on tiny models."""
from __future__ import annotations

import pytest
import torch
from conftest import batch, logits, make_model

import llmkern.peft as lp
from llmkern.nn import Adapter, ParallelAdapter


@pytest.mark.parametrize("arch,form", [("llama", "series"), ("gpt2", "series"), ("bert", "series"),
                                       ("llama", "parallel"), ("gpt2", "parallel")])
def test_adapters_train_only_adapter_params(arch, form, tiny):
    model, base = tiny(arch)
    rep = lp.apply_adapters(model, lp.AdapterConfig(bottleneck=8, form=form, activation="gelu_tanh"))
    assert len(rep.replaced) == (4 if form == "series" else 2), rep
    cls = Adapter if form == "series" else ParallelAdapter
    assert sum(isinstance(m, cls) for m in model.modules()) == len(rep.replaced)
    x = batch(arch)
    torch.testing.assert_close(logits(model, x), logits(base, x))  # up = 0: a fresh adapter changes nothing
    assert set(model.state_dict()) >= set(base.state_dict())  # base keys did not move
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    labels = torch.full_like(x["input_ids"], 5) if arch != "bert" else torch.tensor([1, 1])
    opt = torch.optim.Adam(lp.trainable_parameters(model).values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(**x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(lp.trainable_parameters(model)) and all("llmkern_adapter" in n for n in changed)
    assert losses[-1] < 0.9 * losses[0], losses
    model.eval()
    assert not torch.allclose(logits(model, x), logits(base, x))
    with lp.disable_adapters(model):
        torch.testing.assert_close(logits(model, x), logits(base, x))
    with pytest.raises(ValueError, match="cannot be merged"):
        lp.merge_and_unload(model)


def test_adapters_bad_input():
    with pytest.raises(ValueError, match="bottleneck must be a positive int"):
        lp.AdapterConfig(bottleneck=0)
    with pytest.raises(ValueError, match="no default parallel targets for 'bert'"):
        lp.apply_adapters(make_model("bert"), lp.AdapterConfig(form="parallel"))
    with pytest.raises(ValueError, match="'nope' matches no module"):
        lp.apply_adapters(make_model("llama"), lp.AdapterConfig(target_modules=["nope"]))
