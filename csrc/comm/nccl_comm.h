// An NCCL communicator exposed to Python as torch.classes.<ns>.NcclComm (ns = llmkern for the nvcc
// build, llmkern_emu for the emulated build, where <nccl.h> is csrc/emu's fake with threads as ranks).
//
// Why a TorchScript custom class (torch::CustomClassHolder + TORCH_LIBRARY) and not a pybind class:
// the extensions have no pybind module (csrc/module.cpp is plain C API and the project keeps pybind
// entry points out, STYLE.md), a custom class needs no torch/extension.h, and torch releases the GIL
// around custom-class methods (pybind_utils.h runAndInsertCall), which the emulated tests rely on:
// their ranks are Python threads that block inside NCCL calls waiting for each other.
//
// The torch.distributed Store is not a TorchScript class (torch.classes has c10d.ProcessGroup, not
// Store), so the Store half of the bootstrap lives in Python (llmkern/parallel/nccl.py): rank 0 calls
// NcclComm.unique_id() and store.set(key, bytes), the others store.get(key) with the store's timeout,
// and every rank constructs NcclComm(id, rank, world, device), which calls ncclCommInitRank.
#pragma once
#include <ATen/ATen.h>
#include <nccl.h>
#include <torch/custom_class.h>

#include <string>

namespace llmkern::comm {

class NcclComm : public torch::CustomClassHolder {
 public:
  // unique_id: the 128 bytes of rank 0's ncclUniqueId as a CPU uint8 tensor. device: the CUDA device
  // this rank uses (ignored by the emulated build, whose tensors are on the CPU).
  NcclComm(at::Tensor unique_id, int64_t rank, int64_t world, int64_t device);
  ~NcclComm() override;

  static at::Tensor unique_id();

  enum class Reduce { kSum, kAvg, kMax };

  // Sums (op="sum"), averages (op="avg") or takes the elementwise maximum (op="max") of the contiguous
  // tensor x in place across the ranks. algo="ring": our ring of ncclSend/ncclRecv with
  // ring_reduce_kernel; algo="nccl": ncclAllReduce. accumulate_fp32 (ring only, fp16/bf16, sum/avg):
  // partial sums travel and are added in fp32, rounded to the buffer's dtype once. Returns the bytes
  // this rank sent (for "nccl", the ring-equivalent count 2(world-1)/world of the buffer: NCCL
  // chooses its own algorithm).
  int64_t all_reduce_(at::Tensor x, std::string algo, std::string op, bool accumulate_fp32);

  // x holds world*k elements: afterwards chunk [rank*k, (rank+1)*k) holds the reduction of every
  // rank's chunk `rank` (the rest of x holds partial results). Returns the bytes sent: (world-1)*k
  // elements (fp32 partial sums: more, as in all_reduce_).
  int64_t reduce_scatter_(at::Tensor x, std::string algo, std::string op, bool accumulate_fp32);

  // x holds world*k elements, this rank's shard at [rank*k, (rank+1)*k): afterwards every chunk holds
  // its owner's shard. Returns the bytes sent: (world-1)*k elements.
  int64_t all_gather_(at::Tensor x, std::string algo);

  // Frees the communicator without waiting for peers (ncclCommAbort); any later call raises.
  void abort();

  int64_t rank() const { return rank_; }
  int64_t world_size() const { return world_; }
  int64_t device() const { return device_; }
  // The first error this communicator hit ("" while healthy); it is unusable after one.
  std::string error() const { return error_; }

 private:
  void check(ncclResult_t r, const std::string& what);
  void check_buffer(const at::Tensor& x, const std::string& algo, const char* what);
  void check_shardable(const at::Tensor& x, const char* what) const;
  static Reduce parse_op(const std::string& op, const char* what);
  // One ring step: send to the right neighbour and receive from the left one in one NCCL group.
  void exchange(const void* send, int64_t send_n, int send_t, void* recv, int64_t recv_n, int recv_t,
                const char* phase, int step);
  template <class T>
  int64_t reduce_scatter_phase(T* buf, int64_t n, const at::Tensor& like, Reduce op, bool fp32);
  template <class T>
  int64_t all_gather_phase(T* buf, int64_t n);

  ncclComm_t comm_ = nullptr;
  int64_t rank_, world_, device_;
  std::string error_;
};

}  // namespace llmkern::comm
