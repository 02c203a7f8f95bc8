// Which CPU capability the kernels run with: what the CPU supports (CPUID and the OS's saved
// register state, through the compiler's __builtin_cpu_supports), what this build compiled, and
// the selection. Python (kdplug/_cpu_capability.py) reads and sets it through two small ops.
#include <torch/library.h>

#include <atomic>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_dispatch.h"

namespace kdplug {
namespace cpu_dispatch {
namespace {

constexpr const char* kNames[kNumCapabilities] = {"default", "avx2", "avx512"};

std::atomic<unsigned> compiled_mask{0};
std::atomic<int> selected{-1};

unsigned detect_supported() {
  unsigned mask = 1u << kDefault;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // The same sets ATen requires for its own AVX2 and AVX-512 kernels; the -m flags in
  // kdplug/_cpu_capability.py must stay within them.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx2) mask |= 1u << kAvx2;
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    mask |= 1u << kAvx512;
  }
#endif
  return mask;
}

std::string names_of(unsigned mask) {
  std::string out;
  for (int c = 0; c < kNumCapabilities; ++c) {
    if (mask & (1u << c)) out += (out.empty() ? "" : ", ") + std::string(kNames[c]);
  }
  return out.empty() ? "none" : out;
}

std::vector<std::string> list_of(unsigned mask) {
  std::vector<std::string> out;
  for (int c = 0; c < kNumCapabilities; ++c) {
    if (mask & (1u << c)) out.emplace_back(kNames[c]);
  }
  return out;
}

int capability_from_name(const std::string& name) {
  for (int c = 0; c < kNumCapabilities; ++c) {
    if (name == kNames[c]) return c;
  }
  TORCH_CHECK_VALUE(false, "unknown CPU capability '", name, "': expected one of ",
                    names_of((1u << kNumCapabilities) - 1));
}

}  // namespace

const char* capability_name(int capability) {
  return capability >= 0 && capability < kNumCapabilities ? kNames[capability] : "unknown";
}

unsigned supported_capabilities() {
  static const unsigned mask = detect_supported();
  return mask;
}

unsigned compiled_capabilities() { return compiled_mask.load(); }

bool note_compiled(int capability, const char* /*kernel*/) {
  compiled_mask.fetch_or(1u << capability);
  return true;
}

void select_capability(int capability) {
  TORCH_CHECK_VALUE(capability >= 0 && capability < kNumCapabilities, "bad CPU capability ",
                    capability);
  TORCH_CHECK_VALUE(supported_capabilities() & (1u << capability), "CPU capability '",
                    kNames[capability], "' is not supported by this CPU; it supports: ",
                    names_of(supported_capabilities()));
  TORCH_CHECK_VALUE(compiled_capabilities() & (1u << capability), "CPU capability '",
                    kNames[capability], "' was not compiled into this build of kdplug; it has: ",
                    names_of(compiled_capabilities()));
  selected.store(capability);
}

int selected_capability() {
  int capability = selected.load(std::memory_order_relaxed);
  if (capability >= 0) return capability;
  const unsigned usable = supported_capabilities() & compiled_capabilities();
  TORCH_CHECK(usable != 0, "kdplug: no CPU kernel was compiled");
  for (capability = kNumCapabilities - 1; !(usable & (1u << capability));) --capability;
  int expected = -1;
  selected.compare_exchange_strong(expected, capability);
  return selected.load();
}

}  // namespace cpu_dispatch
}  // namespace kdplug

namespace {

std::tuple<std::vector<std::string>, std::vector<std::string>, std::string> cpu_capabilities() {
  using namespace kdplug::cpu_dispatch;
  return {list_of(compiled_capabilities()), list_of(supported_capabilities()),
          capability_name(selected_capability())};
}

void select_cpu_capability(const std::string& name) {
  kdplug::cpu_dispatch::select_capability(kdplug::cpu_dispatch::capability_from_name(name));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdplug, m) {
  // -> (compiled, supported by this CPU, selected), names as KDPLUG_CPU_CAPABILITY takes them.
  m.def("_cpu_capabilities() -> (str[], str[], str)", &cpu_capabilities);
  m.def("_select_cpu_capability(str name) -> ()", &select_cpu_capability);
}
