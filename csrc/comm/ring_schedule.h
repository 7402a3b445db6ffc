// Ring all-reduce schedule: which chunk every rank sends, receives and reduces at every step.
//
// Pure C++ (no CUDA, no torch), shared by the NCCL ring (csrc/comm/*.cu) and mirrored line for line
// by llmkern/parallel/ring.py, whose gloo path must chunk exactly as this header does;
// tests/parallel/test_ring_schedule.py checks both against each other for world sizes 1..16.
//
// A buffer of n elements is cut into `world` chunks. Chunk c starts at c*(n/world) + min(c, n%world)
// and holds n/world elements, plus one for the first n%world chunks, so sizes differ by at most one
// and lengths that do not divide evenly need no padding.
//
// Ranks form the ring r -> r+1 (mod world). Reduce-scatter takes world-1 steps: at step s rank r
// sends chunk (r - s - 1) and receives chunk (r - s - 2) from rank r-1, adding it into its own copy.
// After that rank r holds the full sum of chunk r, the chunk torch.distributed.reduce_scatter_tensor
// gives rank r (so a buffer of n = world*k elements leaves rank r's shard at [r*k, (r+1)*k)).
// All-gather takes world-1 more steps: at step s rank r sends chunk (r - s) (its own chunk at step 0)
// and receives chunk (r - s - 1), which it copies. In both phases the chunk sent at step s+1 is the
// one received at step s, and the chunk sent at all-gather step 0 is the one reduce-scatter finished,
// so the 2(world-1) steps form one pipeline. Every rank sends 2(world-1) chunks: 2(world-1)/world of
// the buffer, the bandwidth-optimal amount.
#pragma once

#include <cstdint>

namespace llmkern::comm {

struct ChunkRange {
  int64_t offset;
  int64_t count;
};

// What one rank does in one step: send chunk `send_chunk` to next_rank, receive `recv_chunk` from
// prev_rank (reduce it in during reduce-scatter, copy it during all-gather).
struct RingStep {
  int send_chunk;
  int recv_chunk;
};

inline int ring_mod(int64_t a, int world) {
  int64_t m = a % world;
  return static_cast<int>(m < 0 ? m + world : m);
}

inline int next_rank(int rank, int world) { return ring_mod(rank + 1, world); }
inline int prev_rank(int rank, int world) { return ring_mod(rank - 1, world); }

// Steps in each phase: zero for a single rank, which has nothing to exchange.
inline int ring_steps(int world) { return world - 1; }

inline ChunkRange chunk_range(int64_t n, int world, int chunk) {
  const int64_t base = n / world, extra = n % world;
  const int64_t offset = chunk * base + (chunk < extra ? chunk : extra);
  return {offset, base + (chunk < extra ? 1 : 0)};
}

inline RingStep reduce_scatter_step(int rank, int world, int step) {
  return {ring_mod(int64_t(rank) - step - 1, world), ring_mod(int64_t(rank) - step - 2, world)};
}

inline RingStep all_gather_step(int rank, int world, int step) {
  return {ring_mod(int64_t(rank) - step, world), ring_mod(int64_t(rank) - step - 1, world)};
}

// The chunk that rank holds fully reduced after reduce-scatter (and sends first in all-gather): its own.
inline int owned_chunk(int rank, int world) { return ring_mod(rank, world); }

// Elements rank sends in one all-reduce of n elements: 2(world-1)/world * n, give or take the
// one-element difference between chunk sizes.
inline int64_t elements_sent(int64_t n, int rank, int world) {
  int64_t total = 0;
  for (int s = 0; s < ring_steps(world); ++s) {
    total += chunk_range(n, world, reduce_scatter_step(rank, world, s).send_chunk).count;
    total += chunk_range(n, world, all_gather_step(rank, world, s).send_chunk).count;
  }
  return total;
}

}  // namespace llmkern::comm
