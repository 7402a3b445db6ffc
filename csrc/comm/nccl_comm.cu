// The NCCL communicator and the bucketed ring all-reduce (declarations and the bootstrap protocol:
// nccl_comm.h; schedule: ring_schedule.h; reduction kernel: ring_reduce.cuh). Compiled by nvcc into
// llmkern._C_cuda against the real NCCL, and by g++ into llmkern._C_emu against csrc/emu's fake
// nccl.h, where each rank is a thread and this very code runs on CPU tensors.
//
// One ring per call, on the caller's current CUDA stream: all_reduce_ runs reduce-scatter (world-1
// steps), then all-gather (world-1 steps); reduce_scatter_ and all_gather_ run one phase each, with
// rank r owning chunk r as torch.distributed's reduce_scatter_tensor / all_gather_into_tensor do (so
// their buffers must hold a multiple of world elements: equal shards). Each step is one ncclGroupStart/End holding this rank's send to the
// right neighbour and receive from the left one (the group lets every rank send and receive at once;
// without it a ring of blocking sends deadlocks). A reduce-scatter step then launches
// ring_reduce_kernel on the same stream, which adds (or, for op="max", takes the maximum of) the received chunk
// into the local one; stream order alone makes the next step's send wait for it, and makes a buffer safe to overwrite once the
// group that sent it is done. The Python side (llmkern/parallel/collectives.py, with its gradient
// buckets in llmkern/parallel/buffers.py) hands this file one flat buffer per call.
//
// fp32 accumulation of 16-bit buffers: adding two fp16 values in fp32 and rounding once is exactly
// what a correctly rounded fp16 add does, so the gain has to come from not rounding the partial
// sums between steps. With accumulate_fp32 the partial sums travel in fp32: step 0 sends the raw
// 16-bit chunk (exact), steps 1..world-2 send fp32 partials, and the last reduce-scatter step rounds
// the full sum to the buffer's dtype once; the all-gather moves the rounded values in 16 bits. A rank
// sends (2 + 4(world-2) + 2(world-1)) bytes per chunk element instead of 4(world-1): the same at
// world 2, 1.33x at 4, 1.43x at 8, 1.5x in the limit (casting the whole buffer to fp32 first costs 2x).
#include "llmkern/launch.cuh"  // first: under emulation it brings the cuda_runtime.h stand-in
#include "nccl_comm.h"
#include "ring_reduce.cuh"
#include "ring_schedule.h"
#include "llmkern/registration.h"

#include <c10/core/DeviceGuard.h>

#include <cstring>

namespace llmkern::comm {
namespace {

// The device type of this build's tensors: CUDA for nvcc, CPU under emulation.
constexpr c10::DeviceType kDevice = c10::DeviceType::LLMKERN_DEVICE_KEY;

c10::Device comm_device(int64_t index) {
  return kDevice == c10::DeviceType::CPU ? c10::Device(kDevice) : c10::Device(kDevice, c10::DeviceIndex(index));
}

ncclDataType_t nccl_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kDouble: return ncclFloat64;
    default: TORCH_CHECK(false, "NcclComm: x must be float32, float16, bfloat16 or float64, got ", t);
  }
}

ncclRedOp_t nccl_op(NcclComm::Reduce op) {
  return op == NcclComm::Reduce::kSum ? ncclSum : op == NcclComm::Reduce::kAvg ? ncclAvg : ncclMax;
}

template <class F>
void with_buffer_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(__half{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    case at::kDouble: return f(double{});
    default: TORCH_CHECK(false, "NcclComm: unsupported dtype ", t);
  }
}

template <class T>
constexpr ncclDataType_t nccl_type_of() {
  if constexpr (std::is_same_v<T, float>) return ncclFloat32;
  else if constexpr (std::is_same_v<T, __half>) return ncclFloat16;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return ncclBfloat16;
  else return ncclFloat64;
}

// A pointer into `base` whose element offset is congruent to own's modulo the kernel's pack, so that
// ring_reduce_kernel's vector loop finds recv and out aligned wherever the chunk starts. `base` comes
// from the allocator (512-byte aligned on CUDA, 64 on the CPU) and has kPack<Own> spare elements.
template <class S, class Own>
S* congruent(S* base, const Own* own) {
  return base + (reinterpret_cast<uintptr_t>(own) / sizeof(Own)) % kPack<Own>;
}

}  // namespace

NcclComm::NcclComm(at::Tensor unique_id, int64_t rank, int64_t world, int64_t device)
    : rank_(rank), world_(world), device_(device) {
  TORCH_CHECK(world >= 1, "NcclComm: world size must be >= 1, got ", world);
  TORCH_CHECK(0 <= rank && rank < world, "NcclComm: rank must be in [0, ", world, "), got ", rank);
  TORCH_CHECK(unique_id.device().is_cpu() && unique_id.scalar_type() == at::kByte &&
                  unique_id.numel() == NCCL_UNIQUE_ID_BYTES && unique_id.is_contiguous(),
              "NcclComm: unique_id must be a contiguous CPU uint8 tensor of ", NCCL_UNIQUE_ID_BYTES,
              " bytes (NcclComm.unique_id() on rank 0), got ", unique_id.scalar_type(), " of shape ",
              unique_id.sizes(), " on ", unique_id.device());
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data_ptr<uint8_t>(), NCCL_UNIQUE_ID_BYTES);
  const c10::DeviceGuard guard(comm_device(device));  // NCCL binds the communicator to the current device
  ncclComm_t c = nullptr;
  const ncclResult_t r = ncclCommInitRank(&c, int(world), id, int(rank));
  const char* last = ncclGetLastError(nullptr);
  const std::string detail = last ? last : "";
  TORCH_CHECK(r == ncclSuccess, "NcclComm: ncclCommInitRank failed on rank ", rank, " of ", world, ": ",
              ncclGetErrorString(r), detail.empty() ? "" : " (" + detail + ")",
              ". Every rank must construct its communicator with the same unique id; a rank that never "
              "joins makes the others fail here (after LLMKERN_EMU_NCCL_TIMEOUT_S under emulation)");
  comm_ = c;
}

NcclComm::~NcclComm() {
  if (comm_ == nullptr) return;
  // Destroy waits for outstanding work, which never finishes once a peer is gone: after any error,
  // abort instead (it returns without talking to the peers).
  ncclResult_t async = ncclSuccess;
  if (!error_.empty() || ncclCommGetAsyncError(comm_, &async) != ncclSuccess || async != ncclSuccess) {
    ncclCommAbort(comm_);
  } else if (ncclCommDestroy(comm_) != ncclSuccess) {
    ncclCommAbort(comm_);
  }
  comm_ = nullptr;
}

at::Tensor NcclComm::unique_id() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  TORCH_CHECK(r == ncclSuccess, "NcclComm.unique_id: ncclGetUniqueId failed: ", ncclGetErrorString(r));
  at::Tensor out = at::empty({NCCL_UNIQUE_ID_BYTES}, at::kByte);
  std::memcpy(out.data_ptr<uint8_t>(), id.internal, NCCL_UNIQUE_ID_BYTES);
  return out;
}

void NcclComm::abort() {
  if (comm_ != nullptr) ncclCommAbort(comm_);
  comm_ = nullptr;
  if (error_.empty()) error_ = "aborted by NcclComm.abort()";
}

void NcclComm::check(ncclResult_t r, const std::string& what) {
  if (r == ncclSuccess) return;
  const char* detail = ncclGetLastError(comm_);
  error_ = what + " failed on rank " + std::to_string(rank_) + " of " + std::to_string(world_) + ": " +
           ncclGetErrorString(r) + (detail && *detail ? std::string(" (") + detail + ")" : std::string());
  TORCH_CHECK(false, "NcclComm: ", error_, ". The communicator is unusable now; make a new one.");
}

template <class T>
int64_t NcclComm::reduce_scatter_phase(T* buf, int64_t n, const at::Tensor& like, Reduce op, bool fp32) {
  using A = AccType<T>;
  constexpr int N = kPack<T>;
  constexpr ncclDataType_t type = nccl_type_of<T>();
  const int world = int(world_), rank = int(rank_);
  const int steps = ring_steps(world);
  cudaStream_t stream = llmkern::current_stream();
  const int64_t largest = chunk_range(n, world, 0).count;
  const A inv = A(1) / A(world);
  const bool take_max = op == Reduce::kMax;
  // Scales of (received, own) at reduce-scatter step s. avg pre-divides every contribution once: at
  // step 0 both operands are raw inputs, afterwards the received one is already a divided partial sum.
  auto scales = [&](int s) {
    return op != Reduce::kAvg ? std::pair<A, A>{1, 1} : s == 0 ? std::pair<A, A>{inv, inv} : std::pair<A, A>{1, inv};
  };
  int64_t sent = 0;
  const at::Tensor scratch = at::empty({largest + N}, like.options());  // received 16/32/64-bit chunks
  T* recv_own = reinterpret_cast<T*>(scratch.data_ptr());
  // fp32 partial sums exist for 16-bit buffers only: the other types compile the plain loop alone
  // (10 kernel instantiations instead of 13). A maximum is exact in any dtype: it never needs them.
  constexpr bool kNarrow = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;
  if constexpr (kNarrow) {
    if (fp32 && !take_max) {
      const at::Tensor wide = at::empty({2 * (largest + N)}, like.options().dtype(at::kFloat));
      float* recv_f = wide.data_ptr<float>();
      float* send_f = recv_f + largest + N;
      const float* partial = nullptr;  // the fp32 partial sum computed at the previous step
      for (int s = 0; s < steps; ++s) {
        const RingStep st = reduce_scatter_step(rank, world, s);
        const ChunkRange snd = chunk_range(n, world, st.send_chunk), rcv = chunk_range(n, world, st.recv_chunk);
        T* own = buf + rcv.offset;
        const bool last = s == steps - 1;
        const auto [a, b] = scales(s);
        if (s == 0) {  // raw 16-bit inputs on the wire: nothing to round yet
          T* tmp = congruent(recv_own, own);
          exchange(buf + snd.offset, snd.count, type, tmp, rcv.count, type, "reduce-scatter", s);
          sent += snd.count * int64_t(sizeof(T));
          if (last) launch_ring_reduce<T, T, T>(own, tmp, own, rcv.count, a, b, false, stream);
          else launch_ring_reduce<float, T, T>(congruent(send_f, own), tmp, own, rcv.count, a, b, false, stream);
        } else {
          float* tmp = congruent(recv_f, own);
          exchange(partial, snd.count, ncclFloat32, tmp, rcv.count, ncclFloat32, "reduce-scatter", s);
          sent += snd.count * int64_t(sizeof(float));
          if (last) launch_ring_reduce<T, float, T>(own, tmp, own, rcv.count, a, b, false, stream);
          else launch_ring_reduce<float, float, T>(congruent(send_f, own), tmp, own, rcv.count, a, b, false, stream);
        }
        partial = congruent(send_f, own);
      }
      return sent;
    }
  }
  for (int s = 0; s < steps; ++s) {
    const RingStep st = reduce_scatter_step(rank, world, s);
    const ChunkRange snd = chunk_range(n, world, st.send_chunk), rcv = chunk_range(n, world, st.recv_chunk);
    T* own = buf + rcv.offset;
    T* tmp = congruent(recv_own, own);
    exchange(buf + snd.offset, snd.count, type, tmp, rcv.count, type, "reduce-scatter", s);
    const auto [a, b] = scales(s);
    launch_ring_reduce<T, T, T>(own, tmp, own, rcv.count, a, b, take_max, stream);
    sent += snd.count * int64_t(sizeof(T));
  }
  return sent;
}

template <class T>
int64_t NcclComm::all_gather_phase(T* buf, int64_t n) {
  constexpr ncclDataType_t type = nccl_type_of<T>();
  const int world = int(world_), rank = int(rank_);
  int64_t sent = 0;
  for (int s = 0; s < ring_steps(world); ++s) {  // forward the reduced chunks, received in place
    const RingStep st = all_gather_step(rank, world, s);
    const ChunkRange snd = chunk_range(n, world, st.send_chunk), rcv = chunk_range(n, world, st.recv_chunk);
    exchange(buf + snd.offset, snd.count, type, buf + rcv.offset, rcv.count, type, "all-gather", s);
    sent += snd.count * int64_t(sizeof(T));
  }
  return sent;
}

void NcclComm::exchange(const void* send, int64_t send_n, int send_t, void* recv, int64_t recv_n, int recv_t,
                        const char* phase, int step) {
  if (send_n == 0 && recv_n == 0) return;  // n < world: both neighbours agree this chunk is empty
  const int world = int(world_), rank = int(rank_);
  cudaStream_t stream = llmkern::current_stream();
  const std::string where = std::string(phase) + " step " + std::to_string(step);
  check(ncclGroupStart(), "ncclGroupStart (" + where + ")");
  if (send_n)
    check(ncclSend(send, size_t(send_n), ncclDataType_t(send_t), next_rank(rank, world), comm_, stream),
          "ncclSend (" + where + ")");
  if (recv_n)
    check(ncclRecv(recv, size_t(recv_n), ncclDataType_t(recv_t), prev_rank(rank, world), comm_, stream),
          "ncclRecv (" + where + ")");
  check(ncclGroupEnd(), "ncclGroupEnd (" + where + ")");
}

NcclComm::Reduce NcclComm::parse_op(const std::string& op, const char* what) {
  TORCH_CHECK(op == "sum" || op == "avg" || op == "max", "NcclComm.", what, ": op must be 'sum', 'avg' or 'max', got '",
              op, "'");
  return op == "sum" ? Reduce::kSum : op == "avg" ? Reduce::kAvg : Reduce::kMax;
}

void NcclComm::check_buffer(const at::Tensor& x, const std::string& algo, const char* what) {
  TORCH_CHECK(comm_ != nullptr && error_.empty(), "NcclComm.", what,
              ": the communicator is unusable after an earlier error: ", error_);
  TORCH_CHECK(algo == "ring" || algo == "nccl", "NcclComm.", what, ": algo must be 'ring' or 'nccl', got '", algo,
              "'");
  TORCH_CHECK(x.device().type() == kDevice && (kDevice == c10::DeviceType::CPU || x.device().index() == device_),
              "NcclComm.", what, ": x must be on ", comm_device(device_), " (this communicator's device), got ",
              x.device());
  TORCH_CHECK(x.is_contiguous(), "NcclComm.", what, ": x must be contiguous (a flat bucket), got strides ",
              x.strides());
  nccl_type(x.scalar_type());  // float32, float16, bfloat16 or float64, or a clear error
}

void NcclComm::check_shardable(const at::Tensor& x, const char* what) const {
  TORCH_CHECK(x.numel() % world_ == 0, "NcclComm.", what, ": x must hold a multiple of the world size (", world_,
              ") elements so that every rank's shard has the same length, got ", x.numel(),
              " elements; pad the buffer to ", (x.numel() + world_ - 1) / world_ * world_);
}

int64_t NcclComm::all_reduce_(at::Tensor x, std::string algo, std::string op, bool accumulate_fp32) {
  check_buffer(x, algo, "all_reduce_");
  const Reduce red = parse_op(op, "all_reduce_");
  const ncclDataType_t type = nccl_type(x.scalar_type());
  const bool is16 = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!(accumulate_fp32 && algo == "nccl"),
              "NcclComm.all_reduce_: accumulate_fp32 needs algo='ring' (ncclAllReduce adds in the buffer's dtype)");
  const int64_t n = x.numel();
  if (world_ == 1 || n == 0) return 0;  // one rank: the sum, average and maximum are x itself
  const c10::DeviceGuard guard(x.device());
  if (algo == "nccl") {
    check(ncclAllReduce(x.data_ptr(), x.data_ptr(), size_t(n), type, nccl_op(red), comm_, llmkern::current_stream()),
          "ncclAllReduce");
    return elements_sent(n, int(rank_), int(world_)) * int64_t(x.element_size());
  }
  int64_t sent = 0;
  with_buffer_type(x.scalar_type(), [&](auto t0) {
    using T = decltype(t0);
    T* buf = reinterpret_cast<T*>(x.data_ptr());
    sent = reduce_scatter_phase<T>(buf, n, x, red, accumulate_fp32 && is16 && world_ > 2);
    sent += all_gather_phase<T>(buf, n);
  });
  return sent;
}

int64_t NcclComm::reduce_scatter_(at::Tensor x, std::string algo, std::string op, bool accumulate_fp32) {
  check_buffer(x, algo, "reduce_scatter_");
  check_shardable(x, "reduce_scatter_");
  const Reduce red = parse_op(op, "reduce_scatter_");
  const ncclDataType_t type = nccl_type(x.scalar_type());
  const bool is16 = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!(accumulate_fp32 && algo == "nccl"),
              "NcclComm.reduce_scatter_: accumulate_fp32 needs algo='ring' (ncclReduceScatter adds in the buffer's "
              "dtype)");
  const int64_t n = x.numel(), k = n / world_;
  if (world_ == 1 || n == 0) return 0;
  const c10::DeviceGuard guard(x.device());
  if (algo == "nccl") {  // in place: NCCL's receive buffer is the send buffer + rank * k
    char* base = static_cast<char*>(x.data_ptr());
    check(ncclReduceScatter(base, base + rank_ * k * x.element_size(), size_t(k), type, nccl_op(red), comm_,
                            llmkern::current_stream()),
          "ncclReduceScatter");
    return (world_ - 1) * k * int64_t(x.element_size());
  }
  int64_t sent = 0;
  with_buffer_type(x.scalar_type(), [&](auto t0) {
    using T = decltype(t0);
    sent = reduce_scatter_phase<T>(reinterpret_cast<T*>(x.data_ptr()), n, x, red,
                                   accumulate_fp32 && is16 && world_ > 2);
  });
  return sent;
}

int64_t NcclComm::all_gather_(at::Tensor x, std::string algo) {
  check_buffer(x, algo, "all_gather_");
  check_shardable(x, "all_gather_");
  const ncclDataType_t type = nccl_type(x.scalar_type());
  const int64_t n = x.numel(), k = n / world_;
  if (world_ == 1 || n == 0) return 0;
  const c10::DeviceGuard guard(x.device());
  if (algo == "nccl") {  // in place: this rank's shard is already at rank * k
    char* base = static_cast<char*>(x.data_ptr());
    check(ncclAllGather(base + rank_ * k * x.element_size(), base, size_t(k), type, comm_, llmkern::current_stream()),
          "ncclAllGather");
    return (world_ - 1) * k * int64_t(x.element_size());
  }
  int64_t sent = 0;
  with_buffer_type(x.scalar_type(), [&](auto t0) {
    using T = decltype(t0);
    sent = all_gather_phase<T>(reinterpret_cast<T*>(x.data_ptr()), n);
  });
  return sent;
}

}  // namespace llmkern::comm

LLMKERN_LIBRARY_FRAGMENT(m) {
  using llmkern::comm::NcclComm;
  m.class_<NcclComm>("NcclComm")
      .def(torch::init<at::Tensor, int64_t, int64_t, int64_t>())
      .def_static("unique_id", &NcclComm::unique_id)
      .def("all_reduce_", &NcclComm::all_reduce_)
      .def("reduce_scatter_", &NcclComm::reduce_scatter_)
      .def("all_gather_", &NcclComm::all_gather_)
      .def("abort", &NcclComm::abort)
      .def("rank", &NcclComm::rank)
      .def("world_size", &NcclComm::world_size)
      .def("device", &NcclComm::device)
      .def("error", &NcclComm::error);
}
