"""examples/train_mixed_precision.py runs as documented: fp16 with the loss scaler and bf16 without,
clipping through the scaler, and the loss falls."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_mixed_precision.py"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_example_trains(dtype):
    out = subprocess.run([sys.executable, str(EXAMPLE), "--dtype", dtype, "--steps", "50"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out.stdout)]
    norms = [float(x) for x in re.findall(r"grad norm (\d+\.\d+)", out.stdout)]
    assert len(losses) == 3 and len(norms) == 3, out.stdout          # steps 1, 25, 50
    assert losses[-1] < 0.8 * losses[0], out.stdout
    # the printed norm is of the unscaled gradients: the same order of magnitude with and without a scaler
    assert all(0.1 < n < 100 for n in norms), out.stdout
    assert ("loss scale" in out.stdout) == (dtype == "float16")
