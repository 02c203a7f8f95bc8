// The CPU kernels of kdplug::kd_loss_fwd behind one plain description of a call, so the op's
// entry (kd_loss_cpu.cpp) only checks, allocates and picks a kernel:
//   dense_vector    C above kSmallClasses: rows spread over threads, each row by vector sweeps
//                   over L1-sized stretches (or, with fewer rows than threads, rows cut in chunks)
//   dense_small     C up to kSmallClasses: blocks of kVec rows transposed so that one vector
//                   lane is one row, every row statistic a lane-wise vector operation
//   dense_portable  the scalar kd_math.h path of the CUDA kernel, row by row (also float64)
#pragma once

#include <c10/core/ScalarType.h>

#include "kd_math.h"
#include "kd_namespace.h"

KD_NAMESPACE_BEGIN
namespace cpu {

constexpr int64_t kSmallClasses = 128;

struct DenseProblem {
  int64_t rows, cols;
  at::ScalarType dtype;
  const void* student;
  const void* teacher;
  void* grad_student;     // nullptr: not wanted
  void* grad_teacher;     // nullptr: not wanted
  void* loss_rows;        // float [rows] (double for float64): the rows' losses with their factors
  const bool* mask;       // nullptr: every row counts
  const int64_t* labels;  // nullptr: no hard-label term
  int64_t ignore_index;
  int divergence;
  double temperature, beta;
  TermCoefsT<double> coefs;  // already holds the reduction's factors and alpha
};

void dense_vector(const DenseProblem& p);
void dense_small(const DenseProblem& p);
void dense_portable(const DenseProblem& p);

// The constants every CPU kernel derives from a problem, each rounded once from double.
template <typename acc_t>
struct KernelConsts {
  acc_t inv_t, beta;
  TermCoefsT<acc_t> k;
  bool with_ce;      // a hard-label term
  bool ce_separate;  // ... whose softmax at T = 1 is not q (T != 1)
  explicit KernelConsts(const DenseProblem& p)
      : inv_t(static_cast<acc_t>(1.0 / p.temperature)),
        beta(static_cast<acc_t>(p.beta)),
        k{static_cast<acc_t>(p.coefs.kd_loss), static_cast<acc_t>(p.coefs.kd_grad),
          static_cast<acc_t>(p.coefs.ce)},
        with_ce(p.labels != nullptr),
        ce_separate(p.labels != nullptr && p.temperature != 1.0) {}

  // The row's label when its hard-label term counts, else -1.
  int64_t label_of(const DenseProblem& p, int64_t row) const {
    if (!with_ce) return -1;
    const int64_t y = p.labels[row];
    return y == p.ignore_index ? -1 : y;
  }
};

}  // namespace cpu
KD_NAMESPACE_END
