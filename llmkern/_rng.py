"""The dropout RNG and the optimizers' stochastic rounding in pure PyTorch: the bit-exact twin of
csrc/include/llmkern/rng.h. A leaf module (it imports torch only): the ops' references use it, and the
Triton kernels (triton_kernels/_rng.py, the same hash in Triton) take their host-side keys from it.

The mask of element i of a row-major (N, C) view is a function of (seed, offset + i) only, so every
backend (C++, CUDA, Triton, this reference) draws the same mask, and backward regenerates it
instead of storing it. 32-bit products are formed from 16-bit halves so that every intermediate
fits in int64 without overflow.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _fmix32_int(h: int) -> int:
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def seed_key(seed: int) -> int:
    """32-bit key for a 64-bit seed (rng.h: seed_key)."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    return _fmix32_int((s & _M32) ^ _fmix32_int((s >> 32) ^ 0x9E3779B9))


def seed_key_tensor(seed: torch.Tensor) -> torch.Tensor:
    """seed_key of an int64 seed tensor, as a 0-d int64 tensor: computed with tensor ops, so a seed
    drawn as a tensor is never read on the host (no device sync, no torch.compile graph break)."""
    s = seed.reshape(())
    return _fmix32((s & _M32) ^ _fmix32(((s >> 32) & _M32) ^ 0x9E3779B9))


def check_dropout_p(p: float, who: str = "lora_linear", name: str = "dropout_p") -> None:
    """The one range check of a dropout probability: [0, 1) (p = 1 would divide by 1 - p = 0). The
    C++ ops check the same range (csrc/ops/lora_linear.h); modules and configs call this to fail early,
    naming themselves (`who`) and their field (`name`)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{who}: {name} must be in [0, 1), got {p!r}")


def as_int32(key: int) -> int:
    """A 32-bit key as the signed int32 with the same bits: how the Triton kernels take it (an i32
    argument bitcast to uint32 inside)."""
    return key - (1 << 32) if key >= (1 << 31) else key


dropout_key = seed_key  # rng.h: dropout_key


def dropout_threshold(p: float) -> int:
    """A 24-bit draw below this threshold is dropped: round(p * 2^24)."""
    return min(int(p * 16777216.0 + 0.5), 16777216)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    lo, hi = h & 0xFFFF, h >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def counter_hash(key: int, counter: torch.Tensor) -> torch.Tensor:
    """rng.h counter_hash: 32 random bits (in int64) for each int64 counter."""
    lo, hi = counter & _M32, (counter >> 32) & _M32
    return _fmix32(_fmix32(lo ^ key) ^ hi ^ 0x85EBCA6B)


def dropout_keep_mask(seed: int | torch.Tensor, offset: int, p: float, rows: int, cols: int, device=None,
                      row_stride: int | None = None) -> torch.Tensor:
    """Boolean keep-mask of a (rows, cols) row-major view: True where the element is kept. Element
    (n, k) draws counter offset + n·row_stride + k (row_stride None: cols); a tensor-parallel shard
    passes offset + col_offset and the full row length. `seed`: an int or an int64 tensor."""
    stride = cols if row_stride is None else row_stride
    counter = (torch.arange(rows, dtype=torch.int64, device=device)[:, None] * stride
               + torch.arange(cols, dtype=torch.int64, device=device)) + offset
    key = seed_key_tensor(seed).to(counter.device) if isinstance(seed, torch.Tensor) else dropout_key(seed)
    h = counter_hash(key, counter)
    return (h >> 8) >= dropout_threshold(p)


def rounding_key(seed: int, step: int) -> int:
    """rng.h rounding_key(seed_key(seed), step): the stochastic-rounding key of one step."""
    return _fmix32_int(seed_key(seed) ^ _fmix32_int((step & _M32) ^ 0x9E3779B9))


def storage_index(t: torch.Tensor) -> torch.Tensor:
    """int64 tensor of t's shape: each element's position in t's (dense) storage, the order in which
    the kernels walk it (a transposed matrix is walked column by column)."""
    idx = torch.empty_like(t, dtype=torch.int64, memory_format=torch.preserve_format)
    idx.as_strided((t.numel(),), (1,)).copy_(torch.arange(t.numel(), device=t.device))
    return idx


def bf16_round_stochastic(x: torch.Tensor, r16: torch.Tensor) -> torch.Tensor:
    """rng.h bf16_bits_stochastic: fp32 x rounded to bf16 with the random bits r16 (int64, low 16
    used): add them below bf16's last mantissa bit and truncate; NaN becomes 0x7FC0."""
    u = x.float().view(torch.int32).to(torch.int64) & _M32
    bits = (u + (r16 & 0xFFFF)) >> 16
    bits = torch.where(torch.isnan(x), 0x7FC0, bits)
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.bfloat16)
