// Faults in the op's integer inputs (a top-k index outside [0, C) or repeated within its row, a
// hard label outside [0, C) that is not ignore_index): their codes and the record a CUDA kernel
// writes. Both devices raise a fault through kernel_faults::raise (kernel_faults.cpp, the one
// place of the message text): the CPU kernels at once, the CUDA kernels' record later (see
// docs/op.md, "Bad indices and labels on a GPU"). Free of torch headers: the .cu files include it.
//
// Plain namespace kdplug, not the per-capability one (kd_namespace.h): the CPU kernel files only
// build records and call the compiled-once raise, so no inline code of this header is emitted in
// an object compiled for AVX.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define KD_FAULT_HD __host__ __device__ inline
#else
#define KD_FAULT_HD inline
#endif

namespace kdplug {

enum KdFaultCode : int32_t {
  kFaultNone = 0,
  kFaultIndexOutOfRange = 1,  // value: the index
  kFaultIndexRepeats = 2,     // value: the repeated class
  kFaultLabelOutOfRange = 3,  // value: the label
};

enum KdFaultOp : int32_t { kFaultOpKdLoss = 0, kFaultOpKdLossTopk = 1 };

// What a kernel records: the first fault wins (code is claimed with atomicCAS from kFaultNone);
// the rest say where it was and what the message needs.
struct KdFaultRecord {
  int32_t code;
  int32_t op;
  int64_t row, value, cols, ignore_index;
};
constexpr int kFaultRecordFields = 6;  // code, op, row, value, cols, ignore_index

// Records a fault unless one is recorded already (rec may be null: nowhere to record, e.g. a
// launch captured into a CUDA graph before any record existed). On the host (the lane
// simulation) the same logic without atomics.
KD_FAULT_HD void kd_record_fault(KdFaultRecord* rec, int32_t code, int32_t op, int64_t row,
                                 int64_t value, int64_t cols, int64_t ignore_index) {
  if (rec == nullptr) return;
#if defined(__CUDA_ARCH__)
  if (atomicCAS(reinterpret_cast<int*>(&rec->code), int(kFaultNone), int(code)) != kFaultNone) {
    return;
  }
#else
  if (rec->code != kFaultNone) return;
  rec->code = code;
#endif
  rec->op = op;
  rec->row = row;
  rec->value = value;
  rec->cols = cols;
  rec->ignore_index = ignore_index;
}

}  // namespace kdplug
