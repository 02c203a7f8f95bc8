// Runtime CPU dispatch: each CPU kernel is compiled once per capability (baseline x86-64, AVX2,
// AVX-512; the baseline only elsewhere) into the same extension, and every call goes to the copy
// of the capability selected at load time (see csrc/cpu/README.md).
//
// This header is included by the per-capability kernel files: it must stay free of inline code
// that runs on the baseline path (a copy compiled with -mavx512f could be the one the linker keeps).
// The selection logic lives in cpu_dispatch.cpp, compiled once for the baseline.
#pragma once

#include <c10/util/Exception.h>

#include <type_traits>
#include <utility>

#include "kd_namespace.h"

namespace kdplug {
namespace cpu_dispatch {

// The index of a capability in every table; names as KDPLUG_CPU_CAPABILITY spells them.
enum Capability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kNumCapabilities = 3 };

const char* capability_name(int capability);
// The capability the kernels run with: the one set by select_capability(), else the best this
// CPU supports among those compiled (chosen at the first call).
int selected_capability();
// Checks that the CPU supports it and that it was compiled, with an error naming what there is.
void select_capability(int capability);
// Bit masks of capabilities (1 << Capability).
unsigned supported_capabilities();
unsigned compiled_capabilities();
// Called by KD_REGISTER_CPU_KERNEL; returns true.
bool note_compiled(int capability, const char* kernel);

// One kernel's per-capability copies. Constant-initialized (all null), so the kernel files'
// static registrations may run in any order.
template <typename Signature>
struct CpuKernel;

template <typename R, typename... Args>
struct CpuKernel<R(Args...)> {
  using Fn = R (*)(Args...);
  const char* name;
  Fn fns[kNumCapabilities];

  Fn selected() const {
    const int capability = selected_capability();
    TORCH_CHECK(fns[capability] != nullptr, "kdplug: CPU kernel ", name, " was not compiled for ",
                capability_name(capability));
    return fns[capability];
  }

  // The function TORCH_LIBRARY_IMPL registers for the op: forwards to the selected copy.
  template <const CpuKernel& kernel>
  static R call(Args... args) {
    return kernel.selected()(std::forward<Args>(args)...);
  }
};

}  // namespace cpu_dispatch
}  // namespace kdplug

// In csrc/cpu/kernels.h: declares the kernel `name` with the C++ signature of its op's schema.
#define KD_DECLARE_CPU_KERNEL(name, signature) \
  extern ::kdplug::cpu_dispatch::CpuKernel<signature> name

// In csrc/cpu_ops.cpp (once): defines it.
#define KD_DEFINE_CPU_KERNEL(name, signature) \
  ::kdplug::cpu_dispatch::CpuKernel<signature> name { #name, {} }

// In csrc/cpu_ops.cpp, inside TORCH_LIBRARY_IMPL(kdplug, CPU, m): m.impl("op", KD_CPU_KERNEL(name)).
#define KD_CPU_KERNEL(name) \
  (&std::remove_reference_t<decltype(name)>::template call<name>)

// In a kernel file (csrc/cpu/*.cpp), inside KD_NAMESPACE_BEGIN/END, after the function: makes fn
// this capability's copy of the kernel `name`.
#define KD_REGISTER_CPU_KERNEL(name, fn)                                                  \
  namespace {                                                                             \
  const bool kd_registered_##name = ((::kdplug::name).fns[KD_CPU_CAPABILITY_INDEX] = (fn), \
                                     ::kdplug::cpu_dispatch::note_compiled(                \
                                         KD_CPU_CAPABILITY_INDEX, #name));                 \
  }
