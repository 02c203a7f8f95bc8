// CUDA implementation of kdplug::kd_kl_fwd: torch glue around the kernels of kd_loss_kernel.cu
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

namespace kdplug {
namespace {

kd_cuda::KdDType kd_dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kd_cuda::KdDType::kFloat32;
    case at::kHalf: return kd_cuda::KdDType::kFloat16;
    case at::kBFloat16: return kd_cuda::KdDType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "kd_kl_fwd (CUDA): expected float32, float16 or bfloat16, got ",
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_kl_fwd_cuda(
    const at::Tensor& student_in, const at::Tensor& teacher_in, double temperature,
    const c10::optional<at::Tensor>& mask_in, int64_t reduction, bool teacher_grad) {
  check_kd_inputs(student_in, teacher_in, mask_in, temperature, reduction);
  TORCH_CHECK(student_in.is_cuda(), "kd_kl_fwd (CUDA): expected CUDA tensors, got ",
              student_in.device());
  const c10::cuda::CUDAGuard guard(student_in.device());

  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  c10::optional<at::Tensor> mask;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  const int64_t rows = student.size(0);
  const int64_t cols = student.size(1);
  TORCH_CHECK(cols <= kd_cuda::kMaxCols, "kd_kl_fwd (CUDA): at most 2^30 classes per row, got ",
              cols);

  KdOutputs out = allocate_kd_outputs(student, teacher_grad);
  const at::Tensor row_scale = row_scale_for(student, mask, reduction);
  TORCH_CHECK(row_scale.scalar_type() == at::kFloat && out.loss_rows.scalar_type() == at::kFloat,
              "kd_kl_fwd (CUDA): expected float32 loss and scale");

  // getDeviceProperties caches the properties of each device.
  const int sm_count = at::cuda::getDeviceProperties(student.get_device())->multiProcessorCount;
  const kd_cuda::KdDType dtype = kd_dtype_of(student);
  const kd_cuda::KdPlan plan =
      kd_cuda::plan_kd_kl_fwd(dtype, rows, cols, sm_count, forced_path(), forced_splits());
  at::Tensor workspace;  // the caching allocator owns it; freed in stream order
  if (plan.workspace_floats > 0) {
    workspace = at::empty({plan.workspace_floats}, student.options().dtype(at::kFloat));
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const char* err = kd_cuda::launch_kd_kl_fwd(
      plan, dtype, student.data_ptr(), teacher.data_ptr(),
      mask.has_value() ? mask->data_ptr<bool>() : nullptr, rows, cols,
      temperature, row_scale.data_ptr<float>(),
      out.loss_rows.data_ptr<float>(), out.grad_student.data_ptr(),
      teacher_grad ? out.grad_teacher.data_ptr() : nullptr,
      workspace.defined() ? workspace.data_ptr<float>() : nullptr, plan.workspace_floats, stream);
  TORCH_CHECK(err == nullptr, "kd_kl_fwd (CUDA): kernel launch failed: ", err);

  return {reduce_loss_rows(out.loss_rows, reduction, row_scale), out.grad_student,
          out.grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdplug, CUDA, m) { m.impl("kd_kl_fwd", &kd_kl_fwd_cuda); }

}  // namespace kdplug
