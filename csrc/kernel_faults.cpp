#include "kernel_faults.h"

#include <atomic>
#include <sstream>

#include <c10/util/Exception.h>

namespace kdplug {
namespace kernel_faults {
namespace {

std::atomic<Checker> g_cuda_checker{nullptr};

}  // namespace

std::string message(const KdFaultRecord& f) {
  std::ostringstream m;
  m << (f.op == kFaultOpKdLossTopk ? "kd_loss_topk_fwd" : "kd_loss_fwd") << ": ";
  switch (f.code) {
    case kFaultIndexOutOfRange:
      m << "index " << f.value << " of row " << f.row << " out of range [0, " << f.cols << ")";
      break;
    case kFaultIndexRepeats:
      m << "index " << f.value << " repeats in row " << f.row
        << " (a row's top-k classes must be distinct)";
      break;
    case kFaultLabelOutOfRange:
      m << "label " << f.value << " of row " << f.row << " is out of range [0, " << f.cols
        << ") and is not ignore_index (" << f.ignore_index << ")";
      break;
    default:
      m << "unknown kernel fault code " << f.code << " (row " << f.row << ", value " << f.value
        << ")";
  }
  return m.str();
}

void raise(const KdFaultRecord& fault) {
  TORCH_CHECK(false, message(fault));
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
