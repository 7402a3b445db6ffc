"""LoRALinear: construction, init, merge parity, PEFT key/shape parity, modes, bad input."""
import math

import pytest
import torch
from torch import nn

from llmkern.nn import LoRALinear
from llmkern.ops import lora_linear_ref
from llmkern.testing import assert_close_to_ref


def trained_lora(dtype=torch.float32, bias=True, r=8, alpha=16.0, dropout=0.0):
    torch.manual_seed(0)
    base = nn.Linear(96, 80, bias=bias).to(dtype)
    mod = LoRALinear.from_linear(base, r=r, alpha=alpha, dropout=dropout)
    with torch.no_grad():  # a non-zero B, as after some training
        mod.lora_B.weight.copy_(torch.randn_like(mod.lora_B.weight) * 0.1)
    return base, mod


def test_from_linear_shares_frozen_weight():
    base, mod = trained_lora()
    assert mod.weight is base.weight and mod.bias is base.bias
    assert not mod.weight.requires_grad and not mod.bias.requires_grad
    assert mod.lora_A.weight.requires_grad and mod.lora_B.weight.requires_grad
    assert [n for n, p in mod.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


def test_init_is_a_noop_and_kaiming():
    torch.manual_seed(1)
    base = nn.Linear(64, 32)
    mod = LoRALinear.from_linear(base, r=4, alpha=8)
    x = torch.randn(5, 64)
    torch.testing.assert_close(mod(x), base(x), rtol=0, atol=0)
    assert torch.count_nonzero(mod.lora_B.weight) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=√5) on (R, C_in)
    assert mod.lora_A.weight.abs().max() <= bound and mod.lora_A.weight.abs().max() > 0.5 * bound


def test_scale_and_rslora():
    base = nn.Linear(8, 8)
    assert LoRALinear.from_linear(base, r=4, alpha=16).scale == 4.0
    assert LoRALinear.from_linear(base, r=4, alpha=16, use_rslora=True).scale == 8.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_matches_ref(dtype):
    _, mod = trained_lora(dtype)
    x = torch.randn(3, 7, 96).to(dtype)
    args = (mod.weight, mod.bias, mod.lora_A.weight, mod.lora_B.weight, mod.scale)
    ref = lora_linear_ref(x.double(), *(t.double() for t in args[:4]), mod.scale)
    assert_close_to_ref(mod(x), ref, lora_linear_ref(x, *args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_unmerge(dtype):
    _, mod = trained_lora(dtype)
    w0 = mod.weight.detach().clone()
    x = torch.randn(4, 96).to(dtype)
    y_unmerged = mod(x)
    mod.merge()
    assert mod.merged and "merged=True" in repr(mod)
    y_merged = mod(x)
    # Merged vs unmerged: the fp64 truth is the same function; both must be close to it.
    d = [t.double() for t in (mod.lora_A.weight, mod.lora_B.weight)]
    ref = lora_linear_ref(x.double(), w0.double(), mod.bias.double(), *d, mod.scale)
    baseline = lora_linear_ref(x, w0, mod.bias, mod.lora_A.weight, mod.lora_B.weight, mod.scale)
    assert_close_to_ref(y_merged, ref, baseline)
    assert_close_to_ref(y_unmerged, ref, baseline)
    mod.unmerge()
    # Unmerge restores W up to the rounding of W + ΔW and of the subtraction: ≤ 1 ulp of |W|+|ΔW|.
    delta = mod._delta_weight()
    eps = torch.finfo(dtype).eps
    bound = eps * (w0.double().abs() + delta.double().abs())
    assert ((mod.weight.double() - w0.double()).abs() <= bound).all()
    assert not mod.merged


def test_state_dict_keys_match_peft():
    peft = pytest.importorskip("peft")

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(24, 16)

    ours = One()
    ours.proj = LoRALinear.from_linear(ours.proj, r=4, alpha=8)
    theirs = peft.get_peft_model(One(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    peft_sd = peft.get_peft_model_state_dict(theirs)  # the adapter file's keys
    assert {k.removeprefix("base_model.model.") for k in peft_sd} == {"proj.lora_A.weight", "proj.lora_B.weight"}
    ours_sd = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {
        k.removeprefix("base_model.model."): tuple(v.shape) for k, v in peft_sd.items()}
    assert set(ours.state_dict()) == {"proj.weight", "proj.bias", "proj.lora_A.weight", "proj.lora_B.weight"}


def test_logits_match_peft_with_same_weights():
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    lin = nn.Linear(24, 16)
    cfg = peft.LoraConfig(r=4, lora_alpha=8)
    theirs = peft.tuners.lora.Linear(nn.Linear(24, 16), "default", cfg, r=4, lora_alpha=8)
    theirs.base_layer.load_state_dict(lin.state_dict())
    ours = LoRALinear.from_linear(lin, r=4, alpha=8)
    with torch.no_grad():
        ours.lora_B.weight.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), theirs(x))


def test_dropout_only_in_training_and_fresh_per_call():
    _, mod = trained_lora(dropout=0.5)
    x = torch.randn(8, 96)
    mod.train()
    torch.manual_seed(0)
    y1 = mod(x)
    y2 = mod(x)
    torch.manual_seed(0)
    y1_again = mod(x)
    assert not torch.equal(y1, y2) and torch.equal(y1, y1_again)
    mod.eval()
    assert torch.equal(mod(x), mod(x))


def test_disabled_runs_base_only():
    base, mod = trained_lora()
    x = torch.randn(2, 96)
    mod.disabled = True
    torch.testing.assert_close(mod(x), base(x), rtol=0, atol=0)


def test_backward_trains_only_adapters():
    _, mod = trained_lora(dropout=0.1)
    x = torch.randn(6, 96, requires_grad=True)
    mod(x).square().sum().backward()
    assert mod.weight.grad is None and mod.bias.grad is None
    assert mod.lora_A.weight.grad is not None and mod.lora_B.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("kw,msg", [({"r": 0}, "r must be >= 1"), ({"r": 2, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
                                    ({"r": 2, "dropout": -0.1}, r"dropout must be in \[0, 1\)")])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        LoRALinear.from_linear(nn.Linear(4, 4), **kw)
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(4, 4, 1), r=2)


def test_constructor_and_repr():
    mod = LoRALinear(10, 6, r=2, alpha=4, dropout=0.1, bias=False)
    assert mod.bias is None and mod.weight.shape == (6, 10)
    assert "r=2" in repr(mod) and "alpha=4" in repr(mod) and "dropout=0.1" in repr(mod)
