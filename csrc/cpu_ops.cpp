// The CPU ops: each forwards to its kernel's copy for the selected CPU capability
// (cpu_dispatch.h). Compiled once, for the baseline.
#include <torch/library.h>

#include "cpu/kernels.h"

namespace kdplug {

KD_DEFINE_CPU_KERNEL(kd_loss_fwd_kernel, KdLossFwd);
KD_DEFINE_CPU_KERNEL(kd_loss_fwd_portable_kernel, KdLossFwd);
KD_DEFINE_CPU_KERNEL(kd_loss_topk_fwd_kernel, KdLossTopkFwd);

TORCH_LIBRARY_IMPL(kdplug, CPU, m) {
  m.impl("kd_loss_fwd", KD_CPU_KERNEL(kd_loss_fwd_kernel));
  m.impl("kd_loss_fwd_portable", KD_CPU_KERNEL(kd_loss_fwd_portable_kernel));
  m.impl("kd_loss_topk_fwd", KD_CPU_KERNEL(kd_loss_topk_fwd_kernel));
}

}  // namespace kdplug
