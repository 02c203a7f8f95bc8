// CUDA implementation of kdplug::kd_loss_topk_fwd: torch glue around the kernel of
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
#include "cuda/kernel_faults_cuda.h"

namespace kdplug {
namespace {

kd_cuda::KdDType kd_topk_dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kd_cuda::KdDType::kFloat32;
    case at::kHalf: return kd_cuda::KdDType::kFloat16;
    case at::kBFloat16: return kd_cuda::KdDType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "kd_loss_topk_fwd (CUDA): expected float32, float16 or bfloat16, got ",
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

std::tuple<at::Tensor, at::Tensor> kd_loss_topk_fwd_cuda(
    const at::Tensor& student_in, const at::Tensor& indices_in, const at::Tensor& values_in,
    double temperature, int64_t divergence, double beta, const c10::optional<at::Tensor>& labels,
    double alpha, int64_t ignore_index, const c10::optional<at::Tensor>& mask, int64_t reduction,
    bool rest_bucket, const c10::optional<at::Tensor>& scales, bool student_grad) {
  KdLossOptions o{temperature, divergence, beta, labels, alpha, ignore_index,
                  mask, reduction, scales, student_grad};
  check_kd_topk_inputs(student_in, indices_in, values_in, o);
  TORCH_CHECK(student_in.is_cuda(), "kd_loss_topk_fwd (CUDA): expected CUDA tensors, got ",
              student_in.device());
  const c10::cuda::CUDAGuard guard(student_in.device());

  const at::Tensor student = student_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const int64_t rows = student.size(0);
  const int64_t cols = student.size(1);
  const int64_t k = indices.size(1);
  TORCH_CHECK(cols <= kd_cuda::kMaxCols,
              "kd_loss_topk_fwd (CUDA): at most 2^30 classes per row, got ", cols);
  const kd_cuda::KdDType dtype = kd_topk_dtype_of(student);
  const kd_cuda::KdTopkBitmap force = forced_topk_bitmap();
  TORCH_CHECK(force != kd_cuda::KdTopkBitmap::kShared || cols <= kd_cuda::kTopkMaxSharedCols,
              "KDPLUG_CUDA_TOPK_BITMAP=shared: the shared bitmap holds at most ",
              kd_cuda::kTopkMaxSharedCols, " classes, got ", cols);

  // Indices and labels are not range-checked here (that would need a device sync): the kernel
  // turns a row with an index outside [0, C), a repeated index or a label outside [0, C) into
  // NaN without touching memory outside the row, and records the fault, which a later call
  // raises (kernel_faults_cuda.h).
  at::Tensor grad = student_grad ? at::empty_like(student, at::MemoryFormat::Contiguous)
                                 : no_grad_output(student);
  at::Tensor loss_rows = at::empty({rows}, student.options().dtype(at::kFloat));
  const at::Tensor term_scale = term_scales(student, o);

  // getDeviceProperties caches the properties of each device.
  const int sm_count = at::cuda::getDeviceProperties(student.get_device())->multiProcessorCount;
  const kd_cuda::KdTopkPlan plan = kd_cuda::plan_kd_loss_topk_fwd(rows, cols, sm_count, force);
  at::Tensor workspace;  // the caching allocator owns it; freed in stream order
  if (plan.workspace_words > 0) {
    workspace = at::empty({plan.workspace_words}, student.options().dtype(at::kInt));
  }

  kd_cuda::KdTopkLaunch l;
  l.student = student.data_ptr();
  l.indices = indices.data_ptr<int64_t>();
  l.values = values.data_ptr<float>();
  l.mask = o.mask.has_value() ? o.mask->data_ptr<bool>() : nullptr;
  l.labels = o.with_ce() ? o.labels->data_ptr<int64_t>() : nullptr;
  l.scales = term_scale.data_ptr<float>();
  l.loss_rows = loss_rows.data_ptr<float>();
  l.grad_student = student_grad ? grad.data_ptr() : nullptr;
  l.workspace = workspace.defined() ? workspace.data_ptr<int32_t>() : nullptr;
  l.workspace_words = plan.workspace_words;
  l.rows = rows;
  l.cols = cols;
  l.k = k;
  l.ignore_index = ignore_index;
  l.temperature = temperature;
  l.beta = beta;
  l.alpha = o.with_ce() ? alpha : 1.0;
  l.divergence = static_cast<int>(divergence);
  l.rest_bucket = rest_bucket;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const int device = student.get_device();
  l.fault = kernel_faults::record_for_launch(device, stream);
  const char* err = kd_cuda::launch_kd_loss_topk_fwd(plan, dtype, l, stream);
  TORCH_CHECK(err == nullptr, "kd_loss_topk_fwd (CUDA): kernel launch failed: ", err);
  kernel_faults::after_launch(device, stream);
  return {reduce_loss_rows(loss_rows, reduction), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdplug, CUDA, m) { m.impl("kd_loss_topk_fwd", &kd_loss_topk_fwd_cuda); }

}  // namespace kdplug
