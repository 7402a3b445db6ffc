// cuemu: runs CUDA kernels on the CPU, so that the project's .cu sources are tested on machines
// without a GPU. Included through the stand-in <cuda_runtime.h>; kernels never include it directly.
//
// Execution model:
// - A launch is synchronous. Blocks run one after another on the launching thread, or on N OS threads
//   taking blocks from a counter (LLMKERN_EMU_WORKERS=N).
// - The threads of a block are fibers with their own stacks. A fiber runs until it waits at a barrier
//   or in a warp collective, or finishes. The order in which the scheduler passes over runnable fibers
//   is LLMKERN_EMU_SCHEDULE=forward|reverse|random:SEED, so a missing barrier shows up as a wrong
//   result under at least one order (forward misses reads of lower-index slots, reverse the others).
// - __syncthreads is a counting barrier over live threads. Warp collectives are keyed by their mask:
//   the last lane to arrive computes every lane's result while the others are suspended.
// - Every misuse that is undefined or hangs on a GPU is reported: divergent barriers, masks that
//   exclude the caller or name missing or exited lanes, lanes in different collectives, deadlocks,
//   exits while others wait at a barrier (strict mode, LLMKERN_EMU_STRICT=0 turns it off), exceptions
//   thrown by kernel code. The launch throws cuemu::KernelError naming the kernel, and the emulator is
//   ready for the next launch.
#pragma once
#define CUEMU 1

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <sys/mman.h>
#include <unistd.h>

#include <vector_types.h>
#include <driver_types.h>

#if !defined(__x86_64__) || defined(CUEMU_UCONTEXT)
#define CUEMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define CUEMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUEMU_ASAN 1
#endif
#endif
#if defined(CUEMU_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// The built-in variables. They are per OS thread, and the scheduler writes the values of the fiber it
// resumes. Fibers never migrate between OS threads, so a cached TLS address stays valid.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
inline constexpr int warpSize = 32;

namespace cuemu {

// What every kernel error is thrown as, on the launching thread.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

inline std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
inline std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

// 256 KiB per fiber: kernels keep small frames, but an ASan build triples them. The memory is
// reserved, not committed, so 1024 fibers cost 256 MiB of address space and a few pages each.
inline constexpr size_t kStackBytes = 256 << 10;
inline constexpr size_t kGuardBytes = 4096;

enum class St : uint8_t { Ready, Barrier, Warp, Done };

struct Fiber {
  void* sp = nullptr;   // saved stack pointer while suspended
  char* stack = nullptr;  // mmap'ed region, guard page at its low end
  uint3 tid{};
  unsigned linear = 0;
  St st = St::Ready;
  int bar_pred = 0, bar_result = 0;
  void* asan_fake = nullptr;
#if defined(CUEMU_USE_UCONTEXT)
  ucontext_t uc;
#endif
};

using Compute = void (*)(void* const* slots, unsigned mask);

struct Group {  // one pending warp collective
  unsigned mask = 0, arrived = 0;
  Compute op = nullptr;
  const char* name = "";
};

struct Warp {
  Group groups[32];
  int ngroups = 0;
  void* slot[32] = {};
  unsigned exists = 0, exited = 0;
};

enum BarKind { kSync, kCount, kAnd, kOr };
const char* const kBarName[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and",
                                "__syncthreads_or"};

struct Block {
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<Fiber>* fibers = nullptr;
  std::vector<Warp> warps;
  unsigned n = 0, live = 0, exited = 0;
  unsigned bar_waiting = 0;
  const char* bar_file = "";
  int bar_line = 0, bar_kind = kSync;
  bool strict = true, failed = false;
  std::string error;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
  unsigned char* dyn = nullptr;
#if defined(CUEMU_USE_UCONTEXT)
  ucontext_t sched_uc;
#endif
  const void* asan_sched_bottom = nullptr;
  size_t asan_sched_size = 0;
  void* asan_sched_fake = nullptr;
};

inline thread_local Block* tl_block = nullptr;

// Fiber stacks, kept per OS thread and reused by every block that thread runs.
struct StackPool {
  std::vector<char*> free;
  char* get() {
    if (!free.empty()) {
      char* s = free.back();
      free.pop_back();
      return s;
    }
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw KernelError("cuemu: cannot map a fiber stack");
    mprotect(p, kGuardBytes, PROT_NONE);
    return static_cast<char*>(p);
  }
  void put(char* s) { free.push_back(s); }
  ~StackPool() {
    for (char* s : free) munmap(s, kStackBytes);
  }
};
inline thread_local StackPool tl_stacks;

// ---- context switch ------------------------------------------------------------------------------
#if !defined(CUEMU_USE_UCONTEXT)
// x86-64 SysV: save the callee-saved registers, MXCSR and the x87 control word on the current stack,
// store the stack pointer, load the other one and restore the same set. Measured on 2 shared cores
// (load ~6): __syncthreads costs 50-120 ns per thread in a 256-thread block, 12-15x less than with
// swapcontext (-DCUEMU_UCONTEXT), which makes a sigprocmask system call on every switch.
__attribute__((naked, noinline, used)) static void cuemu_switch(void** /*save_sp*/, void* /*load_sp*/) {
  asm volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "subq $8, %rsp\n\tstmxcsr (%rsp)\n\tfnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\tfldcw 4(%rsp)\n\taddq $8, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}
// First code a new fiber runs: cuemu_switch "returns" here with r12 = the fiber and r13 = its entry.
__attribute__((naked, noinline, used)) static void cuemu_trampoline() {
  asm volatile("movq %r12, %rdi\n\tandq $-16, %rsp\n\tcall *%r13\n\tud2\n\t");
}
#endif

[[noreturn]] void fiber_entry(Fiber* f);

inline void asan_start(void** fake, const void* bottom, size_t size) {
#if defined(CUEMU_ASAN)
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}
inline void asan_finish(void* fake, const void** bottom, size_t* size) {
#if defined(CUEMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}

#if defined(CUEMU_USE_UCONTEXT)
inline void uc_entry() { fiber_entry(tl_block->cur); }
#endif

inline void init_fiber(Fiber& f) {
#if defined(CUEMU_ASAN)
  // A fiber abandoned after an error leaves its stack redzones poisoned.
  __asan_unpoison_memory_region(f.stack + kGuardBytes, kStackBytes - kGuardBytes);
#endif
#if defined(CUEMU_USE_UCONTEXT)
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack + kGuardBytes;
  f.uc.uc_stack.ss_size = kStackBytes - kGuardBytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, uc_entry, 0);
#else
  // 64 zeroed bytes above the first frame end the frame-pointer chain for unwinders (ASan's reports).
  auto* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes) - 8;
  std::memset(top, 0, 64);
  uint64_t* sp = top - 8;
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpucw));
  uint64_t ctl = mxcsr | (uint64_t(fpucw) << 32);
  sp[0] = ctl;                                          // mxcsr | x87 control word
  sp[1] = 0;                                            // r15
  sp[2] = 0;                                            // r14
  sp[3] = reinterpret_cast<uint64_t>(&fiber_entry);     // r13
  sp[4] = reinterpret_cast<uint64_t>(&f);               // r12
  sp[5] = 0;                                            // rbx
  sp[6] = 0;                                            // rbp
  sp[7] = reinterpret_cast<uint64_t>(&cuemu_trampoline);  // return address
  f.sp = sp;
#endif
}

// Scheduler -> fiber.
inline void resume(Block& b, Fiber& f) {
  b.cur = &f;
  threadIdx = f.tid;
  asan_start(&b.asan_sched_fake, f.stack + kGuardBytes, kStackBytes - kGuardBytes);
#if defined(CUEMU_USE_UCONTEXT)
  swapcontext(&b.sched_uc, &f.uc);
#else
  cuemu_switch(&b.sched_sp, f.sp);
#endif
  asan_finish(b.asan_sched_fake, nullptr, nullptr);
}

// Fiber -> scheduler. A fiber that will never run again passes dying = true.
inline void yield(bool dying = false) {
  Block& b = *tl_block;
  Fiber& f = *b.cur;
  asan_start(dying ? nullptr : &f.asan_fake, b.asan_sched_bottom, b.asan_sched_size);
#if defined(CUEMU_USE_UCONTEXT)
  swapcontext(&f.uc, &b.sched_uc);
#else
  cuemu_switch(&f.sp, b.sched_sp);
#endif
  asan_finish(f.asan_fake, nullptr, nullptr);
}

inline std::string where(const Block& b, const Fiber& f) {
  return fmt("block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z, f.tid.x, f.tid.y,
             f.tid.z) + (b.n > 1 ? fmt(" [warp %u lane %u]", f.linear / 32, f.linear % 32) : std::string());
}

// Records an error for the current fiber and abandons it. Objects on the stacks of abandoned fibers
// are not destroyed; kernels hold none that own memory.
[[noreturn]] inline void fail(const std::string& msg) {
  if (!tl_block) throw KernelError("cuemu: " + msg + " (outside a kernel)");
  Block& b = *tl_block;
  if (!b.failed) {
    b.failed = true;
    b.error = where(b, *b.cur) + ": " + msg;
  }
  b.cur->st = St::Done;
  yield(true);
  __builtin_unreachable();
}

inline void release_barrier(Block& b) {
  int count = 0;
  for (Fiber& f : *b.fibers)
    if (f.st == St::Barrier) count += f.bar_pred;
  int r = b.bar_kind == kCount ? count : b.bar_kind == kAnd ? count == int(b.bar_waiting) : count > 0;
  for (Fiber& f : *b.fibers)
    if (f.st == St::Barrier) f.st = St::Ready, f.bar_result = r;
  b.bar_waiting = 0;
}

[[noreturn]] inline void thread_exit(Block& b, Fiber& f) {
  f.st = St::Done;
  b.live--;
  b.exited++;
  Warp& w = b.warps[f.linear / 32];
  unsigned bit = 1u << (f.linear % 32);
  w.exited |= bit;
  for (int i = 0; i < w.ngroups; i++)
    if (w.groups[i].mask & bit)
      fail(fmt("exited while its lane is named in the mask 0x%08x of a pending %s (lanes 0x%08x wait)",
               w.groups[i].mask, w.groups[i].name, w.groups[i].arrived));
  if (b.bar_waiting) {
    if (b.strict)
      fail(fmt("exited while %u threads wait at %s (%s:%d); in CUDA a barrier must be reached by all "
               "threads of the block (early return before a barrier?)",
               b.bar_waiting, kBarName[b.bar_kind], b.bar_file, b.bar_line));
    if (b.bar_waiting == b.live) release_barrier(b);
  }
  yield(true);
  __builtin_unreachable();
}

[[noreturn]] inline void fiber_entry(Fiber* f) {
  Block& b = *tl_block;
  asan_finish(nullptr, &b.asan_sched_bottom, &b.asan_sched_size);
  std::string thrown;
  bool threw = false;
  // The message is copied out before fail(): switching away from inside a catch block would leave
  // the exception on this OS thread's caught-exceptions stack.
  try {
    b.body(b.ctx);
  } catch (const std::exception& e) {
    threw = true, thrown = e.what();
  } catch (...) {
    threw = true, thrown = "unknown exception";
  }
  if (threw) fail("exception thrown in kernel code: " + thrown);
  thread_exit(b, *f);
}

inline int barrier(int kind, int pred, const char* file, int line) {
  Block* bp = tl_block;
  if (!bp) throw KernelError(fmt("cuemu: %s called outside a kernel", kBarName[kind]));
  Block& b = *bp;
  Fiber& f = *b.cur;
  if (b.strict && b.exited)
    fail(fmt("%s at %s:%d reached after %u threads of the block exited; in CUDA every thread must reach "
             "it (early return before a barrier?)", kBarName[kind], file, line, b.exited));
  if (b.bar_waiting == 0) {
    b.bar_file = file, b.bar_line = line, b.bar_kind = kind;
  } else if (line != b.bar_line || kind != b.bar_kind || std::strcmp(file, b.bar_file) != 0) {
    fail(fmt("divergent barrier: %s at %s:%d while %u threads wait at %s at %s:%d", kBarName[kind], file,
             line, b.bar_waiting, kBarName[b.bar_kind], b.bar_file, b.bar_line));
  }
  f.st = St::Barrier;
  f.bar_pred = pred != 0;
  if (++b.bar_waiting == b.live) {
    release_barrier(b);
  } else {
    yield();
  }
  return f.bar_result;
}

// A warp collective: `payload` points to this lane's arguments and result on its own stack; when the
// last lane of `mask` arrives, `op` computes all lanes' results from the parked payloads.
inline void warp_collective(const char* name, unsigned mask, void* payload, Compute op) {
  Block* bp = tl_block;
  if (!bp) throw KernelError(fmt("cuemu: %s called outside a kernel", name));
  Block& b = *bp;
  Fiber& f = *b.cur;
  unsigned lane = f.linear % 32, bit = 1u << lane;
  Warp& w = b.warps[f.linear / 32];
  if (!(mask & bit)) fail(fmt("%s with mask 0x%08x, which excludes the calling lane %u", name, mask, lane));
  if (mask & ~w.exists)
    fail(fmt("%s with mask 0x%08x names lanes 0x%08x that do not exist (block of %u threads: this warp "
             "has lanes 0x%08x)", name, mask, mask & ~w.exists, b.n, w.exists));
  if (mask & w.exited)
    fail(fmt("%s with mask 0x%08x names lanes 0x%08x that already exited", name, mask, mask & w.exited));
  Group* g = nullptr;
  for (int i = 0; i < w.ngroups; i++)
    if (w.groups[i].mask & mask) g = &w.groups[i];
  if (!g) {
    g = &w.groups[w.ngroups++];
    *g = Group{mask, 0, op, name};
  } else if (g->mask != mask || g->op != op) {
    fail(fmt("%s with mask 0x%08x while lanes 0x%08x of this warp wait in %s with mask 0x%08x (divergent "
             "or overlapping warp collectives)", name, mask, g->arrived, g->name, g->mask));
  }
  w.slot[lane] = payload;
  g->arrived |= bit;
  if (g->arrived != g->mask) {
    f.st = St::Warp;
    yield();
    return;
  }
  unsigned m = g->mask;
  *g = w.groups[--w.ngroups];
  op(w.slot, m);
  unsigned base = f.linear & ~31u;
  for (unsigned l = 0; l < 32; l++)
    if ((m >> l & 1) && l != lane) (*b.fibers)[base + l].st = St::Ready;
}

// ---- launch ------------------------------------------------------------------------------------
struct Schedule {
  enum Kind { kForward, kReverse, kRandom } kind = kForward;
  uint64_t seed = 0;
};

inline uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct LaunchSpec {
  const char* kernel;
  dim3 grid, block;
  size_t smem;
  void (*body)(void*);
  void* ctx;
  Schedule sched;
  bool strict;
};

inline void run_block(const LaunchSpec& s, Block& b, std::vector<Fiber>& fibers, size_t index,
                      std::vector<unsigned>& order) {
  blockIdx = uint3{unsigned(index % s.grid.x), unsigned(index / s.grid.x % s.grid.y),
                   unsigned(index / (size_t(s.grid.x) * s.grid.y))};
  b.live = b.n;
  b.exited = 0;
  b.bar_waiting = 0;
  for (Warp& w : b.warps) w.ngroups = 0, w.exited = 0;
  if (s.smem) std::memset(b.dyn, 0xFF, s.smem);  // NaN for float/half/bf16: unwritten reads show
  for (Fiber& f : fibers) f.st = St::Ready, init_fiber(f);
  uint64_t rng = s.sched.seed ^ (0xD1B54A32D192ED03ull * (index + 1));
  while (b.live) {
    bool progressed = false;
    if (s.sched.kind == Schedule::kRandom)
      for (unsigned i = b.n; i > 1; i--) std::swap(order[i - 1], order[splitmix(rng) % i]);
    for (unsigned k = 0; k < b.n; k++) {
      unsigned i = s.sched.kind == Schedule::kReverse ? b.n - 1 - k : order[k];
      if (fibers[i].st != St::Ready) continue;
      progressed = true;
      resume(b, fibers[i]);
      if (b.failed) return;
    }
    if (!progressed && b.live) {
      unsigned at_warp = 0;
      std::string groups;
      for (size_t wi = 0; wi < b.warps.size(); wi++)
        for (int gi = 0; gi < b.warps[wi].ngroups; gi++) {
          const Group& g = b.warps[wi].groups[gi];
          at_warp += __builtin_popcount(g.arrived);
          groups += fmt("; warp %zu: lanes 0x%08x wait in %s for lanes 0x%08x", wi, g.arrived, g.name,
                        g.mask & ~g.arrived);
        }
      b.failed = true;
      b.error = fmt("block (%u,%u,%u): deadlock: %u threads wait at %s (%s:%d), %u in warp collectives, "
                    "%u exited", blockIdx.x, blockIdx.y, blockIdx.z, b.bar_waiting, kBarName[b.bar_kind],
                    b.bar_file, b.bar_line, at_warp, b.exited) + groups;
      return;
    }
  }
}

// Runs blocks taken from `next` on the calling OS thread until none are left or one fails.
inline void worker(const LaunchSpec& s, size_t nblocks, std::atomic<size_t>& next, std::atomic<bool>& stop,
                   std::mutex& mu, std::string& error) {
  Block b;
  std::vector<Fiber> fibers;
  unsigned n = s.block.x * s.block.y * s.block.z;
  b.body = s.body, b.ctx = s.ctx, b.n = n, b.strict = s.strict, b.fibers = &fibers;
  b.warps.resize((n + 31) / 32);
  for (unsigned w = 0; w < b.warps.size(); w++)
    b.warps[w].exists = n - w * 32 >= 32 ? ~0u : (1u << (n - w * 32)) - 1;
  // Exactly the requested size, so that ASan sees an overflow; aligned for wmma (32 B) and vectors.
  std::unique_ptr<unsigned char, void (*)(unsigned char*)> dyn(
      s.smem ? static_cast<unsigned char*>(::operator new(s.smem, std::align_val_t(128))) : nullptr,
      [](unsigned char* p) { if (p) ::operator delete(p, std::align_val_t(128)); });
  b.dyn = dyn.get();
  fibers.resize(n);
  std::vector<unsigned> order(n);
  for (unsigned i = 0; i < n; i++) {
    Fiber& f = fibers[i];
    f.stack = tl_stacks.get();
    f.linear = i;
    f.tid = uint3{i % s.block.x, i / s.block.x % s.block.y, i / (s.block.x * s.block.y)};
    order[i] = i;
  }
  tl_block = &b;
  blockDim = s.block;
  gridDim = s.grid;
  size_t i;
  while (!stop.load(std::memory_order_relaxed) && (i = next.fetch_add(1)) < nblocks) {
    b.failed = false;
    run_block(s, b, fibers, i, order);
    if (b.failed) {
      std::lock_guard<std::mutex> lock(mu);
      if (error.empty()) error = b.error;
      stop = true;
    }
  }
  tl_block = nullptr;
  for (Fiber& f : fibers) tl_stacks.put(f.stack);
}

inline const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

inline Schedule schedule_from_env(const char* kernel) {
  Schedule s;
  const char* v = env("LLMKERN_EMU_SCHEDULE");
  if (!v || !std::strcmp(v, "forward")) return s;
  if (!std::strcmp(v, "reverse")) return s.kind = Schedule::kReverse, s;
  if (!std::strncmp(v, "random:", 7)) {
    char* end;
    s.seed = std::strtoull(v + 7, &end, 10);
    if (end != v + 7 && !*end) return s.kind = Schedule::kRandom, s;
  }
  throw KernelError(fmt("cuemu: kernel '%s': LLMKERN_EMU_SCHEDULE=%s is not forward, reverse or random:SEED",
                        kernel, v));
}

// Largest dynamic shared memory each kernel may request, set by cudaFuncSetAttribute.
inline std::mutex& attr_mutex() { static std::mutex m; return m; }
inline std::vector<std::pair<const void*, size_t>>& smem_attrs() {
  static std::vector<std::pair<const void*, size_t>> v;
  return v;
}
inline size_t max_dynamic_smem(const void* fn) {
  std::lock_guard<std::mutex> lock(attr_mutex());
  for (auto& [f, n] : smem_attrs())
    if (f == fn) return n;
  return 48 << 10;  // the default opt-in limit on every GPU since Volta
}

inline void launch(const void* fn, LaunchSpec s) {
  auto err = [&](const std::string& m) {
    return KernelError(fmt("cuemu: kernel '%s' (grid (%u,%u,%u), block (%u,%u,%u)): ", s.kernel, s.grid.x,
                           s.grid.y, s.grid.z, s.block.x, s.block.y, s.block.z) + m);
  };
  if (tl_block) throw err("launched from inside another kernel (dynamic parallelism is not emulated)");
  size_t n = size_t(s.block.x) * s.block.y * s.block.z;
  if (!s.grid.x || !s.grid.y || !s.grid.z || !n)
    throw err("a grid or block dimension is 0 (cudaErrorInvalidConfiguration on a GPU)");
  if (n > 1024 || s.block.z > 64) throw err(fmt("%zu threads per block; the limit is 1024 (z <= 64)", n));
  if (s.grid.y > 65535 || s.grid.z > 65535) throw err("grid y and z are limited to 65535");
  // 227 KiB: the most an H100 block can use (A100: 163 KiB); past 48 KiB the kernel must opt in.
  if (s.smem > (227u << 10)) throw err(fmt("%zu bytes of dynamic shared memory; the limit is 227 KiB", s.smem));
  if (s.smem > max_dynamic_smem(fn))
    throw err(fmt("%zu bytes of dynamic shared memory need cudaFuncSetAttribute(kernel, "
                  "cudaFuncAttributeMaxDynamicSharedMemorySize, ...) (limit now %zu)", s.smem,
                  max_dynamic_smem(fn)));
  s.sched = schedule_from_env(s.kernel);
  const char* strict = env("LLMKERN_EMU_STRICT");
  s.strict = !(strict && !std::strcmp(strict, "0"));
  size_t nblocks = size_t(s.grid.x) * s.grid.y * s.grid.z;
  size_t workers = 1;
#if !defined(CUEMU_SHARED_STATIC)  // static __shared__ storage is one copy: one worker only
  if (const char* w = env("LLMKERN_EMU_WORKERS")) workers = std::max(1l, std::atol(w));
#endif
  workers = std::min(workers, nblocks);
  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::string error;
  // Save the caller's built-ins: a host thread may itself be a rank thread of the fake NCCL.
  uint3 saved_t = threadIdx, saved_b = blockIdx;
  dim3 saved_bd = blockDim, saved_gd = gridDim;
  auto work = [&] {
    try {
      worker(s, nblocks, next, stop, mu, error);
    } catch (const std::exception& e) {  // e.g. no memory for fiber stacks
      std::lock_guard<std::mutex> lock(mu);
      if (error.empty()) error = e.what();
      stop = true;
    }
  };
  std::vector<std::thread> extra;
  for (size_t w = 1; w < workers; w++) extra.emplace_back(work);
  work();
  for (auto& t : extra) t.join();
  threadIdx = saved_t, blockIdx = saved_b, blockDim = saved_bd, gridDim = saved_gd;
  if (!error.empty()) throw err(error);
}

inline dim3 to_dim3(dim3 d) { return d; }
template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
inline dim3 to_dim3(I v) {
  // Out-of-range values become 0, which the launch reports as an invalid configuration.
  return dim3(v > 0 && uint64_t(v) <= 0x7FFFFFFFu ? unsigned(v) : 0u);
}

}  // namespace detail

// LAUNCH(kernel, grid, block, smem, stream)(args...) expands to Launcher(...)(args...).
template <typename... P>
class Launcher {
 public:
  template <typename G, typename B>
  Launcher(void (*kernel)(P...), const char* name, G grid, B block, size_t smem = 0, cudaStream_t = nullptr)
      : kernel_(kernel), spec_{name, detail::to_dim3(grid), detail::to_dim3(block), smem, nullptr, nullptr,
                               {}, true} {}

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "wrong number of kernel arguments");
    using Args = std::tuple<std::decay_t<P>...>;
    struct Ctx {
      void (*kernel)(P...);
      Args args;
    } ctx{kernel_, Args(std::forward<A>(args)...)};
    detail::LaunchSpec s = spec_;
    s.ctx = &ctx;
    // Each emulated thread calls the kernel with its own copy of the arguments, as on a GPU.
    s.body = [](void* p) {
      auto* c = static_cast<Ctx*>(p);
      Args copy = c->args;
      std::apply(c->kernel, std::move(copy));
    };
    detail::launch(reinterpret_cast<const void*>(kernel_), s);
  }

 private:
  void (*kernel_)(P...);
  detail::LaunchSpec spec_;
};

// This block's dynamic shared memory: exactly the launch's smem_bytes, filled with 0xFF.
inline void* dynamic_shared_memory() {
  return detail::tl_block ? detail::tl_block->dyn : nullptr;
}

}  // namespace cuemu

#include "cuemu_device.h"
