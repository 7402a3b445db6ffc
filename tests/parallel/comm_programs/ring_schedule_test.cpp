// Unit test for csrc/comm/ring_schedule.h, built and run by tests/parallel/test_ring_schedule.py.
//
//   ring_schedule_test check      simulate the ring for world 1..16 and many lengths (even, uneven,
//                                 shorter than the world, empty); exit 1 with a message on error
//   ring_schedule_test dump N     print the schedule for length N and world 1..16, one fact per line,
//                                 for comparison with llmkern/parallel/ring.py
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "ring_schedule.h"

using namespace llmkern::comm;

static int failures = 0;
#define EXPECT(cond, ...)                                    \
  do {                                                       \
    if (!(cond)) {                                           \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                     \
      std::fprintf(stderr, "\n");                            \
      if (++failures > 20) std::exit(1);                     \
    }                                                        \
  } while (0)

static void check_chunks(int64_t n, int world) {
  int64_t next = 0, lo = n, hi = 0;
  for (int c = 0; c < world; ++c) {
    ChunkRange r = chunk_range(n, world, c);
    EXPECT(r.offset == next, "n=%lld world=%d chunk %d starts at %lld, expected %lld", (long long)n, world, c,
           (long long)r.offset, (long long)next);
    next = r.offset + r.count;
    lo = r.count < lo ? r.count : lo;
    hi = r.count > hi ? r.count : hi;
  }
  EXPECT(next == n, "n=%lld world=%d chunks cover %lld elements", (long long)n, world, (long long)next);
  EXPECT(hi - lo <= 1, "n=%lld world=%d chunk sizes differ by %lld", (long long)n, world,
         (long long)(hi - lo));
}

// Runs reduce-scatter and all-gather step by step on `world` simulated ranks holding distinct
// integers (exact arithmetic, so a chunk reduced twice or never shows up as a wrong sum).
static void simulate(int64_t n, int world) {
  std::vector<std::vector<int64_t>> buf(world, std::vector<int64_t>(n));
  std::vector<int64_t> want(n, 0);
  for (int r = 0; r < world; ++r)
    for (int64_t i = 0; i < n; ++i) {
      buf[r][i] = (r + 1) * 1000003LL + i * 7919LL + (i * r) % 13;
      want[i] += buf[r][i];
    }
  for (int phase = 0; phase < 2; ++phase) {
    for (int s = 0; s < ring_steps(world); ++s) {
      std::vector<std::vector<int64_t>> wire(world);
      std::vector<int> sent_chunk(world);
      for (int r = 0; r < world; ++r) {  // every rank sends first (a step is one simultaneous exchange)
        RingStep st = phase == 0 ? reduce_scatter_step(r, world, s) : all_gather_step(r, world, s);
        ChunkRange c = chunk_range(n, world, st.send_chunk);
        wire[r].assign(buf[r].begin() + c.offset, buf[r].begin() + c.offset + c.count);
        sent_chunk[r] = st.send_chunk;
      }
      for (int r = 0; r < world; ++r) {
        RingStep st = phase == 0 ? reduce_scatter_step(r, world, s) : all_gather_step(r, world, s);
        int from = prev_rank(r, world);
        EXPECT(sent_chunk[from] == st.recv_chunk,
               "world=%d phase=%d step=%d: rank %d expects chunk %d, rank %d sent %d",
               world, phase, s, r, st.recv_chunk, from, sent_chunk[from]);
        ChunkRange c = chunk_range(n, world, st.recv_chunk);
        for (int64_t i = 0; i < c.count; ++i) {
          if (phase == 0) buf[r][c.offset + i] += wire[from][i];
          else buf[r][c.offset + i] = wire[from][i];
        }
      }
    }
    if (phase == 0) {  // after reduce-scatter, each rank's owned chunk is complete
      for (int r = 0; r < world; ++r) {
        // rank r owns chunk r, as torch.distributed.reduce_scatter_tensor gives it
        EXPECT(owned_chunk(r, world) == r, "world=%d rank %d owns chunk %d", world, r, owned_chunk(r, world));
        ChunkRange c = chunk_range(n, world, owned_chunk(r, world));
        for (int64_t i = c.offset; i < c.offset + c.count; ++i)
          EXPECT(buf[r][i] == want[i], "n=%lld world=%d rank %d owned chunk wrong at %lld", (long long)n,
                 world, r,
                 (long long)i);
      }
    }
  }
  for (int r = 0; r < world; ++r)
    for (int64_t i = 0; i < n; ++i)
      EXPECT(buf[r][i] == want[i], "n=%lld world=%d rank %d element %lld: %lld != %lld", (long long)n,
             world, r,
             (long long)i, (long long)buf[r][i], (long long)want[i]);
  int64_t total = 0;
  for (int r = 0; r < world; ++r) {
    int64_t e = elements_sent(n, r, world);
    total += e;
    // per rank: 2(world-1) chunks, each within one element of n/world
    EXPECT(e * world >= 2 * (world - 1) * (n - world) && e * world <= 2 * (world - 1) * (n + world),
           "n=%lld world=%d rank %d sends %lld elements", (long long)n, world, r, (long long)e);
  }
  EXPECT(total == 2LL * (world - 1) * n, "n=%lld world=%d ranks send %lld in total, expected %lld",
         (long long)n,
         world, (long long)total, 2LL * (world - 1) * n);
}

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "check";
  if (mode == "dump" && argc > 2) {
    int64_t n = std::atoll(argv[2]);
    for (int world = 1; world <= 16; ++world) {
      for (int c = 0; c < world; ++c) {
        ChunkRange r = chunk_range(n, world, c);
        std::printf("chunk %d %d %lld %lld\n", world, c, (long long)r.offset, (long long)r.count);
      }
      for (int r = 0; r < world; ++r) {
        for (int s = 0; s < ring_steps(world); ++s) {
          RingStep a = reduce_scatter_step(r, world, s), b = all_gather_step(r, world, s);
          std::printf("step %d %d %d %d %d %d %d\n", world, r, s, a.send_chunk, a.recv_chunk, b.send_chunk,
                      b.recv_chunk);
        }
        std::printf("rank %d %d %d %d %d %lld\n", world, r, next_rank(r, world), prev_rank(r, world),
                    owned_chunk(r, world), (long long)elements_sent(n, r, world));
      }
    }
    return 0;
  }
  int cases = 0;
  for (int world = 1; world <= 16; ++world) {
    std::vector<int64_t> lengths = {0, 1, 2, 3, 7, 16, 17, 97, 123, 1025};
    for (int64_t d = -1; d <= 1; ++d) {
      lengths.push_back(world + d);
      lengths.push_back(3 * world + d);
    }
    for (int64_t n = 0; n <= 2 * world + 3; ++n) lengths.push_back(n);
    for (int64_t n : lengths) {
      if (n < 0) continue;
      check_chunks(n, world);
      simulate(n, world);
      ++cases;
    }
  }
  if (failures) return 1;
  std::printf("ok %d cases\n", cases);
  return 0;
}
