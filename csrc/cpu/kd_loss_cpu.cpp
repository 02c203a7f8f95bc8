// CPU kernels of kdplug::kd_kl_fwd.
//
// A row is processed in three sweeps that stay in cache (a row of 128256 fp32 logits for student
// and teacher is 1 MiB): the maxima, then the sums of exponentials (2 exps per element), then the
// gradients (2 more exps) written while the inputs are still hot. Nothing of size N*C is
// allocated besides the gradients themselves. Rows are spread over threads; when there are fewer
// rows than threads, long rows are cut into chunks whose statistics are merged with the same
// row_stats_merge the CUDA kernel uses.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/kernels.h"
#include "kd_loss.h"

KD_NAMESPACE_BEGIN
namespace {

using namespace cpu;

// Statistics of one stretch of a row, relative to the stretch's own maxima (a RowStats, so
// stretches of one row merge with row_stats_merge). A non-finite maximum (NaN, +inf, or a stretch
// that is all -inf) is returned as is: the exps below would not carry it (the polynomial exp
// clamps NaN), so row_is_finite() makes the whole row NaN instead, as PyTorch's softmax does.
// With keep_x/keep_y, the stretch's exp(x - max) and exp(y - max) are kept there, so the gradient
// sweep needs no exps of its own.
template <typename T>
RowStats chunk_stats(const T* s, const T* t, int64_t n, float inv_t, float* keep_x = nullptr,
                     float* keep_y = nullptr) {
  Vec vmax_s(-INFINITY), vmax_t(-INFINITY);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    vmax_s = at::vec::maximum(vmax_s, load_vec(s + i));
    vmax_t = at::vec::maximum(vmax_t, load_vec(t + i));
  }
  float max_s = hmax_nan(vmax_s), max_t = hmax_nan(vmax_t);
  for (int64_t j = i; j < n; ++j) {
    max_s = kd_max_nan(max_s, static_cast<float>(s[j]));
    max_t = kd_max_nan(max_t, static_cast<float>(t[j]));
  }
  RowStats st = row_stats_empty();
  st.max_x = max_s * inv_t;  // T > 0, so max(s)/T is the max of s/T, rounding included
  st.max_y = max_t * inv_t;
  if (std::isnan(st.max_x) || std::isnan(st.max_y) || st.max_x == INFINITY ||
      st.max_y == INFINITY) {
    return st;
  }
  // A side that is all -inf in this stretch has sums 0 (exp against 0 gives exactly that); the
  // other side's sums are still needed when the stretch is one chunk of a longer row.
  const float ref_x = st.max_x == -INFINITY ? 0.f : st.max_x;
  const float ref_y = st.max_y == -INFINITY ? 0.f : st.max_y;
  const Vec vinv(inv_t), vmax_x(ref_x), vmax_y(ref_y), zero(0.f);
  Vec sum_x(0.f), sum_y(0.f), cross(0.f);
  for (i = 0; i + kVec <= n; i += kVec) {
    const Vec x = load_vec(s + i) * vinv;
    const Vec y = load_vec(t + i) * vinv;
    const Vec ex = fast_exp(x - vmax_x);
    const Vec ey = fast_exp(y - vmax_y);
    sum_x = sum_x + ex;
    sum_y = sum_y + ey;
    if (keep_x) {
      ex.store(keep_x + i);
      ey.store(keep_y + i);
    }
    // where the teacher's weight is 0 (its logit is -inf) the term is 0, not 0 * inf
    cross = cross + ((ey != zero) & (ey * (y - x)));
  }
  st.sum_x = hsum(sum_x);
  st.sum_y = hsum(sum_y);
  st.cross = hsum(cross);
  for (; i < n; ++i) {
    const float x = static_cast<float>(s[i]) * inv_t, y = static_cast<float>(t[i]) * inv_t;
    const float ex = kd_rescale(x, ref_x), ey = kd_rescale(y, ref_y);
    st.sum_x += ex;
    st.sum_y += ey;
    st.cross += kd_cross_term(ey, y - x);
    if (keep_x) {
      keep_x[i] = ex;
      keep_y[i] = ey;
    }
  }
  return st;
}

// exp(stretch max - lse): turns a stretch's kept exp(x - stretch max) into probabilities. A
// stretch that was all -inf kept zeros and gets 0 (its reference was 0, not its max).
inline float kept_to_probability(float stretch_max, float row_max, float log_sum) {
  return stretch_max == -INFINITY ? 0.f : std::exp((stretch_max - row_max) - log_sum);
}

// The student's gradient of one stretch from what chunk_stats kept: T·scale·(q − p), no exps.
template <typename T>
void chunk_write_kept(const float* keep_x, const float* keep_y, int64_t n, const RowStats& stretch,
                      const RowResult& r, float t_scale, T* grad_s) {
  const float fq = t_scale * kept_to_probability(stretch.max_x, r.max_x, r.log_sum_x);
  const float fp = t_scale * kept_to_probability(stretch.max_y, r.max_y, r.log_sum_y);
  const Vec vfq(fq), vfp(fp);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    store_vec(grad_s + i, Vec::loadu(keep_x + i) * vfq - Vec::loadu(keep_y + i) * vfp);
  }
  for (; i < n; ++i) grad_s[i] = static_cast<T>(keep_x[i] * fq - keep_y[i] * fp);
}

inline bool row_is_finite(const RowResult& r) {
  return std::isfinite(r.max_x) && std::isfinite(r.max_y) && std::isfinite(r.log_sum_x) &&
         std::isfinite(r.log_sum_y);
}

// Gradients of one stretch of a row from the row's final result.
template <typename T>
void chunk_write(const T* s, const T* t, int64_t n, float inv_t, const RowResult& r,
                 float t_scale, T* grad_s, T* grad_t) {
  if (!row_is_finite(r)) {
    std::fill(grad_s, grad_s + n, static_cast<T>(NAN));
    if (grad_t) std::fill(grad_t, grad_t + n, static_cast<T>(NAN));
    return;
  }
  const Vec vinv(inv_t), vmax_x(r.max_x), vmax_y(r.max_y), vscale(t_scale);
  const Vec vlog_sum_x(r.log_sum_x), vlog_sum_y(r.log_sum_y);
  const Vec vloss(r.loss_over_t2), zero(0.f);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) {
    const Vec log_q = (load_vec(s + i) * vinv - vmax_x) - vlog_sum_x;
    const Vec log_p = (load_vec(t + i) * vinv - vmax_y) - vlog_sum_y;
    const Vec q = fast_exp(log_q), p = fast_exp(log_p);
    store_vec(grad_s + i, vscale * (q - p));
    if (grad_t) {
      store_vec(grad_t + i, (p != zero) & (vscale * p * ((log_p - log_q) - vloss)));
    }
  }
  for (; i < n; ++i) {
    const float x = static_cast<float>(s[i]) * inv_t, y = static_cast<float>(t[i]) * inv_t;
    grad_s[i] = static_cast<T>(grad_student(x, y, r, t_scale));
    if (grad_t) grad_t[i] = static_cast<T>(grad_teacher(x, y, r, t_scale));
  }
}

template <typename T>
void zero_row(T* grad_s, T* grad_t, int64_t n) {
  std::fill(grad_s, grad_s + n, static_cast<T>(0));
  if (grad_t) std::fill(grad_t, grad_t + n, static_cast<T>(0));
}

template <typename acc_t>
struct KdArgsT {
  int64_t rows, cols;
  double temperature, scale;
  const bool* mask;
  acc_t* loss_rows;
};
using KdArgs = KdArgsT<float>;

constexpr int64_t kStatsStretch = 4096;  // student + teacher float32: 32 KiB

template <typename T>
void kd_forward_rows(const KdArgs& a, const T* s, const T* t, T* gs, T* gt) {
  const RowConstants<float> consts(a.temperature, a.scale);
  const float inv_t = consts.inv_t, t_scale = consts.t_scale, t_squared = consts.t_squared;
  const int64_t grain = std::max<int64_t>(1, 16384 / a.cols);
  const int64_t stretches = (a.cols + kStatsStretch - 1) / kStatsStretch;
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    // Without a teacher gradient the sum sweep keeps its exps (2·C floats a thread, in L2) and
    // the gradient sweep only scales them: 2 exps per element instead of 4.
    std::vector<float> kept(gt ? 0 : 2 * a.cols);
    std::vector<RowStats> stretch(stretches);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * a.cols;
      T* row_gt = gt ? gt + off : nullptr;
      if (a.mask && !a.mask[r]) {
        a.loss_rows[r] = 0.f;
        zero_row(gs + off, row_gt, a.cols);
        continue;
      }
      // Long rows go by stretches that stay in L1 while their max and sum sweeps run; the
      // stretches' statistics merge exactly as the GPU's threads do.
      RowStats st = row_stats_empty();
      for (int64_t k = 0; k < stretches; ++k) {
        const int64_t c = k * kStatsStretch;
        stretch[k] = chunk_stats(s + off + c, t + off + c, std::min(kStatsStretch, a.cols - c),
                                 inv_t, gt ? nullptr : kept.data() + c,
                                 gt ? nullptr : kept.data() + a.cols + c);
        st = row_stats_merge(st, stretch[k]);
      }
      const RowResult res = row_result(st);
      a.loss_rows[r] = row_is_finite(res) ? t_squared * res.loss_over_t2 : NAN;
      if (gt || !row_is_finite(res)) {
        chunk_write(s + off, t + off, a.cols, inv_t, res, t_scale, gs + off, row_gt);
        continue;
      }
      for (int64_t k = 0; k < stretches; ++k) {
        const int64_t c = k * kStatsStretch;
        chunk_write_kept(kept.data() + c, kept.data() + a.cols + c,
                         std::min(kStatsStretch, a.cols - c), stretch[k], res, t_scale,
                         gs + off + c);
      }
    }
  });
}

// Fewer rows than threads: cut each row into chunks, merge their statistics, then write.
template <typename T>
void kd_forward_split(const KdArgs& a, const T* s, const T* t, T* gs, T* gt, int64_t chunks) {
  const RowConstants<float> consts(a.temperature, a.scale);
  const float inv_t = consts.inv_t, t_scale = consts.t_scale, t_squared = consts.t_squared;
  const int64_t len = ((a.cols + chunks - 1) / chunks + kVec - 1) / kVec * kVec;
  chunks = (a.cols + len - 1) / len;
  const int64_t tasks = a.rows * chunks;
  auto active = [&](int64_t r) { return !a.mask || a.mask[r]; };
  auto span = [&](int64_t task, int64_t& off, int64_t& n) {
    const int64_t r = task / chunks, c = task % chunks;
    off = r * a.cols + c * len;
    n = std::min(len, a.cols - c * len);
  };

  std::vector<RowStats> partial(tasks, row_stats_empty());
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      if (!active(task / chunks)) continue;
      int64_t off, n;
      span(task, off, n);
      partial[task] = chunk_stats(s + off, t + off, n, inv_t);
    }
  });
  std::vector<RowResult> results(a.rows);
  for (int64_t r = 0; r < a.rows; ++r) {
    RowStats st = partial[r * chunks];
    for (int64_t c = 1; c < chunks; ++c) st = row_stats_merge(st, partial[r * chunks + c]);
    results[r] = row_result(st);
    a.loss_rows[r] = !active(r) ? 0.f
                     : row_is_finite(results[r])
                         ? t_squared * results[r].loss_over_t2
                         : NAN;
  }
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      int64_t off, n;
      span(task, off, n);
      T* chunk_gt = gt ? gt + off : nullptr;
      if (!active(task / chunks)) {
        zero_row(gs + off, chunk_gt, n);
      } else {
        chunk_write(s + off, t + off, n, inv_t, results[task / chunks], t_scale, gs + off,
                    chunk_gt);
      }
    }
  });
}

// The portable path: each row through exactly the scalar functions of kd_math.h, with the
// row's statistics gathered in 32 strided "lanes" and merged pairwise, as a CUDA warp does.
// acc_t is float, as on the GPU, except for float64 inputs, computed in float64 for gradcheck.
template <typename T, typename acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>>
void kd_forward_portable_rows(const KdArgsT<acc_t>& a, const T* s, const T* t, T* gs, T* gt) {
  constexpr int kLanes = 32;
  const RowConstants<acc_t> consts(a.temperature, a.scale);
  const acc_t inv_t = consts.inv_t, t_scale = consts.t_scale, t_squared = consts.t_squared;
  at::parallel_for(0, a.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * a.cols;
      T* row_gt = gt ? gt + off : nullptr;
      if (a.mask && !a.mask[r]) {
        a.loss_rows[r] = 0.f;
        zero_row(gs + off, row_gt, a.cols);
        continue;
      }
      RowStatsT<acc_t> lanes[kLanes];
      for (int l = 0; l < kLanes; ++l) lanes[l] = row_stats_empty<acc_t>();
      for (int64_t c = 0; c < a.cols; ++c) {
        row_stats_add(lanes[c % kLanes], static_cast<acc_t>(s[off + c]) * inv_t,
                      static_cast<acc_t>(t[off + c]) * inv_t);
      }
      for (int width = kLanes / 2; width > 0; width /= 2) {
        for (int l = 0; l < width; ++l) lanes[l] = row_stats_merge(lanes[l], lanes[l + width]);
      }
      const RowResultT<acc_t> res = row_result(lanes[0]);
      a.loss_rows[r] = t_squared * res.loss_over_t2;
      for (int64_t c = 0; c < a.cols; ++c) {
        const acc_t x = static_cast<acc_t>(s[off + c]) * inv_t;
        const acc_t y = static_cast<acc_t>(t[off + c]) * inv_t;
        gs[off + c] = static_cast<T>(grad_student(x, y, res, t_scale));
        if (row_gt) row_gt[c] = static_cast<T>(grad_teacher(x, y, res, t_scale));
      }
    }
  });
}

template <bool kPortable>
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_kl_fwd_cpu_impl(
    const at::Tensor& student_in, const at::Tensor& teacher_in, double temperature,
    const c10::optional<at::Tensor>& mask_in, int64_t reduction, bool teacher_grad) {
  check_kd_inputs(student_in, teacher_in, mask_in, temperature, reduction);
  TORCH_CHECK(student_in.device().is_cpu(), "kd_kl_fwd (CPU): expected CPU tensors");
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  c10::optional<at::Tensor> mask;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  KdOutputs out = allocate_kd_outputs(student, teacher_grad, grad_buffer_cache().empty_like(student));
  const at::Tensor row_scale = row_scale_for(student, mask, reduction);

  const double scale = row_scale.item<double>();
  const bool* mask_ptr = mask ? mask->data_ptr<bool>() : nullptr;
  if (student.scalar_type() == at::kDouble) {
    KdArgsT<double> args{student.size(0), student.size(1), temperature, scale, mask_ptr,
                         out.loss_rows.data_ptr<double>()};
    kd_forward_portable_rows(args, student.data_ptr<double>(), teacher.data_ptr<double>(),
                             out.grad_student.data_ptr<double>(),
                             teacher_grad ? out.grad_teacher.data_ptr<double>() : nullptr);
  } else {
    KdArgs args{student.size(0), student.size(1), temperature, scale, mask_ptr,
                out.loss_rows.data_ptr<float>()};
    KD_DISPATCH_FLOATING(student.scalar_type(), "kd_kl_fwd", [&] {
      const scalar_t* s = student.data_ptr<scalar_t>();
      const scalar_t* t = teacher.data_ptr<scalar_t>();
      scalar_t* gs = out.grad_student.data_ptr<scalar_t>();
      scalar_t* gt = teacher_grad ? out.grad_teacher.data_ptr<scalar_t>() : nullptr;
      if constexpr (kPortable) {
        kd_forward_portable_rows(args, s, t, gs, gt);
      } else {
        const int64_t threads = at::get_num_threads();
        const int64_t min_chunk = 4096;
        const int64_t chunks = std::min(threads / std::max<int64_t>(args.rows, 1) + 1,
                                        args.cols / min_chunk);
        if (args.rows < threads && chunks > 1) {
          kd_forward_split(args, s, t, gs, gt, chunks);
        } else {
          kd_forward_rows(args, s, t, gs, gt);
        }
      }
    });
  }
  return {reduce_loss_rows(out.loss_rows, reduction, row_scale), out.grad_student,
          out.grad_teacher};
}

}  // namespace

KD_REGISTER_CPU_KERNEL(kd_kl_fwd_kernel, &kd_kl_fwd_cpu_impl<false>)
KD_REGISTER_CPU_KERNEL(kd_kl_fwd_portable_kernel, &kd_kl_fwd_cpu_impl<true>)

KD_NAMESPACE_END
