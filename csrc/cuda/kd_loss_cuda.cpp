// CUDA implementation of kdplug::kd_loss_fwd: torch glue around the kernels of kd_loss_kernel.cu
// (which include no torch header). Checks, outputs and the reduction come from kd_loss.h, shared
// with the CPU kernel.
//
// Debug/test knobs (read at every call):
//   KDPLUG_CUDA_PATH=group|block|split  force a thread layout (default: chosen by shape)
//   KDPLUG_CUDA_SPLITS=n                blocks per row when the split layout is forced
#include <cstdlib>
#include <cstring>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kd_loss.h"
#include "cuda/kd_loss_cuda.h"
#include "cuda/kernel_faults_cuda.h"

namespace kdplug {
namespace {

kd_cuda::KdDType kd_dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kd_cuda::KdDType::kFloat32;
    case at::kHalf: return kd_cuda::KdDType::kFloat16;
    case at::kBFloat16: return kd_cuda::KdDType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "kd_loss_fwd (CUDA): expected float32, float16 or bfloat16, got ",
              t.scalar_type());
  return kd_cuda::KdDType::kFloat32;  // not reached
}

kd_cuda::KdPath forced_path() {
  const char* v = std::getenv("KDPLUG_CUDA_PATH");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return kd_cuda::KdPath::kAuto;
  if (std::strcmp(v, "group") == 0 || std::strcmp(v, "warp") == 0) return kd_cuda::KdPath::kGroup;
  if (std::strcmp(v, "block") == 0) return kd_cuda::KdPath::kBlock;
  if (std::strcmp(v, "split") == 0) return kd_cuda::KdPath::kSplit;
  TORCH_CHECK(false, "KDPLUG_CUDA_PATH=", v, ": expected auto, group, block or split");
  return kd_cuda::KdPath::kAuto;  // not reached
}

int64_t forced_splits() {
  const char* v = std::getenv("KDPLUG_CUDA_SPLITS");
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && n >= 1, "KDPLUG_CUDA_SPLITS=", v,
              ": expected a positive integer");
  return n;
}

// The kernels load 16-byte vectors from arrays that share their address modulo 16 with the
// (fresh, aligned) gradients: an input that is a view at another offset is copied.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor out = t.contiguous();
  if (reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 != 0) {
    out = at::empty_like(out, at::MemoryFormat::Contiguous).copy_(out);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cuda(
    const at::Tensor& student_in, const at::Tensor& teacher_in, double temperature,
    int64_t divergence, double beta, const c10::optional<at::Tensor>& labels, double alpha,
    int64_t ignore_index, const c10::optional<at::Tensor>& mask, int64_t reduction,
    const c10::optional<at::Tensor>& scales, bool student_grad, bool teacher_grad) {
  KdLossOptions o{temperature, divergence, beta, labels, alpha, ignore_index,
                  mask, reduction, scales, student_grad};
  check_kd_inputs(student_in, teacher_in, o);
  TORCH_CHECK(student_in.is_cuda(), "kd_loss_fwd (CUDA): expected CUDA tensors, got ",
              student_in.device());
  const c10::cuda::CUDAGuard guard(student_in.device());

  const at::Tensor student = aligned_contiguous(student_in);
  const at::Tensor teacher = aligned_contiguous(teacher_in);
  const int64_t rows = student.size(0);
  const int64_t cols = student.size(1);
  TORCH_CHECK(cols <= kd_cuda::kMaxCols, "kd_loss_fwd (CUDA): at most 2^30 classes per row, got ",
              cols);

  // Labels are not range-checked here (that would need a device sync): the kernel makes a row
  // whose label is out of range NaN, reading nothing outside the row, and records the fault,
  // which a later call raises (kernel_faults_cuda.h).
  at::Tensor loss_rows = at::empty({rows}, student.options().dtype(at::kFloat));
  at::Tensor grad_student = student_grad ? at::empty_like(student, at::MemoryFormat::Contiguous)
                                         : no_grad_output(student);
  at::Tensor grad_teacher = teacher_grad ? at::empty_like(teacher, at::MemoryFormat::Contiguous)
                                         : no_grad_output(teacher);
  const at::Tensor term_scale = term_scales(student, o);
  TORCH_CHECK(term_scale.scalar_type() == at::kFloat,
              "kd_loss_fwd (CUDA): expected float32 scales");

  // getDeviceProperties caches the properties of each device.
  const int sm_count = at::cuda::getDeviceProperties(student.get_device())->multiProcessorCount;
  const kd_cuda::KdDType dtype = kd_dtype_of(student);
  const kd_cuda::KdPlan plan =
      kd_cuda::plan_kd_loss_fwd(dtype, rows, cols, sm_count,
                                divergence_kind(static_cast<int>(divergence)) == kMixture,
                                forced_path(), forced_splits());
  at::Tensor workspace;  // the caching allocator owns it; freed in stream order
  if (plan.workspace_floats > 0) {
    workspace = at::empty({plan.workspace_floats}, student.options().dtype(at::kFloat));
  }

  kd_cuda::KdLaunch l;
  l.student = student.data_ptr();
  l.teacher = teacher.data_ptr();
  l.mask = o.mask.has_value() ? o.mask->data_ptr<bool>() : nullptr;
  l.labels = o.with_ce() ? o.labels->data_ptr<int64_t>() : nullptr;
  l.scales = term_scale.data_ptr<float>();
  l.loss_rows = loss_rows.data_ptr<float>();
  l.grad_student = student_grad ? grad_student.data_ptr() : nullptr;
  l.grad_teacher = teacher_grad ? grad_teacher.data_ptr() : nullptr;
  l.workspace = workspace.defined() ? workspace.data_ptr<float>() : nullptr;
  l.workspace_floats = plan.workspace_floats;
  l.rows = rows;
  l.cols = cols;
  l.ignore_index = ignore_index;
  l.temperature = temperature;
  l.beta = beta;
  l.alpha = o.with_ce() ? alpha : 1.0;
  l.divergence = static_cast<int>(divergence);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int device = student.get_device();
  l.fault = kernel_faults::record_for_launch(device, stream);
  const char* err = kd_cuda::launch_kd_loss_fwd(plan, dtype, l, stream);
  TORCH_CHECK(err == nullptr, "kd_loss_fwd (CUDA): kernel launch failed: ", err);
  kernel_faults::after_launch(device, stream);
  return {reduce_loss_rows(loss_rows, reduction), grad_student, grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdplug, CUDA, m) { m.impl("kd_loss_fwd", &kd_loss_fwd_cuda); }

}  // namespace kdplug
