// Faults in the op's integer inputs (a top-k index outside [0, C) or repeated within its row, a
// hard label outside [0, C) that is not ignore_index): their codes, the record a CUDA kernel
// writes, and the one message text for each. The CPU kernels raise that text at once; the CUDA
// kernels record the fault on the device and cuda/kernel_faults_cuda.cpp raises the very same
// text later (see docs/op.md, "Bad indices and labels on a GPU"). Free of torch headers: the .cu
// files include it.
#pragma once

#include <stdint.h>

#include <sstream>
#include <string>

#include "kd_namespace.h"

#if defined(__CUDACC__)
#define KD_FAULT_HD __host__ __device__ inline
#else
#define KD_FAULT_HD inline
#endif

KD_NAMESPACE_BEGIN

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

inline const char* kd_fault_op_name(int32_t op) {
  return op == kFaultOpKdLossTopk ? "kd_loss_topk_fwd" : "kd_loss_fwd";
}

// The error text of a fault, the same whichever device found it.
inline std::string kd_fault_message(const KdFaultRecord& f) {
  std::ostringstream m;
  m << kd_fault_op_name(f.op) << ": ";
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

KD_NAMESPACE_END
