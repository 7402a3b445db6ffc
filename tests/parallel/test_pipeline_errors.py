"""Bad input to the pipeline is a clear error on every rank, within the timeout, never a hang."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from llmkern.parallel import PipelineConfig, PipelineError, apply_pipeline
from llmkern.parallel.pipeline import partition
from llmkern.parallel.pipeline.schedules import ScheduleError
from llmkern.testing import run_distributed

TIMEOUT_S = 3.0
GRACE_S = 2.0 + 1.0  # llmkern.parallel.groups.fail waits 2 s for the other ranks' reports, + 1 s slack


def _mse(out, target):
    return ((out - target) ** 2).mean()


def _mlp(widths):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in widths])


def test_layer_counts():
    parts = partition.model_parts(_mlp([(4, 4)] * 7))
    assert partition.layer_counts(parts, 3, "uniform") == [3, 2, 2]
    assert partition.layer_counts(parts, 3, [1, 5, 1]) == [1, 5, 1]
    with pytest.raises(ValueError, match="4 stages but the model has only 3 layers"):
        partition.layer_counts(partition.model_parts(_mlp([(4, 4)] * 3)), 4, "uniform")
    with pytest.raises(ValueError, match=r"partition=\[1, 5\] must list 3 layer counts"):
        partition.layer_counts(parts, 3, [1, 5])
    with pytest.raises(ValueError, match="partition='time' needs example_inputs"):
        partition.layer_counts(parts, 3, "time")
    # parameters: one wide layer among narrow ones gets a stage of its own
    wide = partition.model_parts(_mlp([(4, 4), (4, 4), (4, 64), (64, 4), (4, 4), (4, 4)]))
    assert partition.layer_counts(wide, 3, "parameters") == [2, 1, 3]
    with pytest.raises(TypeError, match="cannot split a Linear"):
        partition.model_parts(nn.Linear(2, 2))


def _construction_errors(rank, world):
    errors = []
    cases = [
        (_mlp([(4, 4)] * 3), PipelineConfig(stages=2, microbatches=4, schedule="interleaved_1f1b",
                                            virtual_stages=2), _mse),
        (_mlp([(4, 4)] * 4), PipelineConfig(stages=2, microbatches=1, schedule="1f1b"), _mse),
        (_mlp([(4, 4)] * 4), PipelineConfig(stages=3, microbatches=4), _mse),
        (_mlp([(4, 4)] * 4), PipelineConfig(stages=2, microbatches=4), None),
        (nn.Linear(4, 4), PipelineConfig(stages=2, microbatches=4), _mse),
    ]
    for model, cfg, loss_fn in cases:
        try:
            apply_pipeline(model, cfg, loss_fn=loss_fn)
            errors.append(None)
        except (ValueError, TypeError, ScheduleError) as e:
            errors.append(f"{type(e).__name__}: {e}")
    return errors


def test_bad_configurations_are_refused_at_construction():
    errors = run_distributed(_construction_errors, 2, timeout=60)[0]
    assert "4 stages but the model has only 3 layers" in errors[0]
    assert "needs microbatches >= pipeline ranks, got m=1 < p=2" in errors[1]
    assert "PipelineConfig(stages=3) but the pipeline group has 2 ranks" in errors[2]
    assert "needs loss_fn" in errors[3]
    assert errors[4].startswith("TypeError: apply_pipeline: cannot split a Linear")
    with pytest.raises(ValueError, match="microbatches and virtual_stages must be >= 1"):
        PipelineConfig(stages=2, microbatches=0)
    with pytest.raises(ValueError, match="rematerialize must be"):
        PipelineConfig(stages=2, microbatches=2, rematerialize="some")


def _step_error(pipe, x, y):
    t0 = time.perf_counter()
    try:
        pipe.train_step(x, y)
    except PipelineError as e:
        return str(e), time.perf_counter() - t0
    return None, time.perf_counter() - t0


def _shape_errors(rank, world):
    """Each case on a new group: a shape error fails the group it happened on (its connections close)."""
    cfg = PipelineConfig(stages=2, microbatches=3, timeout_s=TIMEOUT_S, verbose=False)
    x, y = torch.randn(7, 8), torch.randn(7, 8)
    cases = {"mismatch": ([(8, 16), (32, 8)], x, y),  # stage 0 ends with Linear(8, 16), stage 1 starts Linear(32, 8)
             "labels": ([(8, 16), (16, 8)], x, torch.randn(6, 8)),
             "rows": ([(8, 16), (16, 8)], x[:2], y),
             "ok": ([(8, 16), (16, 8)], x, y)}
    out = {}
    for name, (widths, xi, yi) in cases.items():
        pipe = apply_pipeline(_mlp(widths), cfg, dist.new_group([0, 1]), loss_fn=_mse)
        out[name] = _step_error(pipe, xi, yi)
        if name == "mismatch":
            out["after"] = _step_error(pipe, x, y)
        if name == "ok":  # a new batch size (new shapes agreed along the chain), then the first again
            out["ok"] = [out["ok"], _step_error(pipe, x[:5], y[:5]), _step_error(pipe, x, y)]
    return out


def test_stage_shape_mismatch_is_an_error_on_every_rank():
    for rank, out in enumerate(run_distributed(_shape_errors, 2, timeout=60)):
        msg, secs = out["mismatch"]
        assert "stage 1 (rank 1) cannot take stage 0's output, a torch.float32 tensor of shape (3, 16)" in msg, msg
        assert "mat1 and mat2 shapes cannot be multiplied" in msg
        assert secs < TIMEOUT_S  # reported at the shape agreement, no rank waited for a tensor
        assert "unusable after an earlier failure" in out["after"][0]
        assert "got labels with 6 rows for a batch of 7 rows" in out["labels"][0]
        assert "stage 0 needs inputs as a tensor with at least microbatches=3 rows" in out["rows"][0]
        assert [r[0] for r in out["ok"]] == [None, None, None]


def _stalled(rank, world):
    pipe = apply_pipeline(_mlp([(4, 4)] * 2), PipelineConfig(stages=2, microbatches=2, timeout_s=TIMEOUT_S,
                                                             verbose=False), loss_fn=_mse)
    if rank == 1:
        time.sleep(TIMEOUT_S + 2)  # a stage that stopped responding
        return None
    return _step_error(pipe, torch.randn(4, 4), torch.randn(4, 4))


def test_stalled_stage_is_an_error_within_the_timeout():
    msg, secs = run_distributed(_stalled, 2, timeout=60)[0]
    assert msg is not None and "rank 1" in msg and f"{TIMEOUT_S:g} s" in msg, msg
    assert secs < TIMEOUT_S + GRACE_S


class _Crash(nn.Module):
    """Raises on its second forward: the stage's process then leaves (returns, tearing down gloo)."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:  # 1: the shape agreement, 2: micro-batch 0, 3: micro-batch 1
            raise RuntimeError("stage crashed")
        return self.lin(x)


def _dies_mid_step(rank, world, schedule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), _Crash(), nn.Tanh())
    pipe = apply_pipeline(model, PipelineConfig(stages=2, microbatches=4, schedule=schedule, timeout_s=TIMEOUT_S,
                                                verbose=False), loss_fn=_mse)
    try:
        return _step_error(pipe, torch.randn(8, 4), torch.randn(8, 4))
    except RuntimeError as e:
        assert rank == 1 and "stage crashed" in str(e)
        return "crashed", 0.0


@pytest.mark.parametrize("schedule", ["1f1b", "zero_bubble"])
def test_dead_stage_mid_step_is_an_error_within_the_timeout(schedule):
    results = run_distributed(_dies_mid_step, 2, (schedule,), timeout=60)
    assert results[1][0] == "crashed"
    msg, secs = results[0]
    assert msg is not None and "receiving the gradient of micro-batch" in msg, msg
    assert "rank 1 died, stopped or diverged" in msg
    assert secs < TIMEOUT_S + GRACE_S
