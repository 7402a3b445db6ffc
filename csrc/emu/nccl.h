// Stand-in for <nccl.h> under the CUDA-on-CPU emulation: the ranks of a communicator are threads of
// one process. Types and enum values match NCCL 2.30 (the nvidia-nccl wheel); the real header is not
// used because its extern "C" prototypes would clash with these inline definitions.
//
// Semantics:
// - Every call is synchronous on the calling thread; the stream argument is ignored, so stream-
//   ordering bugs are invisible.
// - ncclSend copies into the peer's mailbox and returns; ncclRecv waits for a matching send. Inside
//   ncclGroupStart/End, point-to-point calls are queued and run at ncclGroupEnd, sends first, so a ring
//   in which every rank sends and receives in one group completes.
// - Collectives reduce in rank order on every rank, so all ranks get bit-identical results. Real NCCL
//   sums along a ring in the element type; here each step is also rounded to the element type (fp16
//   and bf16 accumulate with a rounding per rank, as on a ring), but the order differs: compare with
//   a tolerance.
// - A wait longer than LLMKERN_EMU_NCCL_TIMEOUT_S (default 60) returns ncclSystemError with a message
//   in ncclGetLastError, instead of hanging a test. The communicator is unusable afterwards.
#pragma once
#ifndef NCCL_H_
#define NCCL_H_

#include <cuda_runtime.h>

#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#define NCCL_MAJOR 2
#define NCCL_MINOR 30
#define NCCL_PATCH 7
#define NCCL_VERSION_CODE 23007
#define NCCL_UNIQUE_ID_BYTES 128

typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId;
typedef struct ncclComm* ncclComm_t;

typedef enum {
  ncclSuccess = 0, ncclUnhandledCudaError = 1, ncclSystemError = 2, ncclInternalError = 3,
  ncclInvalidArgument = 4, ncclInvalidUsage = 5, ncclRemoteError = 6, ncclInProgress = 7,
  ncclTimeout = 8, ncclNumResults = 9
} ncclResult_t;
typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4, ncclNumOps = 5 } ncclRedOp_t;
typedef enum {
  ncclInt8 = 0, ncclChar = 0, ncclUint8 = 1, ncclInt32 = 2, ncclInt = 2, ncclUint32 = 3, ncclInt64 = 4,
  ncclUint64 = 5, ncclFloat16 = 6, ncclHalf = 6, ncclFloat32 = 7, ncclFloat = 7, ncclFloat64 = 8,
  ncclDouble = 8, ncclBfloat16 = 9, ncclNumTypes = 10
} ncclDataType_t;

namespace cuemu::nccl {

inline size_t type_size(ncclDataType_t t) {
  static const size_t s[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2};
  return t >= 0 && t < ncclNumTypes ? s[t] : 0;
}

struct Msg {
  std::vector<char> data;
  size_t count;
  ncclDataType_t type;
};

struct CollArgs {
  const void* send;
  void* recv;
  size_t count;
  ncclDataType_t type;
  int op, root;
  const char* name;
};

// State shared by the ranks of one communicator.
struct Clique {
  int n;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<bool> joined;
  int njoined = 0;
  std::vector<std::deque<Msg>> inbox;  // [dst * n + src]
  std::vector<CollArgs> args;           // this collective's arguments, one per rank
  int bcount = 0;                       // reusable barrier
  uint64_t bgen = 0;
  explicit Clique(int n) : n(n), joined(n), inbox(size_t(n) * n), args(n) {}
};

inline std::chrono::seconds timeout() {
  const char* v = std::getenv("LLMKERN_EMU_NCCL_TIMEOUT_S");
  return std::chrono::seconds(v && *v ? std::atol(v) : 60);
}

inline std::mutex& registry_mutex() { static std::mutex m; return m; }
inline std::map<std::string, std::weak_ptr<Clique>>& registry() {
  static std::map<std::string, std::weak_ptr<Clique>> r;
  return r;
}

struct PendingP2P {
  bool send;
  const void* sbuf;
  void* rbuf;
  size_t count;
  ncclDataType_t type;
  int peer;
  ncclComm_t comm;
};
struct GroupState {
  int depth = 0;
  std::vector<PendingP2P> ops;
};
inline thread_local GroupState tl_group;

}  // namespace cuemu::nccl

struct ncclComm {
  std::shared_ptr<cuemu::nccl::Clique> clique;
  int rank, nranks;
  std::string last_error;
};

namespace cuemu::nccl {

inline ncclResult_t error(ncclComm_t comm, ncclResult_t r, const std::string& msg) {
  if (comm) comm->last_error = "cuemu nccl rank " + std::to_string(comm->rank) + ": " + msg;
  return r;
}

// Waits until all ranks of the clique arrive. Called with `lock` held.
inline bool barrier(Clique& c, std::unique_lock<std::mutex>& lock) {
  uint64_t gen = c.bgen;
  if (++c.bcount == c.n) {
    c.bcount = 0;
    c.bgen++;
    c.cv.notify_all();
    return true;
  }
  return c.cv.wait_for(lock, timeout(), [&] { return c.bgen != gen; });
}

template <typename T>
inline T combine(T a, T b, int op) {
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    float x = float(a), y = float(b);
    return T(op == ncclProd ? x * y : op == ncclMax ? (x < y ? y : x) : op == ncclMin ? (y < x ? y : x) : x + y);
  } else {
    return op == ncclProd ? T(a * b) : op == ncclMax ? (a < b ? b : a) : op == ncclMin ? (b < a ? b : a) : T(a + b);
  }
}

template <typename T>
inline void reduce(const Clique& c, int op, size_t begin, size_t count, T* out) {
  for (size_t i = 0; i < count; i++) {
    T acc = static_cast<const T*>(c.args[0].send)[begin + i];
    for (int r = 1; r < c.n; r++) acc = combine(acc, static_cast<const T*>(c.args[r].send)[begin + i], op);
    if (op == ncclAvg) {
      if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) acc = T(float(acc) / c.n);
      else acc = T(acc / T(c.n));
    }
    out[i] = acc;
  }
}

inline void reduce_any(const Clique& c, ncclDataType_t t, int op, size_t begin, size_t count, void* out) {
  switch (t) {
    case ncclInt8: return reduce(c, op, begin, count, static_cast<int8_t*>(out));
    case ncclUint8: return reduce(c, op, begin, count, static_cast<uint8_t*>(out));
    case ncclInt32: return reduce(c, op, begin, count, static_cast<int32_t*>(out));
    case ncclUint32: return reduce(c, op, begin, count, static_cast<uint32_t*>(out));
    case ncclInt64: return reduce(c, op, begin, count, static_cast<int64_t*>(out));
    case ncclUint64: return reduce(c, op, begin, count, static_cast<uint64_t*>(out));
    case ncclFloat16: return reduce(c, op, begin, count, static_cast<__half*>(out));
    case ncclFloat32: return reduce(c, op, begin, count, static_cast<float*>(out));
    case ncclFloat64: return reduce(c, op, begin, count, static_cast<double*>(out));
    case ncclBfloat16: return reduce(c, op, begin, count, static_cast<__nv_bfloat16*>(out));
    default: return;
  }
}

// Collectives inside a group run immediately; only point-to-point calls are deferred to ncclGroupEnd.
// The common frame of every collective: publish arguments, wait for all ranks, check that they agree,
// compute this rank's output into a private buffer, wait again (nobody reads a send buffer after
// this), then write the output. The private buffer makes in-place calls (send == recv) safe.
inline ncclResult_t collective(ncclComm_t comm, CollArgs a, size_t out_bytes,
                               void (*compute)(const Clique&, int rank, const CollArgs&, char* out)) {
  if (!comm) return ncclInvalidArgument;
  if (!type_size(a.type) || a.op < 0 || a.op >= ncclNumOps)
    return error(comm, ncclInvalidArgument, std::string(a.name) + ": unsupported data type or operation");
  Clique& c = *comm->clique;
  std::unique_lock<std::mutex> lock(c.mu);
  c.args[comm->rank] = a;
  if (!barrier(c, lock)) return error(comm, ncclSystemError, std::string(a.name) + ": timed out waiting for all ranks");
  const CollArgs& r0 = c.args[0];
  bool same = true;
  for (int r = 0; r < c.n; r++)
    same &= c.args[r].count == r0.count && c.args[r].type == r0.type && c.args[r].op == r0.op &&
            c.args[r].root == r0.root && c.args[r].name == r0.name;
  lock.unlock();
  std::vector<char> out(same ? out_bytes : 0);
  if (same) compute(c, comm->rank, a, out.data());
  lock.lock();
  if (!barrier(c, lock)) return error(comm, ncclSystemError, std::string(a.name) + ": timed out waiting for all ranks");
  lock.unlock();
  if (!same)
    return error(comm, ncclInvalidUsage, std::string(a.name) + ": ranks called it with different count, type, "
                 "operation or root (or different collectives)");
  if (out_bytes) std::memcpy(a.recv, out.data(), out_bytes);
  return ncclSuccess;
}

inline ncclResult_t send_now(const PendingP2P& p) {
  ncclComm_t comm = p.comm;
  Clique& c = *comm->clique;
  if (p.peer < 0 || p.peer >= c.n) return error(comm, ncclInvalidArgument, "ncclSend: peer out of range");
  size_t bytes = p.count * type_size(p.type);
  Msg m{std::vector<char>(static_cast<const char*>(p.sbuf), static_cast<const char*>(p.sbuf) + bytes), p.count,
        p.type};
  std::lock_guard<std::mutex> lock(c.mu);
  c.inbox[size_t(p.peer) * c.n + comm->rank].push_back(std::move(m));
  c.cv.notify_all();
  return ncclSuccess;
}

inline ncclResult_t recv_now(const PendingP2P& p) {
  ncclComm_t comm = p.comm;
  Clique& c = *comm->clique;
  if (p.peer < 0 || p.peer >= c.n) return error(comm, ncclInvalidArgument, "ncclRecv: peer out of range");
  std::unique_lock<std::mutex> lock(c.mu);
  auto& q = c.inbox[size_t(comm->rank) * c.n + p.peer];
  if (!c.cv.wait_for(lock, timeout(), [&] { return !q.empty(); }))
    return error(comm, ncclSystemError, "ncclRecv from rank " + std::to_string(p.peer) +
                 " timed out (no matching ncclSend; a send/recv cycle outside ncclGroupStart/End?)");
  Msg m = std::move(q.front());
  q.pop_front();
  lock.unlock();
  if (m.count != p.count || m.type != p.type)
    return error(comm, ncclInvalidUsage, "ncclRecv of " + std::to_string(p.count) + " elements (type " +
                 std::to_string(p.type) + ") matched a send of " + std::to_string(m.count) + " (type " +
                 std::to_string(m.type) + ")");
  if (!m.data.empty()) std::memcpy(p.rbuf, m.data.data(), m.data.size());
  return ncclSuccess;
}

inline ncclResult_t p2p(const PendingP2P& p) {
  if (!p.comm) return ncclInvalidArgument;
  if (!type_size(p.type)) return error(p.comm, ncclInvalidArgument, "unsupported data type");
  if (tl_group.depth) return tl_group.ops.push_back(p), ncclSuccess;
  return p.send ? send_now(p) : recv_now(p);
}

}  // namespace cuemu::nccl

inline const char* ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error (emulated NCCL: see ncclGetLastError)";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    case ncclTimeout: return "timeout";
    default: return "unknown result code";
  }
}
inline const char* ncclGetLastError(ncclComm_t comm) { return comm ? comm->last_error.c_str() : ""; }
inline ncclResult_t ncclGetVersion(int* v) { *v = NCCL_VERSION_CODE; return ncclSuccess; }

inline ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  static std::atomic<uint64_t> counter{0};
  std::memset(id->internal, 0, sizeof id->internal);
  std::snprintf(id->internal, sizeof id->internal, "cuemu-nccl-%d-%llu", int(getpid()),
                (unsigned long long)counter.fetch_add(1));
  return ncclSuccess;
}

// Blocks until all nranks ranks have joined, as the real call does.
inline ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  using namespace cuemu::nccl;
  if (nranks < 1 || rank < 0 || rank >= nranks) return ncclInvalidArgument;
  std::string key(id.internal, strnlen(id.internal, sizeof id.internal));
  std::shared_ptr<Clique> c;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    c = registry()[key].lock();
    if (!c) registry()[key] = c = std::make_shared<Clique>(nranks);
  }
  std::unique_lock<std::mutex> lock(c->mu);
  if (c->n != nranks || c->joined[rank]) return ncclInvalidUsage;
  c->joined[rank] = true;
  c->njoined++;
  c->cv.notify_all();
  if (!c->cv.wait_for(lock, timeout(), [&] { return c->njoined == c->n; })) return ncclSystemError;
  *comm = new ncclComm{c, rank, nranks, {}};
  return ncclSuccess;
}
inline ncclResult_t ncclCommDestroy(ncclComm_t comm) { delete comm; return ncclSuccess; }
inline ncclResult_t ncclCommAbort(ncclComm_t comm) { return ncclCommDestroy(comm); }
inline ncclResult_t ncclCommFinalize(ncclComm_t) { return ncclSuccess; }
inline ncclResult_t ncclCommGetAsyncError(ncclComm_t, ncclResult_t* e) { *e = ncclSuccess; return ncclSuccess; }
inline ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) { *count = comm->nranks; return ncclSuccess; }
inline ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) { *rank = comm->rank; return ncclSuccess; }
inline ncclResult_t ncclCommCuDevice(const ncclComm_t, int* device) { *device = 0; return ncclSuccess; }

inline ncclResult_t ncclGroupStart() { cuemu::nccl::tl_group.depth++; return ncclSuccess; }
inline ncclResult_t ncclGroupEnd() {
  auto& g = cuemu::nccl::tl_group;
  if (g.depth == 0) return ncclInvalidUsage;
  if (--g.depth) return ncclSuccess;
  std::vector<cuemu::nccl::PendingP2P> ops;
  ops.swap(g.ops);
  ncclResult_t r = ncclSuccess;
  for (auto& p : ops)
    if (p.send && r == ncclSuccess) r = cuemu::nccl::send_now(p);
  for (auto& p : ops)
    if (!p.send && r == ncclSuccess) r = cuemu::nccl::recv_now(p);
  return r;
}

inline ncclResult_t ncclSend(const void* buf, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                             cudaStream_t = nullptr) {
  return cuemu::nccl::p2p({true, buf, nullptr, count, type, peer, comm});
}
inline ncclResult_t ncclRecv(void* buf, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                             cudaStream_t = nullptr) {
  return cuemu::nccl::p2p({false, nullptr, buf, count, type, peer, comm});
}

inline ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                                  ncclComm_t comm, cudaStream_t = nullptr) {
  using namespace cuemu::nccl;
  return collective(comm, {send, recv, count, type, op, 0, "ncclAllReduce"}, count * type_size(type),
                    [](const Clique& c, int, const CollArgs& a, char* out) {
                      reduce_any(c, a.type, a.op, 0, a.count, out);
                    });
}
// recvcount elements per rank; rank r gets block r of the reduction.
inline ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recvcount, ncclDataType_t type,
                                      ncclRedOp_t op, ncclComm_t comm, cudaStream_t = nullptr) {
  using namespace cuemu::nccl;
  return collective(comm, {send, recv, recvcount, type, op, 0, "ncclReduceScatter"}, recvcount * type_size(type),
                    [](const Clique& c, int rank, const CollArgs& a, char* out) {
                      reduce_any(c, a.type, a.op, size_t(rank) * a.count, a.count, out);
                    });
}
inline ncclResult_t ncclAllGather(const void* send, void* recv, size_t sendcount, ncclDataType_t type,
                                  ncclComm_t comm, cudaStream_t = nullptr) {
  using namespace cuemu::nccl;
  return collective(comm, {send, recv, sendcount, type, ncclSum, 0, "ncclAllGather"},
                    sendcount * type_size(type) * size_t(comm ? comm->nranks : 0),
                    [](const Clique& c, int, const CollArgs& a, char* out) {
                      size_t b = a.count * type_size(a.type);
                      for (int r = 0; r < c.n; r++) std::memcpy(out + r * b, c.args[r].send, b);
                    });
}
inline ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root,
                                  ncclComm_t comm, cudaStream_t = nullptr) {
  using namespace cuemu::nccl;
  if (comm && (root < 0 || root >= comm->nranks)) return ncclInvalidArgument;
  return collective(comm, {send, recv, count, type, ncclSum, root, "ncclBroadcast"}, count * type_size(type),
                    [](const Clique& c, int, const CollArgs& a, char* out) {
                      std::memcpy(out, c.args[a.root].send, a.count * type_size(a.type));
                    });
}

#endif  // NCCL_H_
