// kdplug's CPU kernels: one declaration per op, with the C++ signature of its schema (kd_loss.cpp).
// Each kernel file (csrc/cpu/*.cpp) registers its copy per capability with KD_REGISTER_CPU_KERNEL;
// csrc/cpu_ops.cpp defines these and registers the ops. See csrc/cpu/README.md.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "cpu_dispatch.h"

namespace kdplug {

using KdLossFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& student, const at::Tensor& teacher, double temperature, int64_t divergence,
    double beta, const c10::optional<at::Tensor>& labels, double alpha, int64_t ignore_index,
    const c10::optional<at::Tensor>& mask, int64_t reduction,
    const c10::optional<at::Tensor>& scales, bool student_grad, bool teacher_grad);
KD_DECLARE_CPU_KERNEL(kd_loss_fwd_kernel, KdLossFwd);
KD_DECLARE_CPU_KERNEL(kd_loss_fwd_portable_kernel, KdLossFwd);

using KdLossTopkFwd = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& values,
    double temperature, int64_t divergence, double beta, const c10::optional<at::Tensor>& labels,
    double alpha, int64_t ignore_index, const c10::optional<at::Tensor>& mask, int64_t reduction,
    bool rest_bucket, const c10::optional<at::Tensor>& scales, bool student_grad);
KD_DECLARE_CPU_KERNEL(kd_loss_topk_fwd_kernel, KdLossTopkFwd);

}  // namespace kdplug
