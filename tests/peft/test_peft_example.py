"""examples/peft_methods.py runs every method end to end (apply, train, save in PEFT's format, reload)."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "peft_methods.py"


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix", "prompt", "ptuning"])
def test_example_runs(method, capsys):
    main = runpy.run_path(str(EXAMPLE))["main"]
    main(method)
    out = capsys.readouterr().out
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step ")]
    assert len(losses) == 10 and losses[-1] < losses[0], out
    if method != "adapter":
        assert "logits equal = True" in out, out
