// Host-side pieces shared by the per-device implementations of kdplug::kd_loss_fwd and
// kdplug::kd_loss_topk_fwd: input checks (a safety net: kdplug.ops validates first, with
// friendlier errors), the reduction's factors, and the outputs.
#pragma once

#include <cmath>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/stack.h>
#include <c10/util/Exception.h>

#include "kd_math.h"
#include "kernel_faults.h"
#include "kd_namespace.h"

KD_NAMESPACE_BEGIN

// Losses are accumulated and returned in float32, or float64 for float64 inputs.
inline at::ScalarType acc_dtype(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The arguments every variant of the op shares besides its logits.
struct KdLossOptions {
  double temperature;
  int64_t divergence;
  double beta;
  c10::optional<at::Tensor> labels;  // int64 [rows], contiguous, or none
  double alpha;
  int64_t ignore_index;
  c10::optional<at::Tensor> mask;    // bool [rows], contiguous, or none
  int64_t reduction;
  c10::optional<at::Tensor> scales;  // acc_dtype [2] (kd, ce), or none: from the reduction
  bool student_grad;

  // The hard-label term is computed only when it weighs something.
  bool with_ce() const { return labels.has_value() && alpha < 1.0; }
};

inline bool divergence_uses_beta(int64_t d) {
  return d == kJSD || d == kSkewKL || d == kSkewReverseKL;
}

// Checks the options against `rows` rows on `device` and makes the tensors contiguous.
inline void check_kd_options(const char* op, KdLossOptions& o, int64_t rows,
                             const at::Device& device, at::ScalarType acc) {
  TORCH_CHECK(std::isfinite(o.temperature) && o.temperature > 0, op,
              ": temperature must be finite and > 0, got ", o.temperature);
  TORCH_CHECK(o.reduction >= kNone && o.reduction <= kBatchMean, op, ": bad reduction code ",
              o.reduction);
  TORCH_CHECK(o.divergence >= 0 && o.divergence < kNumDivergences, op,
              ": bad divergence code ", o.divergence, " (expected 0..", kNumDivergences - 1, ")");
  TORCH_CHECK(!divergence_uses_beta(o.divergence) || (o.beta > 0.0 && o.beta < 1.0), op,
              ": beta must be in (0, 1), got ", o.beta);
  TORCH_CHECK(o.alpha >= 0.0 && o.alpha <= 1.0, op, ": alpha must be in [0, 1], got ", o.alpha);
  TORCH_CHECK(o.labels.has_value() || o.alpha == 1.0, op,
              ": alpha < 1 weighs a hard-label term, but no labels were given");
  if (o.labels.has_value()) {
    TORCH_CHECK(o.labels->scalar_type() == at::kLong, op, ": labels must be int64");
    TORCH_CHECK(o.labels->dim() == 1 && o.labels->size(0) == rows, op,
                ": labels must be [rows] = [", rows, "], got ", o.labels->sizes());
    TORCH_CHECK(o.labels->device() == device, op, ": labels are on another device");
    o.labels = o.labels->contiguous();
  }
  if (o.mask.has_value()) {
    TORCH_CHECK(o.mask->scalar_type() == at::kBool, op, ": mask must be bool");
    TORCH_CHECK(o.mask->dim() == 1 && o.mask->size(0) == rows, op, ": mask must be [rows] = [",
                rows, "], got ", o.mask->sizes());
    TORCH_CHECK(o.mask->device() == device, op, ": mask is on another device");
    o.mask = o.mask->contiguous();
  }
  if (o.scales.has_value()) {
    TORCH_CHECK(o.scales->scalar_type() == acc && o.scales->numel() == 2, op,
                ": scales must be ", acc, " [2] (kd, ce), got ", o.scales->scalar_type(), " ",
                o.scales->sizes());
    TORCH_CHECK(o.scales->device() == device, op, ": scales are on another device");
    o.scales = o.scales->contiguous();
  }
}

inline void check_logits(const char* op, const at::Tensor& student, bool allow_double) {
  TORCH_CHECK(student.dim() == 2, op, ": logits must be 2-D [rows, classes], got ",
              student.sizes());
  TORCH_CHECK(student.numel() > 0, op, ": empty input ", student.sizes());
  const auto t = student.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 ||
                  (allow_double && t == at::kDouble),
              op, ": expected float32, float16 or bfloat16", allow_double ? " (or float64)" : "",
              ", got ", t);
}

inline void check_kd_inputs(const at::Tensor& student, const at::Tensor& teacher,
                            KdLossOptions& o) {
  const char* op = "kd_loss_fwd";
  check_logits(op, student, student.device().is_cpu());
  TORCH_CHECK(student.sizes() == teacher.sizes(), op, ": student ", student.sizes(),
              " and teacher ", teacher.sizes(), " differ in shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), op, ": dtypes differ");
  TORCH_CHECK(student.device() == teacher.device(), op, ": devices differ");
  check_kd_options(op, o, student.size(0), student.device(), acc_dtype(student));
}

inline void check_kd_topk_inputs(const at::Tensor& student, const at::Tensor& indices,
                                 const at::Tensor& values, KdLossOptions& o) {
  const char* op = "kd_loss_topk_fwd";
  check_logits(op, student, false);
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == student.size(0) && indices.size(1) >= 1 &&
                  indices.size(1) <= student.size(1),
              op, ": indices must be [rows, k] with 1 <= k <= classes, got ", indices.sizes(),
              " for student ", student.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64");
  TORCH_CHECK(values.sizes() == indices.sizes() && values.scalar_type() == at::kFloat, op,
              ": values must be float32 shaped like indices ", indices.sizes());
  TORCH_CHECK(indices.device() == student.device() && values.device() == student.device(), op,
              ": devices differ");
  check_kd_options(op, o, student.size(0), student.device(), at::kFloat);
}

// The reduction's factors of the two terms, (kd, ce), as an acc_dtype [2] tensor on the inputs'
// device (computed there: no host sync): (1, 1) for none and sum; for batchmean 1/counted rows
// and 1/counted rows whose label is not ignore_index. A batch with no such row counts as one: its
// loss is 0, not 0/0. Explicit scales (a caller summing chunks of one batch) win.
inline at::Tensor term_scales(const at::Tensor& student, const KdLossOptions& o) {
  if (o.scales.has_value()) return *o.scales;
  const auto options = student.options().dtype(acc_dtype(student));
  if (o.reduction != kBatchMean) return at::ones({2}, options);
  const at::Tensor rows = o.mask.has_value()
                              ? o.mask->sum()
                              : at::full({}, static_cast<double>(student.size(0)), options);
  at::Tensor labelled = rows;
  if (o.with_ce()) {
    at::Tensor counted = o.labels->ne(o.ignore_index);
    if (o.mask.has_value()) counted = counted.logical_and(*o.mask);
    labelled = counted.sum();
  }
  return at::stack({rows, labelled}).clamp_min(1).to(acc_dtype(student)).reciprocal();
}

// The same on the host, from CPU tensors, without launching any torch op (small batches are
// dominated by per-op overheads): the two factors as doubles.
inline void term_scales_host(int64_t rows, const KdLossOptions& o, double* kd, double* ce) {
  if (o.scales.has_value()) {
    const at::Tensor s = o.scales->to(at::kDouble);
    *kd = s.data_ptr<double>()[0];
    *ce = s.data_ptr<double>()[1];
    return;
  }
  *kd = *ce = 1.0;
  if (o.reduction != kBatchMean) return;
  const bool* mask = o.mask.has_value() ? o.mask->data_ptr<bool>() : nullptr;
  const int64_t* labels = o.with_ce() ? o.labels->data_ptr<int64_t>() : nullptr;
  if (!mask && !labels) {  // every row counts, none is labelled: nothing to read
    *kd = 1.0 / static_cast<double>(std::max<int64_t>(rows, 1));
    return;
  }
  int64_t counted = 0, labelled = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (mask && !mask[r]) continue;
    ++counted;
    if (labels && labels[r] != o.ignore_index) ++labelled;
  }
  *kd = 1.0 / static_cast<double>(std::max<int64_t>(counted, 1));
  *ce = 1.0 / static_cast<double>(std::max<int64_t>(labelled, 1));
}

// Labels of counted rows must be a class or ignore_index: the kernels read s[row, label].
// Raised through kernel_faults::raise, as the CUDA kernels' fault record is.
inline void check_labels_host(KdFaultOp op, int64_t rows, int64_t classes,
                              const KdLossOptions& o) {
  if (!o.with_ce()) return;
  const bool* mask = o.mask.has_value() ? o.mask->data_ptr<bool>() : nullptr;
  const int64_t* labels = o.labels->data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    if ((mask && !mask[r]) || labels[r] == o.ignore_index) continue;
    if (labels[r] < 0 || labels[r] >= classes) {
      kernel_faults::raise({kFaultLabelOutOfRange, op, r, labels[r], classes, o.ignore_index});
    }
  }
}

// An empty tensor stands for a gradient nobody asked for.
inline at::Tensor no_grad_output(const at::Tensor& like) { return at::empty({0}, like.options()); }

// The op's loss from per-row losses already carrying their factors.
inline at::Tensor reduce_loss_rows(const at::Tensor& loss_rows, int64_t reduction) {
  return reduction == kNone ? loss_rows : loss_rows.sum();
}

KD_NAMESPACE_END
