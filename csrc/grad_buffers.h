// The reuse of large CPU gradient buffers by the CPU ops (kd_loss_fwd, kd_loss_topk_fwd). One
// cache for the whole process, whichever CPU capability's kernels run: declared here outside the
// capability namespaces and compiled once (grad_buffers.cpp).
//
// A fresh CPU allocation above glibc's mmap threshold (32 MiB at most) is page-faulted in on
// first touch at every call: for a 62.5 MiB gradient that costs more than computing it. So the
// last large gradient's storage is kept and handed out again once nobody else holds it (the
// training step that used it is over); a new TensorImpl wraps it each time, so autograd never
// sees a tensor twice. Bounded: gradients above KDPLUG_CPU_GRAD_CACHE_MAX_MB (default 1024) are
// never kept; KDPLUG_CPU_GRAD_CACHE=0 keeps none; release() frees the one kept.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace kdplug {
namespace grad_buffers {

// An uninitialized contiguous tensor shaped like `like`, from the kept storage when it can.
at::Tensor empty_like(const at::Tensor& like);

// Drops the kept storage; returns its size in bytes (0 when none was kept). Memory a live tensor
// still uses is freed when that tensor goes.
int64_t release();

}  // namespace grad_buffers
}  // namespace kdplug
