// Op registration macros. The same sources register under `llmkern` (the _C and _C_cuda builds) and
// under `llmkern_emu` (the _C_emu build: CUDA sources compiled for the CPU), chosen by -DLLMKERN_NS.
// LLMKERN_DEVICE_KEY is CUDA for the nvcc build and CPU for the emulated build.
#pragma once
#include <torch/library.h>

#ifndef LLMKERN_NS
#define LLMKERN_NS llmkern
#endif
#ifndef LLMKERN_DEVICE_KEY
#define LLMKERN_DEVICE_KEY CUDA
#endif

// One level of indirection so that LLMKERN_NS is expanded before TORCH_LIBRARY_* pastes tokens.
#define LLMKERN_FRAGMENT_I(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define LLMKERN_IMPL_I(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
// Schemas: csrc/ops/<op>.cpp
#define LLMKERN_LIBRARY_FRAGMENT(m) LLMKERN_FRAGMENT_I(LLMKERN_NS, m)
// CUDA kernels: csrc/ops/cuda/<op>_kernel.cu (CUDA key, or CPU under emulation)
#define LLMKERN_DEVICE_IMPL(m) LLMKERN_IMPL_I(LLMKERN_NS, LLMKERN_DEVICE_KEY, m)
// CPU kernels: csrc/ops/cpu/<op>_kernel.cpp (only built into _C)
#define LLMKERN_CPU_IMPL(m) LLMKERN_IMPL_I(LLMKERN_NS, CPU, m)
