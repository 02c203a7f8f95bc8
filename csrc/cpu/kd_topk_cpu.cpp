// CPU kernel of kdplug::kd_loss_topk_fwd: the student's full row against a teacher known on k
// classes. Per row: the student's max (a vector sweep), its sum of exps outside the top-k (vector
// sweeps between the sorted teacher classes, keeping the exps), the k-sized part from kd_math.h
// (gathers), then one vector sweep writing every gradient from the kept exps and a k-sized fix-up
// of the teacher's classes. With a hard-label term at T != 1 one more sweep gathers the student's
// own log-sum-exp at T = 1 (and keeps those exps too).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/kd_cpu.h"
#include "cpu/kd_entry.h"
#include "cpu/kernels.h"
#include "kd_loss.h"

KD_NAMESPACE_BEGIN
namespace {

using namespace cpu;

struct TopkProblem {
  int64_t rows, cols, k;
  const int64_t* indices;
  const float* values;
  bool bucket;
  DenseProblem dense;  // student, grad_student, loss_rows, mask, labels, divergence, ... (no teacher)
};

template <typename T>
float max_of(const T* s, int64_t n) {
  Vec vmax(-INFINITY);
  for (int64_t i = 0; i < n; i += kVec) {
    vmax = at::vec::maximum(vmax, load_n(s + i, std::min(kVec, n - i), -INFINITY));
  }
  return hmax_nan(vmax);
}

// sum exp(s * scale - shift) over n classes, keeping each exp in keep (padded by a vector).
template <typename T>
float sum_exp_keep(const T* s, int64_t n, float scale, float shift, float* keep) {
  const Vec vscale(scale), vshift(shift);
  Vec sum(0.f);
  for (int64_t i = 0; i < n; i += kVec) {
    const Vec e = fast_exp(load_n(s + i, std::min(kVec, n - i), -INFINITY) * vscale - vshift);
    sum = sum + e;
    e.store(keep + i);
  }
  return hsum(sum);
}

// sum exp(x - max_x) over the classes not in `sorted` (ascending, distinct): the stretches
// between the teacher's classes, each summed with vectors; their exps are kept. (A stretch's
// padded tail spills into the next teacher class's slot of keep, which is never read.)
template <typename T>
float sum_exp_outside(const T* s, int64_t n, const int64_t* sorted, int64_t k, float inv_t,
                      float max_x, float* keep) {
  float total = 0.f;
  int64_t from = 0;
  for (int64_t j = 0; j <= k; ++j) {
    const int64_t to = j < k ? sorted[j] : n;
    if (to > from) total += sum_exp_keep(s + from, to - from, inv_t, max_x, keep + from);
    from = to + 1;
  }
  return total;
}

// The k-sized parts pick the divergence at run time: the row loops are compiled once per dtype.
template <typename T>
TopkRowT<float> topk_row_of(int div, const T* s, const int64_t* idx, const float* v, int64_t k,
                            float inv_t, float max_x, float inside, float outside,
                            const TopkTeacherT<float>& te, float beta) {
  return with_divergence(div, [&](auto d) {
    return topk_row<decltype(d)::value, float>(s, idx, v, k, inv_t, max_x, inside, outside, te,
                                               beta);
  });
}

inline float topk_class_dd_of(int div, float x, float v_over_t, const TopkTeacherT<float>& te,
                              const TopkRowT<float>& r, float beta) {
  return with_divergence(div, [&](auto d) {
    return topk_class_dd<decltype(d)::value>(x, v_over_t, te, r, beta);
  });
}

template <typename T>
void topk_rows(const TopkProblem& a) {
  const DenseProblem& p = a.dense;
  const KernelConsts<float> c(p);
  const int64_t cols = a.cols, k = a.k;
  const int64_t grain = std::max<int64_t>(1, 16384 / cols);
  const T* student = static_cast<const T*>(p.student);
  T* grads = static_cast<T*>(p.grad_student);
  float* loss_rows = static_cast<float*>(p.loss_rows);
  parallel_for_flushed(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> sorted(k);
    // exp(x - max_x) of every class (padded), and exp(s - max_s) when the hard label needs it
    std::vector<float> keep_x(cols + kVec + 1), keep_s(c.ce_separate ? cols + kVec : 0);
    for (int64_t r = begin; r < end; ++r) {
      const T* row = student + r * cols;
      const int64_t* row_idx = a.indices + r * k;
      const float* row_v = a.values + r * k;
      T* grad = grads ? grads + r * cols : nullptr;
      if (p.mask && !p.mask[r]) {
        loss_rows[r] = 0.f;
        if (grad) std::fill(grad, grad + cols, static_cast<T>(0));
        continue;
      }
      const float max_s = max_of(row, cols);
      const float max_x = max_s * c.inv_t;
      const TopkTeacherT<float> te = topk_teacher<float>(row_v, k, c.inv_t, a.bucket);
      if (!std::isfinite(max_x) || !std::isfinite(te.max_v)) {  // as PyTorch: the row is NaN
        loss_rows[r] = NAN;
        if (grad) std::fill(grad, grad + cols, static_cast<T>(NAN));
        continue;
      }
      std::copy(row_idx, row_idx + k, sorted.begin());
      std::sort(sorted.begin(), sorted.end());
      const float outside =
          sum_exp_outside(row, cols, sorted.data(), k, c.inv_t, max_x, keep_x.data());
      const float inside = topk_inside_sum<float>(row, row_idx, k, c.inv_t, max_x);
      const TopkRowT<float> res = topk_row_of(p.divergence, row, row_idx, row_v, k, c.inv_t, max_x,
                                              inside, outside, te, c.beta);
      float ce_max = res.max_x, ce_log_sum = res.log_sum_x;  // lse at T = 1 when T = 1
      if (c.ce_separate) {
        ce_max = max_s;
        ce_log_sum = std::log(sum_exp_keep(row, cols, 1.f, max_s, keep_s.data()));
      }
      const int64_t label = c.label_of(p, r);
      const TermCoefsT<float> kc = row_coefs(c.k, label >= 0);
      const float ce_value =
          label < 0 ? 0.f : (ce_max + ce_log_sum) - static_cast<float>(row[label]);
      loss_rows[r] = kc.kd_loss * res.terms.value + kc.ce * ce_value;
      if (!grad) continue;

      // Every class as outside the top-k: kd_grad * q_c * outside_factor + ce * sigma_c ...
      const float fq = std::exp(-res.log_sum_x);  // keep_x holds exp(x - max_x)
      const float fs = c.ce_separate ? std::exp(-ce_log_sum) : fq;
      const float* sigma_keep = c.ce_separate ? keep_s.data() : keep_x.data();
      const Vec vout(kc.kd_grad * res.outside_factor * fq), vce(kc.ce * fs);
      for (int64_t i = 0; i < cols; i += kVec) {
        const Vec g = vout * Vec::loadu(keep_x.data() + i) + vce * Vec::loadu(sigma_keep + i);
        prefetch_for_write(grad + i);
        store_n(grad + i, g, std::min(kVec, cols - i));
      }
      // ... then the teacher's classes, and the hard label's -1, each in float before rounding.
      auto class_grad = [&](int64_t cls) {
        const float x = static_cast<float>(row[cls]) * c.inv_t;
        float dd = topk_q(x, res) * res.outside_factor;
        for (int64_t j = 0; j < k; ++j) {
          if (row_idx[j] == cls) {
            dd = topk_class_dd_of(p.divergence, x, row_v[j] * c.inv_t, te, res, c.beta);
          }
        }
        const float sigma = c.ce_separate
                                ? std::exp((static_cast<float>(row[cls]) - ce_max) - ce_log_sum)
                                : topk_q(x, res);
        return kc.kd_grad * dd + kc.ce * sigma - (cls == label ? kc.ce : 0.f);
      };
      for (int64_t j = 0; j < k; ++j) {
        const float x = static_cast<float>(row[row_idx[j]]) * c.inv_t;
        const float dd = topk_class_dd_of(p.divergence, x, row_v[j] * c.inv_t, te, res, c.beta);
        const float sigma =
            c.ce_separate
                ? std::exp((static_cast<float>(row[row_idx[j]]) - ce_max) - ce_log_sum)
                : topk_q(x, res);
        grad[row_idx[j]] = static_cast<T>(kc.kd_grad * dd + kc.ce * sigma);
      }
      if (label >= 0) grad[label] = static_cast<T>(class_grad(label));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kd_loss_topk_fwd_cpu(
    const at::Tensor& student_in, const at::Tensor& indices_in, const at::Tensor& values_in,
    double temperature, int64_t divergence, double beta, const c10::optional<at::Tensor>& labels,
    double alpha, int64_t ignore_index, const c10::optional<at::Tensor>& mask, int64_t reduction,
    bool rest_bucket, const c10::optional<at::Tensor>& scales, bool student_grad) {
  KdLossOptions o{temperature, divergence, beta, labels, alpha, ignore_index,
                  mask, reduction, scales, student_grad};
  check_kd_topk_inputs(student_in, indices_in, values_in, o);
  TORCH_CHECK(student_in.device().is_cpu(), "kd_loss_topk_fwd (CPU): expected CPU tensors");
  const at::Tensor student = student_in.contiguous();
  const at::Tensor indices = indices_in.contiguous(), values = values_in.contiguous();
  const int64_t rows = student.size(0), cols = student.size(1), k = indices.size(1);
  check_labels_host(kFaultOpKdLossTopk, rows, cols, o);
  // The kernel writes only inside the row, so an out-of-range index must never reach it; a
  // repeated one would count a class twice. Checked here, not only in Python, which skips its
  // checks under torch.compile.
  const int64_t* idx = indices.data_ptr<int64_t>();
  const bool* mask_ptr = o.mask.has_value() ? o.mask->data_ptr<bool>() : nullptr;
  std::vector<uint8_t> seen(static_cast<size_t>(cols), 0);
  for (int64_t r = 0; r < rows; ++r) {
    if (mask_ptr && !mask_ptr[r]) continue;
    const int64_t* row = idx + r * k;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = row[j];
      if (i < 0 || i >= cols) {
        kernel_faults::raise({kFaultIndexOutOfRange, kFaultOpKdLossTopk, r, i, cols, 0});
      }
      if (seen[i]) kernel_faults::raise({kFaultIndexRepeats, kFaultOpKdLossTopk, r, i, cols, 0});
      seen[i] = 1;
    }
    for (int64_t j = 0; j < k; ++j) seen[row[j]] = 0;
  }
  double kd_scale, ce_scale;
  term_scales_host(rows, o, &kd_scale, &ce_scale);
  at::Tensor grad =
      student_grad ? grad_buffer_like(student) : no_grad_output(student);
  at::Tensor loss_rows = at::empty({rows}, student.options().dtype(at::kFloat));

  TopkProblem a;
  a.rows = rows;
  a.cols = cols;
  a.k = k;
  a.indices = idx;
  a.values = values.data_ptr<float>();
  a.bucket = rest_bucket;
  a.dense = dense_problem(student, o, kd_scale, ce_scale);
  const DenseProblem& p = a.dense;
  a.dense.grad_student = student_grad ? grad.data_ptr() : nullptr;
  a.dense.loss_rows = loss_rows.data_ptr();
  KD_DISPATCH_FLOATING(p.dtype, "kd_loss_topk_fwd", [&] { topk_rows<scalar_t>(a); });
  return {reduce_rows_host<float>(loss_rows, reduction), grad};
}

}  // namespace

KD_REGISTER_CPU_KERNEL(kd_loss_topk_fwd_kernel, &kd_loss_topk_fwd_cpu)

KD_NAMESPACE_END
