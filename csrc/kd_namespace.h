// kdplug's C++ namespace, made distinct per CPU capability where a file is compiled once per
// capability (csrc/cpu/*.cpp; see csrc/cpu/README.md).
//
// An inline function of a shared header is emitted in every file that uses it, and the linker
// keeps one copy for all of them. If one copy was compiled with -mavx512f, the baseline path could
// end up running AVX-512 code. So, as ATen does with `inline namespace CPU_CAPABILITY`, everything
// kdplug's headers and kernel files define goes into an inline namespace named after the
// capability when KD_CPU_CAPABILITY_<NAME> is defined (setup.py does that for the kernel files
// only). Elsewhere (the schema, the dispatcher, the CUDA code) it is plain `kdplug`.
#pragma once

#if defined(KD_CPU_CAPABILITY_AVX512)
#define KD_CPU_CAPABILITY_NAMESPACE cpu_avx512
#define KD_CPU_CAPABILITY_INDEX 2
#elif defined(KD_CPU_CAPABILITY_AVX2)
#define KD_CPU_CAPABILITY_NAMESPACE cpu_avx2
#define KD_CPU_CAPABILITY_INDEX 1
#elif defined(KD_CPU_CAPABILITY_DEFAULT)
#define KD_CPU_CAPABILITY_NAMESPACE cpu_default
#define KD_CPU_CAPABILITY_INDEX 0
#endif

#ifdef KD_CPU_CAPABILITY_NAMESPACE
#define KD_NAMESPACE_BEGIN \
  namespace kdplug {       \
  inline namespace KD_CPU_CAPABILITY_NAMESPACE {
#define KD_NAMESPACE_END \
  }                      \
  }
#else
#define KD_NAMESPACE_BEGIN namespace kdplug {
#define KD_NAMESPACE_END }
#endif
