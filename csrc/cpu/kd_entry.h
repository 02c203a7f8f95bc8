// What the entry points of the CPU ops (kd_loss_cpu.cpp, kd_topk_cpu.cpp) share besides the
// checks of kd_loss.h: a kernel problem from checked options, the reduction of the rows' losses on
// the host, and the reuse of large gradient buffers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>

#include "cpu/kd_cpu.h"
#include "grad_buffers.h"
#include "kd_loss.h"
#include "kd_namespace.h"

KD_NAMESPACE_BEGIN
namespace cpu {

// A problem over `student` [rows, cols] (contiguous, checked) with options o; the caller fills in
// the teacher and the outputs.
inline DenseProblem dense_problem(const at::Tensor& student, const KdLossOptions& o,
                                  double kd_scale, double ce_scale) {
  DenseProblem p;
  p.rows = student.size(0);
  p.cols = student.size(1);
  p.dtype = student.scalar_type();
  p.student = student.data_ptr();
  p.teacher = nullptr;
  p.grad_student = p.grad_teacher = p.loss_rows = nullptr;
  p.mask = o.mask.has_value() ? o.mask->data_ptr<bool>() : nullptr;
  p.labels = o.with_ce() ? o.labels->data_ptr<int64_t>() : nullptr;
  p.ignore_index = o.ignore_index;
  p.divergence = static_cast<int>(o.divergence);
  p.temperature = o.temperature;
  p.beta = o.beta;
  p.coefs = term_coefs<double>(o.temperature, o.with_ce() ? o.alpha : 1.0, kd_scale, ce_scale);
  return p;
}

// The op's loss from its rows (already carrying their factors), summed in double on the host,
// in eight interleaved partial sums (one chain of dependent adds, 4 cycles each, was ~5% of
// the small-class kernel's samples at 8192 rows); the same order every call.
template <typename acc_t>
at::Tensor reduce_rows_host(const at::Tensor& loss_rows, int64_t reduction) {
  if (reduction == kNone) return loss_rows;
  const acc_t* rows = loss_rows.data_ptr<acc_t>();
  constexpr int64_t kLanes = 8;
  double partial[kLanes] = {};
  const int64_t n = loss_rows.numel(), whole = n - n % kLanes;
  for (int64_t r = 0; r < whole; r += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) partial[j] += rows[r + j];
  }
  for (int64_t r = whole; r < n; ++r) partial[r - whole] += rows[r];
  const double total = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
                       ((partial[4] + partial[5]) + (partial[6] + partial[7]));
  return at::scalar_tensor(total, loss_rows.options());
}

// The reuse of large gradient buffers (grad_buffers.h: one cache for every capability).
inline at::Tensor grad_buffer_like(const at::Tensor& like) {
  return ::kdplug::grad_buffers::empty_like(like);
}

}  // namespace cpu
KD_NAMESPACE_END
