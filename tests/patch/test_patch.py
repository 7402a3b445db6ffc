"""apply_llmkern_kernels on tiny models of every supported architecture: logits, loss and gradients
against the unpatched model (the fp64 model as the oracle, the 2x/3x rule), the report, revert, PEFT
and llmkern.peft wrappers, and 30 training steps patched vs unpatched."""
import copy
import gc
import importlib
import types
import warnings

import pytest
import torch

from llmkern.patch import ARCHITECTURES, apply_llmkern_kernels, revert
from llmkern.testing import assert_close_to_ref

from conftest import ARCHS, batch, make_model  # noqa: I001 (tests/patch/conftest.py)

pytest.importorskip("transformers")


def fp64_causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                        **kwargs):
    """transformers' ForCausalLMLoss without its ``logits.float()``: the oracle model's loss stays in fp64."""
    from llmkern.ops.cross_entropy import cross_entropy_ref

    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return cross_entropy_ref(logits, shift_labels, ignore_index=ignore_index)


def oracle(arch):
    """The model in fp64 with an fp64 loss: the reference of the 2x/3x rule."""
    model = make_model(arch, dtype=torch.float64)
    model.loss_function = fp64_causal_lm_loss
    return model


def logits_and_loss(model, ids, labels):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    return out.logits, out.loss


def train_loss_and_grads(model, ids, labels):
    """One training-mode forward/backward: the loss and every parameter's gradient, by name."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_loss_close(ours, ref, base, logits_err, name):
    """A loss is one number: the 2x rule against PyTorch's error on it compares with one draw, which can
    land near the oracle by luck (the unpatched bf16 loss was 9e-4 off where the patched one was 2e-3,
    with logits as close to the oracle on both sides). Per token, |Δ(lse - x_y)| <= 2·max|Δlogits|, so
    the allowance is twice the larger of PyTorch's loss error and that bound from its logits error."""
    ours, ref, base = (float(x.detach()) for x in (ours, ref, base))
    err, base_err = abs(ours - ref), abs(base - ref)
    allowed = 2 * max(base_err, 2 * logits_err) + 2 * torch.finfo(torch.float32).eps * abs(ref)
    assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g} (PyTorch's loss error {base_err:.3g}, " \
                           f"its logits error {logits_err:.3g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_matches_unpatched(arch, dtype):
    """Eval: logits and loss; train: the loss and every parameter gradient (with the fused linear
    cross-entropy, which returns no logits). The patched model in dtype is judged against the fp64
    model by the error the unpatched model makes in the same dtype."""
    ids, labels = batch()
    ref = oracle(arch)
    base = make_model(arch, dtype=dtype)
    ours = make_model(arch, dtype=dtype)
    report = apply_llmkern_kernels(ours)
    assert report.architecture == arch
    r, b, o = (logits_and_loss(m, ids, labels) for m in (ref, base, ours))
    assert_close_to_ref(o[0], r[0], b[0], name=f"{arch} logits")
    logits_err = float((b[0].double() - r[0]).abs().max())
    assert_loss_close(o[1], r[1], b[1], logits_err, f"{arch} eval loss")
    (ro, rg), (bo, bg), (oo, og) = (train_loss_and_grads(m, ids, labels) for m in (ref, base, ours))
    assert oo.logits is None and bo.logits is not None  # the fused head: no (B, T, V) logits in training
    assert_loss_close(oo.loss, ro.loss, bo.loss, logits_err, f"{arch} train loss")
    assert set(og) == set(bg)
    for name in bg:
        assert_close_to_ref(og[name], rg[name], bg[name], grad=True, name=f"{arch} grad {name}")


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_autocast_bf16(arch):
    """An fp32 model under torch.autocast("cpu", bf16), as Trainer(bf16=True) runs it: the projections
    give bf16 q and k while the rotary module's cos/sin stay fp32, and transformers computes the rotation
    in fp32. The patched model runs every fused kernel (no fallback warning) and its loss and gradients
    are judged against the fp64 model by the error the unpatched model makes under the same autocast."""
    ids, labels = batch()
    ref = oracle(arch)
    base = make_model(arch)
    ours = make_model(arch)
    apply_llmkern_kernels(ours)
    ro, rg = train_loss_and_grads(ref, ids, labels)
    with torch.autocast("cpu", torch.bfloat16):
        bo, bg = train_loss_and_grads(base, ids, labels)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="llmkern.patch")
            oo, og = train_loss_and_grads(ours, ids, labels)
    assert oo.loss.dtype == bo.loss.dtype == torch.float32
    assert_loss_close(oo.loss, ro.loss, bo.loss, 0.0, f"{arch} autocast loss")
    assert set(og) == set(bg)
    for name in bg:
        assert og[name].dtype == bg[name].dtype
        assert_close_to_ref(og[name], rg[name], bg[name], grad=True, name=f"{arch} autocast grad {name}")


@pytest.mark.parametrize("arch", ARCHS)
def test_report_and_revert(arch):
    model = make_model(arch)
    twin = copy.deepcopy(model)
    ids, labels = batch()
    before = logits_and_loss(model, ids, labels)
    report = apply_llmkern_kernels(model)
    text = str(report)
    if arch == "gpt2":
        assert set(report.patched) == {"layer_norm", "cross_entropy", "fused_linear_cross_entropy"}
        assert "not gated" in report.skipped["swiglu"] and "learned absolute" in report.skipped["rope"]
        assert len(report.patched["layer_norm"]) == 5  # ln_1, ln_2 of 2 blocks and ln_f
    else:
        assert set(report.patched) == {"rms_norm", "swiglu", "rope", "cross_entropy", "fused_linear_cross_entropy"}
        norms = 5 + (4 if arch == "qwen3" else 0)  # 2 per layer + final (+ Qwen3's q_norm/k_norm)
        assert len(report.patched["rms_norm"]) == norms and len(report.patched["swiglu"]) == 2
        assert len(report.patched["rope"]) == 2 and "LayerNorm" in report.skipped["layer_norm"]
    assert "patched" in text and arch in text
    # the unpatched twin of the same class is unaffected (per-instance patching, thread-local RoPE dispatch)
    torch.testing.assert_close(logits_and_loss(twin, ids, labels), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already patched"):
        apply_llmkern_kernels(model)
    reverted = revert(model)
    assert reverted
    for m in model.modules():
        assert "forward" not in m.__dict__ and "_llmkern_patch" not in m.__dict__
        assert "_loss_function" not in m.__dict__
    if ARCHITECTURES[arch].attention:
        # The RoPE dispatcher stays installed exactly as long as some patched attention module is alive
        # (other tests' models may be); this model's modules are no longer among them.
        from llmkern.patch.apply import _rope_users
        gc.collect()
        users = _rope_users[ARCHITECTURES[arch].modeling]
        assert not set(model.modules()) & set(users)
        modeling = importlib.import_module(ARCHITECTURES[arch].modeling)
        assert isinstance(modeling.apply_rotary_pos_emb, types.FunctionType) == (len(users) == 0)
    after = logits_and_loss(model, ids, labels)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_unknown_architecture():
    with pytest.raises(ValueError, match=r"supported transformers architectures \['gemma', 'gpt2', 'llama'"):
        apply_llmkern_kernels(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_select_kernels_and_lora_head():
    """Flags turn kernels off (reported as "not asked for"); a head wrapped by an adapter is not fused."""
    model = make_model("llama")
    report = apply_llmkern_kernels(model, rope=False, swiglu=False)
    assert report.skipped["rope"] == "not asked for" and "rope" not in report.patched
    revert(model)
    from llmkern.nn import LoRALinear
    model.lm_head = LoRALinear.from_linear(model.lm_head, r=4)
    report = apply_llmkern_kernels(model)
    assert "fused_linear_cross_entropy" not in report.patched
    assert "not a plain nn.Linear" in report.skipped["fused_linear_cross_entropy"]
    assert "cross_entropy" in report.patched


@pytest.mark.parametrize("wrapper", ["peft", "llmkern.peft"])
def test_lora_wrapped_model(wrapper):
    """A LoRA model (PEFT's get_peft_model or llmkern.peft.apply_lora) patched after wrapping: same loss
    and LoRA gradients as the unpatched LoRA model, in fp32, and only the adapters get gradients."""
    ids, labels = batch()
    models = []
    for _ in range(2):
        m = make_model("llama")
        if wrapper == "peft":
            peft = pytest.importorskip("peft")
            m = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
        else:
            from llmkern.peft import LoraConfig, apply_lora
            apply_lora(m, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.1)
        models.append(m)
    models[1].load_state_dict(models[0].state_dict())
    report = apply_llmkern_kernels(models[1])
    assert "fused_linear_cross_entropy" in report.patched and "rms_norm" in report.patched
    (o0, g0), (o1, g1) = (train_loss_and_grads(m, ids, labels) for m in models)
    assert set(g0) == set(g1) and all("lora" in n for n in g1)
    torch.testing.assert_close(o1.loss, o0.loss, rtol=1e-5, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


# 30 AdamW steps (lr 1e-3) of a tiny Llama on a fixed batch, patched and unpatched, as Liger's convergence
# test. The runs differ only by rounding (the fused kernels round once where eager rounds several times),
# which the steps carry forward. Measured here (llama, 4x16 tokens): the largest relative difference of a
# step's loss was 1.2e-6 in fp32 and 2.5e-3 in bf16, while the loss itself moves ~10% per step (5.13 ->
# 0.33), so a kernel that trained differently would fail. The tolerances leave room for other CPUs' GEMMs.
PER_STEP_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", list(PER_STEP_RTOL), ids=str)
def test_convergence_30_steps(dtype):
    ids, labels = batch(b=4, t=16, seed=3)
    losses = []
    for patched in (False, True):
        model = make_model("llama", seed=5, dtype=dtype)
        if patched:
            apply_llmkern_kernels(model)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = []
        for _ in range(30):
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(torch.tensor(run))
    assert losses[0][-1] < 0.2 * losses[0][0]  # it learns: the comparison is not between two flat lines
    torch.testing.assert_close(losses[1], losses[0], rtol=PER_STEP_RTOL[dtype], atol=0)
