"""Shared test harness: the tolerance table, the fp64-reference comparison (its calibration:
`python -m llmkern.testing.calibrate`), a multi-process torch.distributed runner with timeouts, and
the Triton interpreter setup for machines without a GPU, which checks every access's bounds, and
the peak CPU memory of a call (`llmkern.testing.memory.peak_bytes`, for tests and benchmarks).

Importing this package imports torch only: not the llmkern C++ extensions, and not triton (the
interpreter helpers import it when called).
"""
from llmkern.testing.distributed import RankFailedError, run_distributed
from llmkern.testing.tolerances import TOLERANCES, Tolerance, assert_close_to_ref
from llmkern.testing.triton_interpret import enable_triton_interpreter, is_interpreted

__all__ = [
    "TOLERANCES",
    "Tolerance",
    "assert_close_to_ref",
    "run_distributed",
    "RankFailedError",
    "enable_triton_interpreter",
    "is_interpreted",
]
