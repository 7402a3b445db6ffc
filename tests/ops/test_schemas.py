"""One registration path: every op's schema is C++'s (csrc/ops/<op>.cpp) in every namespace that carries it,
every op is exported from llmkern.ops with its reference, and the resolver maps each backend to its op."""
import pytest
import torch

import llmkern.ops
from llmkern.ops import _backends

OPS = sorted(_backends.REGISTERED)
BACKWARD = {"lora_linear": "_lora_linear_backward", "adapter_bottleneck": "_adapter_bottleneck_backward",
            **{op: f"_{op}_backward" for op in ("rms_norm", "layer_norm", "swiglu", "geglu", "rope", "cross_entropy",
                                                "fused_linear_cross_entropy")}}


def test_every_op_is_registered():
    assert OPS == ["adapter_bottleneck", "cross_entropy", "fused_adamw_", "fused_linear_cross_entropy", "fused_sgd_",
                   "geglu", "layer_norm", "lora_linear", "multi_tensor_sumsq", "rms_norm", "rope", "swiglu"]


@pytest.mark.parametrize("name", OPS + sorted(BACKWARD.values()))
def test_each_namespace_has_the_cpp_schema(name):
    """The schema text exists once, in C++: llmkern_emu (the same .cpp built with another namespace) and
    llmkern_triton (defined in Python from it) carry it to the letter, names, defaults and aliasing."""
    cpp = torch.ops.llmkern
    assert hasattr(cpp, name), f"llmkern::{name} is not defined: {_backends.REGISTERED}"
    expected = str(getattr(cpp, name).default._schema)
    assert expected.startswith(f"llmkern::{name}(")
    forward = name if name in _backends.REGISTERED else next(f for f, b in BACKWARD.items() if b == name)
    namespaces = _backends.namespaces(forward)
    assert "llmkern" in namespaces
    for b in ("emu", "triton"):
        ns = _backends.LIBRARIES[b][1]
        if b in _backends.REGISTERED[forward]:
            continue  # not built here: the reason is recorded (and test_backends_built_here guards it)
        assert ns in namespaces
        got = str(getattr(getattr(torch.ops, ns), name).default._schema)
        assert got == expected.replace("llmkern::", f"{ns}::", 1)


def test_backends_built_here():
    """This machine builds every namespace (make build); an op missing one would silently lose coverage."""
    for name in OPS:
        assert _backends.namespaces(name) == ("llmkern", "llmkern_emu", "llmkern_triton"), \
            (name, _backends.REGISTERED[name])


@pytest.mark.parametrize("name", OPS)
def test_resolver(name):
    for b, (_, ns) in _backends.LIBRARIES.items():
        assert _backends.op(name, b) is getattr(getattr(torch.ops, ns), name)
    with pytest.raises(ValueError, match="has no dispatcher op"):
        _backends.op(name, "ref")


def test_every_op_and_ref_is_exported():
    for name in OPS:
        assert callable(getattr(llmkern.ops, name)), name
        assert callable(getattr(llmkern.ops, name.rstrip("_") + "_ref")), name
    assert set(llmkern.ops.__all__) == {n for name in OPS for n in (name, name.rstrip("_") + "_ref")}


def test_schema_is_read_from_cpp():
    assert _backends.schema("multi_tensor_sumsq") == "multi_tensor_sumsq(Tensor[] tensors) -> Tensor"
    with pytest.raises(RuntimeError, match="no compiled extension defines no_such_op"):
        _backends.schema("no_such_op")
