#include "kernel_faults.h"

#include <atomic>

#include <c10/util/Exception.h>

namespace kdplug {
namespace kernel_faults {
namespace {

std::atomic<Checker> g_cuda_checker{nullptr};

}  // namespace

void raise(const KdFaultRecord& fault) {
  TORCH_CHECK(false, kd_fault_message(fault));
  __builtin_unreachable();
}

void check(bool wait) {
  if (const Checker checker = g_cuda_checker.load()) checker(wait);
}

void raise_fields(c10::ArrayRef<int64_t> f) {
  TORCH_CHECK(f.size() == kFaultRecordFields, "raise_kernel_fault: expected ",
              kFaultRecordFields, " fields (code, op, row, value, cols, ignore_index), got ",
              f.size());
  TORCH_CHECK(f[0] != kFaultNone, "raise_kernel_fault: code 0 is no fault");
  raise({static_cast<int32_t>(f[0]), static_cast<int32_t>(f[1]), f[2], f[3], f[4], f[5]});
}

void set_cuda_checker(Checker checker) { g_cuda_checker.store(checker); }

}  // namespace kernel_faults
}  // namespace kdplug
