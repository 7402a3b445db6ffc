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


def tiny_lora_llama(dropout: float):
    transformers = pytest.importorskip("transformers")
    from llmkern.peft import LoraConfig, apply_lora
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    model = transformers.LlamaForCausalLM(cfg)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"]))
    with torch.no_grad():  # a non-zero B, as after some training, so dropout shows in the output
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.1)
    return model.train()


def test_compiled_llama_with_lora_dropout_has_no_graph_breaks():
    """The dropout seed is drawn as a tensor (no Tensor.item()): a one-layer Llama with 7 LoRA layers at
    p = 0.05 is one graph (each LoRA layer broke the graph when the seed was drawn with .item())."""
    model = tiny_lora_llama(0.05)
    ids = torch.randint(1, 64, (2, 9))
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_lora_dropout_matches_eager_for_the_same_seed():
    """fullgraph compile (AOTAutograd, eager kernels) equals eager for the same torch.manual_seed, output
    and gradients: the seed is the same draw of the CPU generator, and backward regenerates the mask."""
    _, mod = trained_lora(dropout=0.3)
    mod.train()
    x = torch.randn(5, 7, 96)

    def step(m):
        torch.manual_seed(123)
        y = m(x)
        y.square().sum().backward()
        grads = [p.grad.clone() for p in (m.lora_A.weight, m.lora_B.weight)]
        m.zero_grad()
        return y.detach(), grads

    y_eager, g_eager = step(mod)
    y_comp, g_comp = step(torch.compile(mod, fullgraph=True, backend="aot_eager"))
    assert torch.equal(y_eager, y_comp)
    assert all(torch.equal(a, b) for a, b in zip(g_eager, g_comp))
    torch.manual_seed(124)
    assert not torch.equal(mod(x), y_eager)  # another seed, another mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_under_autocast_matches_peft_under_autocast(dtype):
    """LoRALinear with fp32 weights under torch.autocast runs in the autocast dtype as PEFT's LoRA
    layer (nn.Linear math) does under the same autocast; both against fp64 on the cast inputs."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    lin = nn.Linear(96, 80)
    theirs = peft.tuners.lora.Linear(nn.Linear(96, 80), "default", peft.LoraConfig(r=8, lora_alpha=16), r=8,
                                     lora_alpha=16)
    theirs.base_layer.load_state_dict(lin.state_dict())
    ours = LoRALinear.from_linear(lin, r=8, alpha=16)
    with torch.no_grad():
        ours.lora_B.weight.normal_(0, 0.1)
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(5, 7, 96)
    with torch.autocast("cpu", dtype=dtype):
        got, base = ours(x), theirs(x)
    assert got.dtype == base.dtype == dtype
    low = [t.detach().to(dtype).double() for t in (x, lin.weight, lin.bias, ours.lora_A.weight, ours.lora_B.weight)]
    assert_close_to_ref(got, lora_linear_ref(*low, ours.scale), base, name="y",
                        cond=lora_linear_ref(*[t.abs() for t in low], ours.scale))
