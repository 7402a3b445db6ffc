// Multi-tensor apply for the optimizer kernels (fused_adamw_, fused_sgd_): many tensors per launch.
//
// The host packs up to kMaxTensors tensors' pointers (one row per tensor list) and a block ->
// (tensor, chunk) map into one by-value kernel argument, kept under the classic 4 KB parameter
// limit (static_assert below), and launches one block of kThreads per kChunk elements, at most
// kMaxBlocks blocks per launch. 64Ki-element chunks, 512 threads and 320 blocks are the sizes apex's
// and DeepSpeed's multi_tensor_adam use: 320 blocks cover an H100's 132 SMs 2.4 times, and a model
// with ~1000 parameter tensors takes ~30 launches instead of ~1000. Tensors are bucketed by a
// caller-given key (their dtypes), since one launch is one template instantiation.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <vector>

namespace llmkern::mta {

constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

template <int kLists, int kMaxTensors>
struct Table {
  void* ptr[kLists][kMaxTensors];  // null for an empty (optional) list
  int64_t n[kMaxTensors];
  int64_t base[kMaxTensors];       // index of the tensor's first element in the concatenation of lists[0]
                                   // (the stochastic-rounding counter, rng.h)
  unsigned char tensor_of_block[kMaxBlocks];
  int chunk_of_block[kMaxBlocks];
};

// lists[0] is the reference list; an optional list may be empty. launch(table, blocks, j) is called
// for every full table, with j the index of one tensor of its bucket (to read the dtypes from).
template <int kLists, int kMaxTensors, class Key, class Launch>
void apply(const std::array<at::TensorList, kLists>& lists, Key&& key, Launch&& launch) {
  using T = Table<kLists, kMaxTensors>;
  static_assert(sizeof(T) <= 4096, "kernel parameter table over 4 KB");
  static_assert(kMaxTensors <= 256, "tensor_of_block is one byte");
  const size_t count = lists[0].size();
  std::vector<int64_t> base(count + 1, 0);
  for (size_t j = 0; j < count; ++j) base[j + 1] = base[j] + lists[0][j].numel();
  std::vector<bool> done(count, false);
  for (size_t first = 0; first < count; ++first) {
    if (done[first]) continue;
    const auto k = key(first);
    T table{};
    int nt = 0, nb = 0;
    auto flush = [&] {
      if (nb > 0) launch(table, nb, first);
      nt = nb = 0;
    };
    for (size_t j = first; j < count; ++j) {
      if (done[j] || key(j) != k) continue;
      done[j] = true;
      const int64_t n = lists[0][j].numel();
      int slot = -1;
      for (int64_t chunk = 0; chunk * kChunk < n; ++chunk) {
        if (slot < 0) {
          if (nt == kMaxTensors) flush();
          slot = nt++;
          for (int l = 0; l < kLists; ++l) table.ptr[l][slot] = lists[l].empty() ? nullptr : lists[l][j].data_ptr();
          table.n[slot] = n;
          table.base[slot] = base[j];
        }
        table.tensor_of_block[nb] = static_cast<unsigned char>(slot);
        table.chunk_of_block[nb] = static_cast<int>(chunk);
        if (++nb == kMaxBlocks) {
          flush();
          slot = -1;  // the rest of this tensor starts a new table
        }
      }
    }
    flush();
  }
}

// This block's tensor slot and element range [begin, end).
template <class TableT>
__device__ __forceinline__ void block_range(const TableT& table, int& slot, int64_t& begin, int64_t& end) {
  slot = table.tensor_of_block[blockIdx.x];
  begin = static_cast<int64_t>(table.chunk_of_block[blockIdx.x]) * kChunk;
  end = begin + kChunk < table.n[slot] ? begin + kChunk : table.n[slot];
}

}  // namespace llmkern::mta
