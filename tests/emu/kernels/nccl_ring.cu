// The fake NCCL with 4 thread-ranks: a ring exchange with ncclSend/ncclRecv in groups, a ring
// all-reduce built from it (reduce-scatter + all-gather, with an emulated add kernel launched
// concurrently from every rank thread; rank r owns chunk r as in csrc/comm/ring_schedule.h),
// ncclAllReduce over every type and operation, and in-place ncclReduceScatter / ncclAllGather (what
// NcclComm's algo="nccl" calls).
#include <nccl.h>
#include "llmkern/launch.cuh"
#include "harness.h"
#include <cmath>
#include <mutex>
#include <thread>

constexpr int R = 4;

#define NCCL_OK(expr)                                                                        \
  do {                                                                                       \
    ncclResult_t r_ = (expr);                                                                \
    if (r_ != ncclSuccess) throw std::runtime_error(std::string(#expr) + ": " + ncclGetErrorString(r_)); \
  } while (0)

template <typename F>
static void run_ranks(F f) {
  ncclUniqueId id;
  ncclGetUniqueId(&id);
  std::vector<std::thread> ts;
  std::vector<std::string> errors(R);
  for (int r = 0; r < R; r++)
    ts.emplace_back([&, r] {
      try {
        ncclComm_t comm;
        NCCL_OK(ncclCommInitRank(&comm, R, id, r));
        f(comm, r);
        NCCL_OK(ncclCommDestroy(comm));
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  for (auto& t : ts) t.join();
  for (auto& e : errors)
    if (!e.empty()) throw std::runtime_error(e);
}

__global__ void add_into(float* dst, const float* src, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) dst[i] += src[i];
}

// Ring all-reduce over a (R * C)-element buffer: R-1 reduce-scatter steps, then R-1 all-gather steps.
// Each step sends one chunk to the right neighbour and receives one from the left, in one group.
TEST_CASE(ring_allreduce) {
  const int C = 1000, N = R * C;
  std::vector<std::vector<float>> data(R);
  for (int r = 0; r < R; r++) data[r] = harness::random_vector(N, 100 + r);
  std::vector<double> ref(N, 0.0);
  for (int r = 0; r < R; r++)
    for (int i = 0; i < N; i++) ref[i] += data[r][i];
  run_ranks([&](ncclComm_t comm, int r) {
    int n, me;
    ncclCommCount(comm, &n);
    ncclCommUserRank(comm, &me);
    if (n != R || me != r) throw std::runtime_error("bad count or rank");
    float* buf = data[r].data();
    std::vector<float> tmp(C);
    int right = (r + 1) % R, left = (r + R - 1) % R;
    for (int s = 0; s < R - 1; s++) {  // after step s, chunk (r - s - 2) holds s + 2 contributions
      int send_chunk = (r - s - 1 + R) % R, recv_chunk = (r - s - 2 + 2 * R) % R;
      NCCL_OK(ncclGroupStart());
      NCCL_OK(ncclSend(buf + send_chunk * C, C, ncclFloat, right, comm, nullptr));
      NCCL_OK(ncclRecv(tmp.data(), C, ncclFloat, left, comm, nullptr));
      NCCL_OK(ncclGroupEnd());
      LAUNCH(add_into, 4, 128, 0, nullptr)(buf + recv_chunk * C, tmp.data(), C);
    }
    for (int s = 0; s < R - 1; s++) {  // rank r owns the reduced chunk r
      int send_chunk = (r - s + R) % R, recv_chunk = (r - s - 1 + R) % R;
      NCCL_OK(ncclGroupStart());
      NCCL_OK(ncclSend(buf + send_chunk * C, C, ncclFloat, right, comm, nullptr));
      NCCL_OK(ncclRecv(buf + recv_chunk * C, C, ncclFloat, left, comm, nullptr));
      NCCL_OK(ncclGroupEnd());
    }
  });
  double err = 0;
  for (int r = 0; r < R; r++)
    for (int i = 0; i < N; i++) err = std::max(err, std::fabs(data[r][i] - ref[i]));
  std::printf("RESULT case=ring_allreduce err=%.3g\n", err);
}

template <typename T>
static double to_d(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return double(v);
}
template <typename T>
static T from_d(double v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(v));
  else return T(v);
}

// In-place ncclAllReduce on every rank; the result must match a host reduction within `tol` (relative)
// and be bit-identical on all ranks.
template <typename T>
static void check_allreduce(const char* tname, ncclDataType_t type, double tol) {
  const int N = 777;
  const ncclRedOp_t ops[] = {ncclSum, ncclProd, ncclMax, ncclMin, ncclAvg};
  const char* names[] = {"sum", "prod", "max", "min", "avg"};
  for (int oi = 0; oi < 5; oi++) {
    std::vector<std::vector<T>> data(R, std::vector<T>(N));
    for (int r = 0; r < R; r++)
      for (int i = 0; i < N; i++) {
        // Small integers (prod stays exact in every type), signed where the type is.
        int v = 1 + (i * 7 + r * 3) % 5;
        data[r][i] = from_d<T>(std::is_signed_v<T> || !std::is_integral_v<T> ? ((i + r) % 3 == 0 ? -v : v) : v);
      }
    std::vector<double> ref(N);
    for (int i = 0; i < N; i++) {
      double acc = to_d(data[0][i]);
      for (int r = 1; r < R; r++) {
        double x = to_d(data[r][i]);
        acc = oi == 0 || oi == 4 ? acc + x : oi == 1 ? acc * x : oi == 2 ? std::max(acc, x) : std::min(acc, x);
      }
      ref[i] = oi == 4 ? (std::is_integral_v<T> ? double(T(acc) / T(R)) : acc / R) : acc;
    }
    run_ranks([&](ncclComm_t comm, int r) {
      NCCL_OK(ncclAllReduce(data[r].data(), data[r].data(), N, type, ops[oi], comm, nullptr));
    });
    double err = 0;
    int mismatch = 0;
    for (int r = 0; r < R; r++)
      for (int i = 0; i < N; i++) {
        err = std::max(err, std::fabs(to_d(data[r][i]) - ref[i]) / std::max(1.0, std::fabs(ref[i])));
        mismatch += std::memcmp(&data[r][i], &data[0][i], sizeof(T)) != 0;
      }
    std::printf("RESULT case=allreduce type=%s op=%s err=%.3g mismatch=%d ok=%d\n", tname, names[oi], err,
                mismatch, int(err <= tol && mismatch == 0));
  }
}
TEST_CASE(allreduce) {
  check_allreduce<float>("float32", ncclFloat32, 1e-6);
  check_allreduce<double>("float64", ncclFloat64, 1e-12);
  check_allreduce<__half>("float16", ncclFloat16, 1e-3);
  check_allreduce<__nv_bfloat16>("bfloat16", ncclBfloat16, 8e-3);
  check_allreduce<int32_t>("int32", ncclInt32, 0);
  check_allreduce<int64_t>("int64", ncclInt64, 0);
}

// In place, as NcclComm calls them: rank r's result of ncclReduceScatter lands at buf + r * C (the
// send buffer itself), and ncclAllGather reads rank r's shard from there; with the sum of 4 small
// integers, every element is exact.
TEST_CASE(reduce_scatter_all_gather) {
  const int C = 333, N = R * C;
  std::vector<std::vector<float>> data(R, std::vector<float>(N));
  std::vector<double> ref(N, 0.0);
  for (int r = 0; r < R; r++)
    for (int i = 0; i < N; i++) ref[i] += data[r][i] = float((i * 7 + r * 13) % 17 - 8);
  int bad_shard = 0, bad_gather = 0;
  std::mutex mu;
  run_ranks([&](ncclComm_t comm, int r) {
    float* buf = data[r].data();
    NCCL_OK(ncclReduceScatter(buf, buf + r * C, C, ncclFloat, ncclSum, comm, nullptr));
    int bad = 0;
    for (int i = r * C; i < (r + 1) * C; i++) bad += buf[i] != float(ref[i]);
    NCCL_OK(ncclAllGather(buf + r * C, buf, C, ncclFloat, comm, nullptr));
    int bad_all = 0;
    for (int i = 0; i < N; i++) bad_all += buf[i] != float(ref[i]);
    std::lock_guard<std::mutex> lock(mu);
    bad_shard += bad;
    bad_gather += bad_all;
  });
  std::printf("RESULT case=reduce_scatter_all_gather bad_shard=%d bad_gather=%d\n", bad_shard, bad_gather);
}

// A receive with no matching send returns an error after the timeout instead of hanging.
TEST_CASE(recv_timeout) {
  setenv("LLMKERN_EMU_NCCL_TIMEOUT_S", "1", 1);
  run_ranks([&](ncclComm_t comm, int r) {
    float x = 0;
    ncclResult_t res = ncclRecv(&x, 1, ncclFloat, (r + 1) % R, comm, nullptr);
    if (r == 0)
      std::printf("RESULT case=recv_timeout result=%d\nMESSAGE: %s\n", int(res), ncclGetLastError(comm));
  });
}
