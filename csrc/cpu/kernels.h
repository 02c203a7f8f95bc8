// kdplug's CPU kernels: one declaration per op, with the C++ signature of its schema (kd_loss.cpp).
// Each kernel file (csrc/cpu/*.cpp) registers its copy per capability with KD_REGISTER_CPU_KERNEL;
// csrc/cpu_ops.cpp defines these and registers the ops. See csrc/cpu/README.md.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "cpu_dispatch.h"

namespace kdplug {

using KdKlFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& student, const at::Tensor& teacher, double temperature,
    const c10::optional<at::Tensor>& mask, int64_t reduction, bool teacher_grad);
KD_DECLARE_CPU_KERNEL(kd_kl_fwd_kernel, KdKlFwd);
KD_DECLARE_CPU_KERNEL(kd_kl_fwd_portable_kernel, KdKlFwd);

using KdKlTopkFwd = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& values,
    double temperature, const c10::optional<at::Tensor>& mask, int64_t reduction,
    bool rest_bucket);
KD_DECLARE_CPU_KERNEL(kd_kl_topk_fwd_kernel, KdKlTopkFwd);

}  // namespace kdplug
