"""Peak CPU memory of a call, for the tests and benchmarks that assert or report memory."""
from __future__ import annotations

from collections.abc import Callable

import torch


def peak_bytes(fn: Callable[[], object]) -> int:
    """The largest number of bytes live on the CPU during fn() above what was live before: the
    profiler's allocation and free records (allocations inside C++ ops included) summed in time order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak
