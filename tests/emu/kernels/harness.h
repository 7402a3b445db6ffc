// Shared by the standalone emulator test programs: each program takes a case name as argv[1], prints
// "RESULT key=value ..." lines on success or "KERNEL_ERROR: <message>" when a launch throws, and exits
// non-zero only if the case itself is broken. tests/emu/*.py judge the output.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace harness {

inline std::map<std::string, std::function<void()>>& cases() {
  static std::map<std::string, std::function<void()>> c;
  return c;
}
struct Register {
  Register(const char* name, std::function<void()> f) { cases()[name] = std::move(f); }
};
#define TEST_CASE(name) \
  static void name();   \
  static harness::Register name##_reg(#name, name); \
  static void name()

// Deterministic uniform values in [-1, 1): random data, so that a stale value differs from a fresh one.
inline std::vector<float> random_vector(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  for (auto& x : v) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    x = float((seed >> 40) & 0xFFFFFF) / float(1 << 23) - 1.0f;
  }
  return v;
}

}  // namespace harness

int main(int argc, char** argv) {
  if (argc != 2 || !harness::cases().count(argv[1])) {
    std::fprintf(stderr, "usage: %s CASE; cases:", argv[0]);
    for (auto& [k, v] : harness::cases()) std::fprintf(stderr, " %s", k.c_str());
    std::fprintf(stderr, "\n");
    return 2;
  }
  try {
    harness::cases()[argv[1]]();
  } catch (const std::runtime_error& e) {
    std::printf("KERNEL_ERROR: %s\n", e.what());
  }
  std::fflush(stdout);
  return 0;
}
