// Host-side pieces shared by the per-device implementations of kdplug::kd_kl_fwd:
// input checks (a safety net: kdplug.ops validates first, with friendlier errors) and outputs.
#pragma once

#include <cmath>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "kd_math.h"
#include "kd_namespace.h"

KD_NAMESPACE_BEGIN

// Losses are accumulated and returned in float32, or float64 for float64 inputs.
inline at::ScalarType acc_dtype(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct KdOutputs {
  at::Tensor loss_rows;     // acc_dtype [rows]
  at::Tensor grad_student;  // like student
  at::Tensor grad_teacher;  // like teacher, or empty when the teacher needs no gradient
};

inline void check_kd_inputs(const at::Tensor& student, const at::Tensor& teacher,
                            const c10::optional<at::Tensor>& mask, double temperature,
                            int64_t reduction) {
  TORCH_CHECK(student.dim() == 2, "kd_kl_fwd: student must be 2-D [rows, classes], got ",
              student.sizes());
  TORCH_CHECK(student.sizes() == teacher.sizes(), "kd_kl_fwd: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " differ in shape");
  TORCH_CHECK(student.numel() > 0, "kd_kl_fwd: empty input ", student.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "kd_kl_fwd: dtypes differ");
  TORCH_CHECK(student.scalar_type() == at::kFloat || student.scalar_type() == at::kHalf ||
                  student.scalar_type() == at::kBFloat16 ||
                  (student.scalar_type() == at::kDouble && student.device().is_cpu()),
              "kd_kl_fwd: expected float32, float16 or bfloat16 (or float64 on the CPU), got ",
              student.scalar_type());
  TORCH_CHECK(student.device() == teacher.device(), "kd_kl_fwd: devices differ");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "kd_kl_fwd: temperature must be "
              "finite and > 0, got ", temperature);
  TORCH_CHECK(reduction >= kNone && reduction <= kBatchMean, "kd_kl_fwd: bad reduction code ",
              reduction);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "kd_kl_fwd: mask must be bool");
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == student.size(0),
                "kd_kl_fwd: mask must be [rows] = [", student.size(0), "], got ", mask->sizes());
    TORCH_CHECK(mask->device() == student.device(), "kd_kl_fwd: mask is on another device");
  }
}

// grad_student may come from the caller (a reused buffer shaped and typed like student).
inline void check_kd_topk_inputs(const at::Tensor& student, const at::Tensor& indices,
                                 const at::Tensor& values, const c10::optional<at::Tensor>& mask,
                                 double temperature, int64_t reduction) {
  TORCH_CHECK(student.dim() == 2 && student.numel() > 0,
              "kd_kl_topk_fwd: student must be a non-empty [rows, classes], got ", student.sizes());
  TORCH_CHECK(student.scalar_type() == at::kFloat || student.scalar_type() == at::kHalf ||
                  student.scalar_type() == at::kBFloat16 || student.scalar_type() == at::kDouble,
              "kd_kl_topk_fwd: student must be floating point, got ", student.scalar_type());
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == student.size(0) && indices.size(1) >= 1 &&
                  indices.size(1) <= student.size(1),
              "kd_kl_topk_fwd: indices must be [rows, k] with 1 <= k <= classes, got ",
              indices.sizes(), " for student ", student.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, "kd_kl_topk_fwd: indices must be int64");
  TORCH_CHECK(values.sizes() == indices.sizes() && values.scalar_type() == at::kFloat,
              "kd_kl_topk_fwd: values must be float32 shaped like indices ", indices.sizes());
  TORCH_CHECK(indices.device() == student.device() && values.device() == student.device(),
              "kd_kl_topk_fwd: devices differ");
  check_kd_inputs(student, student, mask, temperature, reduction);
}

inline KdOutputs allocate_kd_outputs(const at::Tensor& student, bool teacher_grad,
                                     at::Tensor grad_student = {}) {
  KdOutputs out;
  out.loss_rows = at::empty({student.size(0)}, student.options().dtype(acc_dtype(student)));
  out.grad_student = grad_student.defined()
                         ? std::move(grad_student)
                         : at::empty_like(student, at::MemoryFormat::Contiguous);
  out.grad_teacher = teacher_grad ? at::empty_like(student, at::MemoryFormat::Contiguous)
                                  : at::empty({0}, student.options());
  return out;
}

// The factor each row's loss and gradient carry: 1 for none and sum, 1/counted rows for
// batchmean. An acc_dtype scalar on the inputs' device, so a mask is counted without a host sync.
// A batch with every row masked counts as one row: its loss is 0, not 0/0.
inline at::Tensor row_scale_for(const at::Tensor& student, const c10::optional<at::Tensor>& mask,
                                int64_t reduction) {
  const auto options = student.options().dtype(acc_dtype(student));
  if (reduction != kBatchMean) return at::ones({}, options);
  if (!mask.has_value()) return at::full({}, 1.0 / static_cast<double>(student.size(0)), options);
  return mask->sum().clamp_min(1).to(acc_dtype(student)).reciprocal();
}

// Loss of the whole op from per-row losses: per row, summed, or per counted row.
inline at::Tensor reduce_loss_rows(const at::Tensor& loss_rows, int64_t reduction,
                                   const at::Tensor& row_scale) {
  if (reduction == kNone) return loss_rows;
  return loss_rows.sum() * row_scale;
}

KD_NAMESPACE_END
