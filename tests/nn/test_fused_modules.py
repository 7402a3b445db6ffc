"""The llmkern.nn modules over the fused ops: state dicts compatible with transformers' modules, and the
same results as the ops (whose numerics tests/ops checks against the fp64 oracle)."""
import pytest
import torch

from llmkern.nn import CrossEntropyLoss, FusedLinearCrossEntropyLoss, GatedMLP, LayerNorm, RMSNorm
from llmkern.ops import cross_entropy, fused_linear_cross_entropy, layer_norm_ref, rms_norm_ref, swiglu_ref
from llmkern.testing import assert_close_to_ref


@pytest.mark.parametrize("convention", ["llama", "gemma"])
def test_rms_norm_module_loads_hf_weights_and_fuses_the_residual(convention):
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = (LlamaRMSNorm if convention == "llama" else GemmaRMSNorm)(48, eps=1e-5)
    torch.nn.init.normal_(hf.weight, 0.3, 0.2)
    ours = RMSNorm(48, eps=1e-5, convention=convention)
    assert torch.equal(ours.weight, torch.ones(48) if convention == "llama" else torch.zeros(48))  # HF's init
    ours.load_state_dict(hf.state_dict())
    x, r = torch.randn(5, 48), torch.randn(5, 48)
    y, s = ours(x, r)
    ref_y, ref_s = rms_norm_ref(x.double(), hf.weight.double(), 1e-5, residual=r.double(), convention=convention)
    assert_close_to_ref(y, ref_y, hf(x + r).detach())
    assert torch.equal(s, x + r)
    del transformers


def test_layer_norm_module_is_nn_layer_norm():
    ours, theirs = LayerNorm(40, bias=False), torch.nn.LayerNorm(40, bias=False)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"weight"}
    torch.nn.init.normal_(ours.weight, 1.0, 0.1)
    x = torch.randn(3, 7, 40)
    assert_close_to_ref(ours(x), layer_norm_ref(x.double(), ours.weight.double()),
                        torch.nn.functional.layer_norm(x, (40,), ours.weight.detach()))
    with pytest.raises(ValueError, match="only the last dimension"):
        LayerNorm((4, 40))


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_gated_mlp(activation):
    mlp = GatedMLP(32, 80, activation)
    assert set(mlp.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}  # LlamaMLP's keys
    x = torch.randn(4, 32)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    if activation == "silu":
        mid = swiglu_ref(gate, up)
    else:
        mid = torch.nn.functional.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none") * up
    torch.testing.assert_close(mlp(x), mlp.down_proj(mid))
    with pytest.raises(ValueError, match="activation must be one of"):
        GatedMLP(8, 8, "relu")


def test_losses():
    logits, labels = torch.randn(6, 50), torch.randint(0, 50, (6,))
    assert torch.equal(CrossEntropyLoss(label_smoothing=0.1)(logits, labels),
                       cross_entropy(logits, labels, label_smoothing=0.1))
    hidden, weight = torch.randn(6, 16), torch.randn(50, 16)
    loss = FusedLinearCrossEntropyLoss(reduction="sum", max_chunk_bytes=2 * 50 * 4)(hidden, weight, labels)
    torch.testing.assert_close(loss, fused_linear_cross_entropy(hidden, weight, labels, reduction="sum"))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, reduction="sum"))
