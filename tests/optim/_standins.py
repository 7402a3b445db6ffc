"""Local stand-ins for llmkern.testing (being written concurrently on the `harness` branch), with the
same semantics; the lead switches these imports to llmkern.testing when merging.

  assert_close_to_ref(actual, ref, baseline, *, grad=False): max|actual - ref| <= 2x (3x for grads)
      max|baseline - ref| + 0.25 eps*max|ref|, with ref in fp64 and baseline plain PyTorch in
      actual's dtype.
  run_distributed(fn, world_size, args=(), *, timeout=120.0, backend="gloo") -> list of fn's results
"""
from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def assert_close_to_ref(actual, ref, baseline, *, grad: bool = False, name: str = "") -> None:
    if isinstance(actual, (list, tuple)):
        for i, (a, r, b) in enumerate(zip(actual, ref, baseline, strict=True)):
            assert_close_to_ref(a, r, b, grad=grad, name=f"{name}[{i}]")
        return
    assert actual.shape == ref.shape, f"{name}: shape {actual.shape} vs {ref.shape}"
    eps = torch.finfo(actual.dtype).eps
    r = ref.double()
    err = (actual.double() - r).abs().max().item() if r.numel() else 0.0
    base = (baseline.double() - r).abs().max().item() if r.numel() else 0.0
    amax = r.abs().max().item() if r.numel() else 0.0
    allowed = (3.0 if grad else 2.0) * base + 0.25 * eps * amax
    assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g} (PyTorch's error {base:.3g})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        queue.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, args: tuple = (), *, timeout: float = 120.0, backend: str = "gloo"):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
