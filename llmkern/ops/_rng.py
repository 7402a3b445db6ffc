"""The dropout RNG in pure PyTorch: the bit-exact twin of csrc/include/llmkern/rng.h.

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


def dropout_key(seed: int) -> int:
    """32-bit key for a 64-bit seed (rng.h: dropout_key)."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    return _fmix32_int((s & _M32) ^ _fmix32_int((s >> 32) ^ 0x9E3779B9))


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


def dropout_keep_mask(seed: int, offset: int, p: float, rows: int, cols: int, device=None) -> torch.Tensor:
    """Boolean keep-mask of a (rows, cols) row-major view: True where the element is kept."""
    counter = torch.arange(rows * cols, dtype=torch.int64, device=device) + offset
    lo, hi = counter & _M32, (counter >> 32) & _M32
    h = _fmix32(_fmix32(lo ^ dropout_key(seed)) ^ hi ^ 0x85EBCA6B)
    return ((h >> 8) >= dropout_threshold(p)).reshape(rows, cols)
