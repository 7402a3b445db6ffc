"""llmkern.peft without the Hugging Face extra: the package imports and works on plain torch modules,
and what needs transformers or safetensors says which extra to install."""
from __future__ import annotations

import subprocess
import sys
import textwrap

_HIDE = textwrap.dedent("""
    import importlib.abc, sys
    class Hide(importlib.abc.MetaPathFinder):  # as if transformers, peft and safetensors were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("transformers", "peft", "safetensors"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Hide())
""")

_SCRIPT = _HIDE + textwrap.dedent("""
    import types
    import torch
    from torch import nn
    import llmkern.peft as lp

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    report = lp.apply_lora(model, lp.LoraConfig(r=2, target_modules=["0", "2"]))
    assert report.replaced == ["0", "2"], report
    model(torch.randn(3, 8)).sum().backward()
    for call in (lambda: lp.save_adapter(model, "unused"), lambda: lp.load_adapter(model, "unused")):
        try:
            call()
        except ImportError as e:
            print("ImportError:", e)

    class Llamaish(nn.Module):  # what model_dims reads from a transformers model
        config = types.SimpleNamespace(model_type="llama", hidden_size=8, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2)
    try:
        lp.apply_prefix_tuning(Llamaish(), lp.PrefixTuningConfig())
    except ImportError as e:
        print("ImportError:", e)
    print("done")
""")


def test_import_and_lora_without_transformers(tmp_path):
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[-1] == "done"
    errors = [line for line in lines if line.startswith("ImportError:")]
    assert len(errors) == 3 and all("pip install 'llmkern[hf]'" in e for e in errors), lines
    assert "apply_prefix_tuning" in errors[2] and "needs transformers" in errors[2]
