"""apply_adapters (series Houlsby / parallel He et al.) on tiny models."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, logits, make_model
from torch import nn

import llmkern.peft as lp
from llmkern.nn import Adapter, ParallelAdapter
from llmkern.testing import assert_close_to_ref


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


_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}


def _plain_adapters(base: nn.Module, adapted: nn.Module, paths: list[str], form: str, dtype: torch.dtype):
    """A copy of `base` in `dtype` whose sublayers at `paths` get the adapters of `adapted` (same
    weights) rebuilt from plain torch modules and run in plain forward hooks: the reference that
    shares no code with llmkern. Returns the model and {llmkern parameter name: reference parameter}."""
    ref = copy.deepcopy(base).to(dtype).requires_grad_(False)
    params = {}
    for n in paths:
        ad = adapted.get_submodule(n).llmkern_adapter
        c, r = ad.down.in_features, ad.down.out_features
        mods = {"down": nn.Linear(c, r), "act": _ACT[ad.activation](), "up": nn.Linear(r, c)}
        if ad.ln is not None:
            mods = {"ln": nn.LayerNorm(c, eps=ad.ln.eps), **mods}
        seq = nn.Sequential(*mods.values()).to(dtype)
        with torch.no_grad():
            for name, m in mods.items():
                for pn, p in m.named_parameters():
                    p.copy_(getattr(getattr(ad, name), pn))
                    params[f"{n}.llmkern_adapter.{name}.{pn}"] = p
        def hook(mod, args, out, seq=seq, s=ad.scale, series=form == "series"):
            return out + s * seq(out if series else args[0])
        ref.get_submodule(n).register_forward_hook(hook)
        ref.get_submodule(n).add_module("reference_adapter", seq)
    return ref, params


DRAWS = 4
"""Seeds per comparison. One draw of a whole tiny model is too few numbers to judge by: with one
seed, PyTorch's own bf16 error on a parameter's gradient is sometimes far below its usual size, and
an adapter computed exactly in fp32 then rounded once (an ideal kernel) measured 3.6x (BERT) of it;
the BERT logits (2 x 2 numbers) 4.1x. So each comparison is over 4 seeds (the errors are maxima over
all of them), 6 x 9 tokens, and each gradient kind (``down.weight``, ...) across all adapted layers.
Measured over 8 such groups of seeds: at most 1.6x of PyTorch's error for logits (2x allowed) and
2.0x for gradients (3x allowed), fp32 and bf16 alike."""


def _compare(arch: str, form: str, activation: str, layer_norm: bool, dtype: torch.dtype,
             planted_scale_error: float = 0.0) -> None:
    """Logits and adapter gradients of llmkern's adapted model against an fp64 model with the same
    adapters written as plain torch modules, under the 2x/3x rule (plain PyTorch in `dtype` is the
    baseline). `planted_scale_error` puts a relative error into llmkern's adapter scale, to show
    that the comparison catches one."""
    runs = {"ours": [], "oracle": [], "plain": []}
    for seed in range(DRAWS):
        torch.manual_seed(seed)
        base = make_model(arch)
        ours = copy.deepcopy(base).to(dtype)
        rep = lp.apply_adapters(ours, lp.AdapterConfig(bottleneck=7, form=form, activation=activation, scale=0.7,
                                                       layer_norm=layer_norm))
        with torch.no_grad():  # a fresh adapter is the identity (up = 0): give every parameter a value
            for n, p in lp.trainable_parameters(ours).items():
                p.copy_(torch.randn_like(p, dtype=torch.float32) * 0.3 + (1.0 if ".ln.weight" in n else 0.0))
        oracle, oracle_params = _plain_adapters(base, ours, rep.replaced, form, torch.float64)
        plain, plain_params = _plain_adapters(base, ours, rep.replaced, form, dtype)
        ours_params = lp.trainable_parameters(ours)
        assert set(oracle_params) == set(ours_params)
        for n in rep.replaced:
            ours.get_submodule(n).llmkern_adapter.scale *= 1.0 + planted_scale_error
        x = batch(arch, b=6, t=9)
        w = None
        for name, model, params in (("ours", ours, ours_params), ("oracle", oracle, oracle_params),
                                    ("plain", plain, plain_params)):
            out = model(**x).logits
            w = torch.randn(out.shape).to(dtype) if w is None else w  # d loss / d logits, exact in every dtype
            (out * w.to(out.dtype)).sum().backward()
            record = {"logits": out.detach()}
            for n in sorted(params):
                kind = n.split("llmkern_adapter.")[-1]
                record[kind] = torch.cat([record.get(kind, out.new_empty(0)), params[n].grad.flatten()])
            runs[name].append(record)
    for key in runs["ours"][0]:
        actual, ref, baseline = (torch.stack([r[key] for r in runs[name]]) for name in ("ours", "oracle", "plain"))
        assert_close_to_ref(actual, ref, baseline, grad=key != "logits", name=f"{arch} {form} {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch,form,activation,layer_norm", [
    ("llama", "series", "gelu_tanh", False), ("llama", "parallel", "silu", True), ("gpt2", "series", "gelu", True),
    ("gpt2", "parallel", "silu", False), ("bert", "series", "gelu", False)])
def test_adapter_values_and_gradients_against_plain_pytorch(arch, form, activation, layer_norm, dtype):
    """Smooth activations only: a ReLU pre-activation near 0 flips between two valid roundings and
    makes the comparison of whole models chaotic (48x on one seed, for our kernel and an exact-fp32
    one alike). ReLU is checked op by op in tests/ops."""
    _compare(arch, form, activation, layer_norm, dtype)


@pytest.mark.parametrize("dtype,error", [(torch.float32, 2.0**-14), (torch.bfloat16, 2.0**-5)])
def test_adapter_comparison_catches_a_planted_scale_error(dtype, error):
    """The check above can fail: a relative error of 2^-14 (fp32) or 2^-5 (bf16, 4 eps) in the
    adapter's scale is caught."""
    with pytest.raises(AssertionError, match="too far from the fp64 oracle"):
        _compare("llama", "series", "gelu_tanh", False, dtype, planted_scale_error=error)
