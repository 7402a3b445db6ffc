// The Python module of each extension (llmkern._C, _C_cuda, _C_emu). Ops register themselves with
// the torch dispatcher at load time (TORCH_LIBRARY_*), so the module only carries build facts for
// `llmkern info`. TORCH_EXTENSION_NAME is defined by torch's BuildExtension.
#include <Python.h>

#define LLMKERN_CAT_I(a, b) a##b
#define LLMKERN_CAT(a, b) LLMKERN_CAT_I(a, b)
#define LLMKERN_STR_I(a) #a
#define LLMKERN_STR(a) LLMKERN_STR_I(a)

#if defined(__AVX512F__)
#define LLMKERN_SIMD "AVX-512"
#elif defined(__AVX2__)
#define LLMKERN_SIMD "AVX2"
#elif defined(__ARM_NEON)
#define LLMKERN_SIMD "NEON"
#else
#define LLMKERN_SIMD "scalar"
#endif

#if defined(LLMKERN_EMU)
#define LLMKERN_KIND "emulated CUDA (g++, csrc/emu)"
#elif defined(__CUDACC__) || defined(LLMKERN_CUDA_BUILD)
#define LLMKERN_KIND "CUDA (nvcc)"
#else
#define LLMKERN_KIND "CPU (g++, OpenMP)"
#endif

static PyModuleDef llmkern_module = {PyModuleDef_HEAD_INIT, LLMKERN_STR(TORCH_EXTENSION_NAME),
                                     "llmkern kernels; ops are registered under torch.ops.", -1, nullptr};

PyMODINIT_FUNC LLMKERN_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&llmkern_module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "simd", LLMKERN_SIMD);
  PyModule_AddStringConstant(m, "kind", LLMKERN_KIND);
#ifdef _OPENMP
  PyModule_AddIntConstant(m, "openmp", _OPENMP);
#endif
  return m;
}
