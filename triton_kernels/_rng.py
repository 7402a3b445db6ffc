"""The counter-based hash of csrc/include/llmkern/rng.h in Triton, for every kernel that draws random
bits: the dropout masks of lora_linear and the stochastic rounding of fused_adamw_. The host-side
keys (seed_key, dropout_threshold, as_int32) are llmkern._rng's, the bit-exact Python twin.

Keys reach the kernels as i32 arguments holding the uint32 bits (llmkern._rng.as_int32) and are
bitcast back inside; every product wraps mod 2^32 in uint32, as in C++.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fmix32(h):
    """MurmurHash3's finalizer on uint32 (rng.h fmix32)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def counter_hash(lo, hi, key):
    """rng.h counter_hash: 32 random bits for the 64-bit counters (lo, hi) (uint32 words) under the
    uint32 key."""
    return fmix32(fmix32(lo ^ key) ^ hi ^ 0x85EBCA6B)


@triton.jit
def rounding_key(seed_key_i32, step):
    """rng.h rounding_key: the stochastic-rounding key of one step (step: uint32)."""
    return fmix32(tl.cast(seed_key_i32, tl.uint32, bitcast=True) ^ fmix32(step ^ 0x9E3779B9))


@triton.jit
def bf16_stochastic(x, r16):
    """rng.h bf16_bits_stochastic: fp32 x to bf16, adding the 16 random bits r16 below bf16's last
    mantissa bit and truncating; NaN becomes 0x7FC0."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + (r16 & 0xFFFF)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
