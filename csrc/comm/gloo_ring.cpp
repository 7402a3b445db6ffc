// The gloo transport of llmkern's ring (llmkern/parallel/ring.py): the schedule of ring_schedule.h
// driven over a torch.distributed ProcessGroup's point-to-point send/recv, step loop in C++.
//
// Why C++: the Python loop spends four interpreter round trips per segment (isend, irecv, wait, add)
// holding the GIL, which the training thread needs while DDP reduces buckets during backward; this
// loop runs with the GIL released (torch releases it around dispatcher ops called from Python) and
// costs microseconds per segment. The Python loop in ring.py stays as the readable twin and the
// oracle: tests/parallel/test_collectives.py runs both on the same data.
//
// One call moves one contiguous CPU buffer round the ring: kind "all_reduce" (reduce-scatter, then
// all-gather), "reduce_scatter" (rank r's result in chunk r) or "all_gather" (rank r's shard in chunk
// r). Chunks go over the wire in segments of segment_bytes (0: ring.segment_elements' rule); a
// segment received at step t is reduced and sent on at step t+1 while the rest of its chunk is still
// arriving, and the receives of step t+1 are posted while step t is processed (into scratch at once;
// in place segment by segment, each once the send that last read its memory has finished). The bytes
// sent follow from the schedule alone (ring.bytes_sent computes them in Python). Message tags are tag_base | (message index mod 2^20)
// (llmkern/parallel/groups.py gives tag_base: bit 30 and the call's sequence number). A wait that
// fails or outlasts timeout_s throws a c10::Error whose message starts with
// "llmkern-peer-failure|<peer>|<where>|", which ring.py turns into groups.PeerFailure.
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include "llmkern/registration.h"

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "ring_schedule.h"

namespace llmkern::comm {
namespace {

struct Step {
  int send_chunk, recv_chunk;
  bool reduce;
};

[[noreturn]] void peer_failure(int peer, const std::string& where, const std::exception& e) {
  TORCH_CHECK(false, "llmkern-peer-failure|", peer, "|", where, "|", e.what());
}

// Received chunks are kept across calls (per thread and dtype): allocating 2 x 32 MiB afresh for a
// 64 MiB all-reduce costs first-touch page faults, measured at a third of its time.
at::Tensor scratch_for(const at::Tensor& like, int64_t numel) {
  thread_local std::map<at::ScalarType, at::Tensor> pools;
  at::Tensor& buf = pools[like.scalar_type()];
  if (!buf.defined() || buf.numel() < numel) buf = at::empty({numel}, like.options());
  return buf;
}

void ring_gloo(at::Tensor flat, c10::string_view group_name, c10::string_view kind, c10::string_view op,
               int64_t tag_base, double timeout_s, int64_t segment_bytes) {
  TORCH_CHECK(flat.device().is_cpu() && flat.dim() == 1 && flat.is_contiguous(),
              "_ring_gloo_: flat must be a contiguous 1-D CPU tensor, got ", flat.sizes(), " on ", flat.device());
  TORCH_CHECK(kind == "all_reduce" || kind == "reduce_scatter" || kind == "all_gather",
              "_ring_gloo_: kind must be all_reduce, reduce_scatter or all_gather, got ", kind);
  TORCH_CHECK(op == "sum" || op == "avg" || op == "max", "_ring_gloo_: op must be sum, avg or max, got ", op);
  TORCH_CHECK(timeout_s > 0 && segment_bytes >= 0, "_ring_gloo_: timeout_s must be positive and segment_bytes >= 0");
  const auto pg = c10d::resolve_process_group(std::string(group_name));
  const int world = pg->getSize(), rank = pg->getRank();
  const int64_t n = flat.numel();
  if (world == 1 || n == 0) return;
  const int next = next_rank(rank, world), prev = prev_rank(rank, world);
  std::vector<Step> steps;
  if (kind != "all_gather")
    for (int s = 0; s < ring_steps(world); ++s) {
      const RingStep st = reduce_scatter_step(rank, world, s);
      steps.push_back({st.send_chunk, st.recv_chunk, true});
    }
  if (kind != "reduce_scatter")
    for (int s = 0; s < ring_steps(world); ++s) {
      const RingStep st = all_gather_step(rank, world, s);
      steps.push_back({st.send_chunk, st.recv_chunk, false});
    }
  const int total = int(steps.size());
  int last_reduce = -1;
  for (int t = 0; t < total; ++t)
    if (steps[t].reduce) last_reduce = t;
  const int64_t size = flat.element_size();
  const int64_t largest = chunk_range(n, world, 0).count;
  // ring.segment_elements: segment_bytes when given, else a quarter of a chunk and at least 1 MiB
  const int64_t seg = segment_bytes > 0 ? std::max<int64_t>(1, segment_bytes / size)
                                        : std::max<int64_t>({1, (int64_t(1) << 20) / size, (largest + 3) / 4});
  const int64_t nseg = (largest + seg - 1) / seg;
  at::Tensor scratch;
  if (last_reduce >= 0) scratch = scratch_for(flat, 2 * largest);
  const auto timeout = std::chrono::milliseconds(int64_t(timeout_s * 1000.0));

  auto where = [&](int t, const char* what) {
    const bool rs = steps[t].reduce;
    return std::string(what) + " at " + (rs ? "reduce-scatter" : "all-gather") + " step " +
           std::to_string(rs ? t : t - (last_reduce + 1));
  };
  auto tag = [&](int t, int64_t j) { return int(tag_base | ((int64_t(t) * nseg + j) & 0xFFFFF)); };
  auto wait = [&](const c10::intrusive_ptr<c10d::Work>& w, int peer, const std::string& at) {
    try {
      w->wait(timeout);
    } catch (const std::exception& e) {
      peer_failure(peer, at, e);
    }
  };

  struct Pending {
    c10::intrusive_ptr<c10d::Work> work;
    int step;
  };
  // (chunk, segment) -> its sends: that memory is busy until they finish
  std::map<std::pair<int, int64_t>, std::vector<Pending>> pending;
  struct Recv {
    c10::intrusive_ptr<c10d::Work> work;
    int64_t off, cnt;
    at::Tensor into;
  };
  struct Seg {
    int64_t off, cnt;
  };
  auto segments = [&](int chunk) {
    const ChunkRange c = chunk_range(n, world, chunk);
    std::vector<Seg> out;
    for (int64_t j = 0; j * seg < c.count; ++j) out.push_back({c.offset + j * seg, std::min(seg, c.count - j * seg)});
    return out;
  };
  auto send = [&](int t, int chunk, int64_t j, int64_t off, int64_t cnt) {
    std::vector<at::Tensor> v{flat.narrow(0, off, cnt)};
    try {
      pending[{chunk, j}].push_back({pg->send(v, next, tag(t, j)), t});
    } catch (const std::exception& e) {
      peer_failure(next, where(t, "send"), e);
    }
  };
  // The receive of segment j of step t: into scratch (reduce-scatter) or in place (all-gather), where
  // that segment's earlier send must have finished first.
  auto post = [&](int t, int64_t j, Seg sg) {
    const Step& st = steps[t];
    at::Tensor into;
    if (st.reduce) {
      const int64_t base = chunk_range(n, world, st.recv_chunk).offset;
      into = scratch.narrow(0, (t % 2) * largest + (sg.off - base), sg.cnt);
    } else {
      auto it = pending.find({st.recv_chunk, j});
      if (it != pending.end()) {
        for (auto& p : it->second) wait(p.work, next, where(p.step, "send"));
        pending.erase(it);
      }
      into = flat.narrow(0, sg.off, sg.cnt);
    }
    std::vector<at::Tensor> v{into};
    try {
      return Recv{pg->recv(v, prev, tag(t, j)), sg.off, sg.cnt, into};
    } catch (const std::exception& e) {
      peer_failure(prev, where(t, "receive"), e);
    }
  };

  std::vector<Recv> recvs;
  {
    const auto first = segments(steps[0].recv_chunk);
    for (int64_t j = 0; j < int64_t(first.size()); ++j) recvs.push_back(post(0, j, first[j]));
    const auto out = segments(steps[0].send_chunk);
    for (int64_t j = 0; j < int64_t(out.size()); ++j) send(0, steps[0].send_chunk, j, out[j].off, out[j].cnt);
  }
  for (int t = 0; t < total; ++t) {
    const bool more = t + 1 < total;
    const std::vector<Seg> after = more ? segments(steps[t + 1].recv_chunk) : std::vector<Seg>{};
    // Receives into scratch depend on nothing: all posted now. In-place ones are posted segment by
    // segment as this step goes, each after the send that last read its memory: waiting for a whole
    // chunk's sends first would stall the pipeline at the phase boundary.
    const bool eager = more && steps[t + 1].reduce;
    std::vector<Recv> following;
    if (eager)
      for (int64_t j = 0; j < int64_t(after.size()); ++j) following.push_back(post(t + 1, j, after[j]));
    const Step& st = steps[t];
    for (int64_t j = 0; j < int64_t(recvs.size()); ++j) {
      Recv& r = recvs[j];
      wait(r.work, prev, where(t, "receive"));
      if (st.reduce) {
        at::Tensor own = flat.narrow(0, r.off, r.cnt);
        if (op == "max") at::maximum_out(own, own, r.into);
        else own.add_(r.into);
        if (op == "avg" && t == last_reduce) own.div_(world);  // the owned chunk, divided once
      }
      if (more) {
        send(t + 1, st.recv_chunk, j, r.off, r.cnt);
        if (!eager && j < int64_t(after.size())) following.push_back(post(t + 1, j, after[j]));
      }
    }
    if (more && !eager)
      for (int64_t j = int64_t(following.size()); j < int64_t(after.size()); ++j)
        following.push_back(post(t + 1, j, after[j]));
    recvs = std::move(following);
  }
  for (auto& [key, works] : pending)
    for (auto& p : works) wait(p.work, next, where(p.step, "send"));
}

}  // namespace
}  // namespace llmkern::comm

LLMKERN_LIBRARY_FRAGMENT(m) {
  m.def("_ring_gloo_(Tensor(a!) flat, str group_name, str kind, str op, int tag_base, float timeout_s, "
        "int segment_bytes) -> ()");
}

LLMKERN_CPU_IMPL(m) { m.impl("_ring_gloo_", &llmkern::comm::ring_gloo); }
