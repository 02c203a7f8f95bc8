// CUDA implementation of kdplug::kd_kl_topk_fwd: torch glue around the kernel of
// kd_topk_kernel.cu (which includes no torch header). Checks, the row scale and the reduction come
// from kd_loss.h, shared with the CPU kernel (cpu/kd_topk_cpu.cpp).
//
// Debug/test knob (read at every call):
//   KDPLUG_CUDA_TOPK_BITMAP=shared|global  where the top-k bitmap lives (default: shared while
//                                          C <= 262144, else global)
#include <cstdlib>
#include <cstring>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kd_loss.h"
#include "cuda/kd_topk_cuda.h"

namespace kdplug {
namespace {

kd_cuda::KdDType kd_topk_dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kd_cuda::KdDType::kFloat32;
    case at::kHalf: return kd_cuda::KdDType::kFloat16;
    case at::kBFloat16: return kd_cuda::KdDType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "kd_kl_topk_fwd (CUDA): expected float32, float16 or bfloat16, got ",
              t.scalar_type());
  return kd_cuda::KdDType::kFloat32;  // not reached
}

kd_cuda::KdTopkBitmap forced_topk_bitmap() {
  const char* v = std::getenv("KDPLUG_CUDA_TOPK_BITMAP");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) {
    return kd_cuda::KdTopkBitmap::kAuto;
  }
  if (std::strcmp(v, "shared") == 0) return kd_cuda::KdTopkBitmap::kShared;
  if (std::strcmp(v, "global") == 0) return kd_cuda::KdTopkBitmap::kGlobal;
  TORCH_CHECK(false, "KDPLUG_CUDA_TOPK_BITMAP=", v, ": expected auto, shared or global");
  return kd_cuda::KdTopkBitmap::kAuto;  // not reached
}

std::tuple<at::Tensor, at::Tensor> kd_kl_topk_fwd_cuda(
    const at::Tensor& student_in, const at::Tensor& indices_in, const at::Tensor& values_in,
    double temperature, const c10::optional<at::Tensor>& mask_in, int64_t reduction,
    bool rest_bucket) {
  check_kd_topk_inputs(student_in, indices_in, values_in, mask_in, temperature, reduction);
  TORCH_CHECK(student_in.is_cuda(), "kd_kl_topk_fwd (CUDA): expected CUDA tensors, got ",
              student_in.device());
  const c10::cuda::CUDAGuard guard(student_in.device());

  const at::Tensor student = student_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  c10::optional<at::Tensor> mask;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  const int64_t rows = student.size(0);
  const int64_t cols = student.size(1);
  const int64_t k = indices.size(1);
  TORCH_CHECK(cols <= kd_cuda::kMaxCols,
              "kd_kl_topk_fwd (CUDA): at most 2^30 classes per row, got ", cols);
  const kd_cuda::KdDType dtype = kd_topk_dtype_of(student);
  const kd_cuda::KdTopkBitmap force = forced_topk_bitmap();
  TORCH_CHECK(force != kd_cuda::KdTopkBitmap::kShared || cols <= kd_cuda::kTopkMaxSharedCols,
              "KDPLUG_CUDA_TOPK_BITMAP=shared: the shared bitmap holds at most ",
              kd_cuda::kTopkMaxSharedCols, " classes, got ", cols);

  // Indices are not range-checked here (that would need a device sync): kdplug.ops checks them
  // in eager mode, and the kernel turns a row with an index outside [0, C) or a repeated one into
  // NaN without touching memory outside the row.
  at::Tensor grad = at::empty_like(student, at::MemoryFormat::Contiguous);
  at::Tensor loss_rows = at::empty({rows}, student.options().dtype(at::kFloat));
  const at::Tensor row_scale = row_scale_for(student, mask, reduction);
  TORCH_CHECK(row_scale.scalar_type() == at::kFloat,
              "kd_kl_topk_fwd (CUDA): expected a float32 row scale");

  // getDeviceProperties caches the properties of each device.
  const int sm_count = at::cuda::getDeviceProperties(student.get_device())->multiProcessorCount;
  const kd_cuda::KdTopkPlan plan = kd_cuda::plan_kd_kl_topk_fwd(rows, cols, sm_count, force);
  at::Tensor workspace;  // the caching allocator owns it; freed in stream order
  if (plan.workspace_words > 0) {
    workspace = at::empty({plan.workspace_words}, student.options().dtype(at::kInt));
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const char* err = kd_cuda::launch_kd_kl_topk_fwd(
      plan, dtype, student.data_ptr(), indices.data_ptr<int64_t>(), values.data_ptr<float>(),
      mask.has_value() ? mask->data_ptr<bool>() : nullptr, rows, cols, k, temperature,
      rest_bucket, row_scale.data_ptr<float>(), loss_rows.data_ptr<float>(), grad.data_ptr(),
      workspace.defined() ? workspace.data_ptr<int32_t>() : nullptr, plan.workspace_words,
      stream);
  TORCH_CHECK(err == nullptr, "kd_kl_topk_fwd (CUDA): kernel launch failed: ", err);

  return {reduce_loss_rows(loss_rows, reduction, row_scale), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdplug, CUDA, m) { m.impl("kd_kl_topk_fwd", &kd_kl_topk_fwd_cuda); }

}  // namespace kdplug
