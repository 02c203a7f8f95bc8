// CPU kernel of kdplug::kd_kl_topk_fwd: the student's full row against a teacher known on k
// classes. Per row: the student's max and sum of exps (two vector sweeps), the k-sized part from
// kd_math.h (gathers), then one vector sweep writing every gradient and a k-sized fix-up of the
// teacher's classes. Reads the student twice (in cache) and writes the gradient once.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/kernels.h"
#include "kd_loss.h"

KD_NAMESPACE_BEGIN
namespace {

using namespace cpu;

struct TopkArgs {
  int64_t rows, cols, k;
  double temperature, scale;
  const bool* mask;
  bool bucket;
  float* loss_rows;
};

template <typename T>
float max_of(const T* s, int64_t n) {
  Vec vmax(-INFINITY);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) vmax = at::vec::maximum(vmax, load_vec(s + i));
  float m = hmax_nan(vmax);
  for (; i < n; ++i) m = kd_max_nan(m, static_cast<float>(s[i]));
  return m;
}

template <typename T>
float sum_exp(const T* s, int64_t n, float inv_t, float max_x) {
  const Vec vinv(inv_t), vmax_x(max_x);
  Vec sum(0.f);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) sum = sum + fast_exp(load_vec(s + i) * vinv - vmax_x);
  float total = hsum(sum);
  for (; i < n; ++i) total += kd_rescale(static_cast<float>(s[i]) * inv_t, max_x);
  return total;
}

// sum exp(x - max_x) over the classes not in `sorted` (ascending, distinct): the stretches
// between the teacher's classes, each summed with vectors.
template <typename T>
float sum_exp_outside(const T* s, int64_t n, const int64_t* sorted, int64_t k, float inv_t,
                      float max_x) {
  float total = 0.f;
  int64_t from = 0;
  for (int64_t j = 0; j <= k; ++j) {
    const int64_t to = j < k ? sorted[j] : n;
    if (to > from) total += sum_exp(s + from, to - from, inv_t, max_x);
    from = to + 1;
  }
  return total;
}

template <typename T>
void topk_rows(const TopkArgs& a, const T* s, const int64_t* idx, const float* v, T* gs) {
  const RowConstants<float> consts(a.temperature, a.scale);
  const float inv_t = consts.inv_t, t_scale = consts.t_scale, t_squared = consts.t_squared;
  const int64_t grain = std::max<int64_t>(1, 16384 / a.cols);
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> sorted(a.k);
    for (int64_t r = begin; r < end; ++r) {
      const T* row = s + r * a.cols;
      const int64_t* row_idx = idx + r * a.k;
      const float* row_v = v + r * a.k;
      T* grad = gs + r * a.cols;
      if (a.mask && !a.mask[r]) {
        a.loss_rows[r] = 0.f;
        std::fill(grad, grad + a.cols, static_cast<T>(0));
        continue;
      }
      const float max_x = max_of(row, a.cols) * inv_t;
      const TopkTeacherT<float> te = topk_teacher<float>(row_v, a.k, inv_t, a.bucket);
      if (!std::isfinite(max_x) || !std::isfinite(te.max_v)) {  // as PyTorch: the row is NaN
        a.loss_rows[r] = NAN;
        std::fill(grad, grad + a.cols, static_cast<T>(NAN));
        continue;
      }
      std::copy(row_idx, row_idx + a.k, sorted.begin());
      std::sort(sorted.begin(), sorted.end());
      const float outside = sum_exp_outside(row, a.cols, sorted.data(), a.k, inv_t, max_x);
      const float inside = topk_inside_sum<float>(row, row_idx, a.k, inv_t, max_x);
      const TopkRowT<float> res =
          topk_row<float>(row, row_idx, row_v, a.k, inv_t, max_x, inside, outside, te);
      a.loss_rows[r] = t_squared * res.loss_over_t2;

      const float outside_scale = t_scale * res.outside_factor;
      const Vec vinv(inv_t), vmax(res.max_x), vlog_sum(res.log_sum_x), vout(outside_scale);
      int64_t i = 0;
      for (; i + kVec <= a.cols; i += kVec) {
        store_vec(grad + i, vout * fast_exp((load_vec(row + i) * vinv - vmax) - vlog_sum));
      }
      for (; i < a.cols; ++i) {
        grad[i] = static_cast<T>(outside_scale * topk_q(static_cast<float>(row[i]) * inv_t, res));
      }
      for (int64_t j = 0; j < a.k; ++j) {
        const float q = topk_q(static_cast<float>(row[row_idx[j]]) * inv_t, res);
        grad[row_idx[j]] = static_cast<T>(t_scale * (q - topk_p(row_v[j] * inv_t, te)));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kd_kl_topk_fwd_cpu(
    const at::Tensor& student_in, const at::Tensor& indices_in, const at::Tensor& values_in,
    double temperature, const c10::optional<at::Tensor>& mask_in, int64_t reduction,
    bool rest_bucket) {
  check_kd_topk_inputs(student_in, indices_in, values_in, mask_in, temperature, reduction);
  TORCH_CHECK(student_in.device().is_cpu(), "kd_kl_topk_fwd (CPU): expected CPU tensors");
  TORCH_CHECK(student_in.scalar_type() != at::kDouble,
              "kd_kl_topk_fwd: float64 is not supported; use float32");
  const at::Tensor student = student_in.contiguous();
  const at::Tensor indices = indices_in.contiguous(), values = values_in.contiguous();
  c10::optional<at::Tensor> mask;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  // The kernel writes only inside the row, so an out-of-range index must never reach it.
  const int64_t* idx = indices.data_ptr<int64_t>();
  for (int64_t i = 0, n = indices.numel(); i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < student.size(1), "kd_kl_topk_fwd: index ", idx[i],
                " out of range [0, ", student.size(1), ")");
  }
  at::Tensor grad = grad_buffer_cache().empty_like(student);
  at::Tensor loss_rows = at::empty({student.size(0)}, student.options().dtype(at::kFloat));
  const at::Tensor row_scale = row_scale_for(student, mask, reduction);
  TopkArgs args{student.size(0), student.size(1), indices.size(1), temperature,
                row_scale.item<double>(), mask ? mask->data_ptr<bool>() : nullptr, rest_bucket,
                loss_rows.data_ptr<float>()};
  KD_DISPATCH_FLOATING(student.scalar_type(), "kd_kl_topk_fwd", [&] {
    topk_rows(args, student.data_ptr<scalar_t>(), idx, values.data_ptr<float>(),
              grad.data_ptr<scalar_t>());
  });
  return {reduce_loss_rows(loss_rows, reduction, row_scale), grad};
}

}  // namespace

KD_REGISTER_CPU_KERNEL(kd_kl_topk_fwd_kernel, &kd_kl_topk_fwd_cpu)

KD_NAMESPACE_END
