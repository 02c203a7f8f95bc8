#include "grad_buffers.h"

#include <cstdlib>
#include <cstring>
#include <mutex>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace kdplug {
namespace grad_buffers {
namespace {

// Below this, malloc serves a gradient from memory it already mapped: nothing to gain.
constexpr size_t kMinBytes = size_t(16) << 20;
constexpr size_t kDefaultMaxMiB = 1024;

size_t max_bytes() {
  static const size_t bound = [] {
    const char* off = std::getenv("KDPLUG_CPU_GRAD_CACHE");
    if (off && std::strcmp(off, "0") == 0) return size_t(0);
    const char* v = std::getenv("KDPLUG_CPU_GRAD_CACHE_MAX_MB");
    if (!v || !*v) return kDefaultMaxMiB << 20;
    char* end = nullptr;
    const long long mib = std::strtoll(v, &end, 10);
    TORCH_CHECK(end != v && *end == '\0' && mib >= 0, "KDPLUG_CPU_GRAD_CACHE_MAX_MB=", v,
                ": expected a whole number of MiB >= 0");
    return static_cast<size_t>(mib) << 20;
  }();
  return bound;
}

std::mutex mutex;
c10::optional<c10::Storage> kept;

}  // namespace

at::Tensor empty_like(const at::Tensor& like) {
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (bytes < kMinBytes || bytes > max_bytes()) {
    return at::empty_like(like, at::MemoryFormat::Contiguous);
  }
  std::lock_guard<std::mutex> lock(mutex);
  if (!kept.has_value() || kept->use_count() != 1 || kept->nbytes() < bytes) {
    kept.reset();  // first, so that a larger buffer never coexists with the old one here
    kept = at::empty({like.numel()}, like.options()).storage();
  }
  return at::empty({0}, like.options()).set_(*kept, 0, like.sizes());
}

int64_t release() {
  std::lock_guard<std::mutex> lock(mutex);
  const int64_t bytes = kept.has_value() ? static_cast<int64_t>(kept->nbytes()) : 0;
  kept.reset();
  return bytes;
}

}  // namespace grad_buffers
}  // namespace kdplug
