// The arithmetic of the fused KD loss, shared by the CPU and the CUDA kernel.
//
// Everything here is a small inline function usable on host and device, so the CPU tests exercise
// the very arithmetic the GPU runs; the kernels only add memory layout and reductions.
//
// Per row, with x = s/T (student) and y = t/T (teacher):
//   p = softmax(y), q = softmax(x)
//   loss/T^2 = sum p (log p - log q) = sum p (y - x) - lse(y) + lse(x)
// so one pass of online statistics (max and scaled sum of exp for x and y, plus the
// p-weighted sum of y - x) gives the loss without any per-element log.
#pragma once

#include <math.h>

#include "kd_namespace.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline
#endif

KD_NAMESPACE_BEGIN

// Reduction codes shared by the schema and the kernels.
enum Reduction : int { kNone = 0, kSum = 1, kBatchMean = 2 };

KD_HD float kd_exp(float v) {
#if defined(__CUDA_ARCH__)
  return __expf(v);
#else
  return expf(v);
#endif
}

KD_HD float kd_log(float v) {
#if defined(__CUDA_ARCH__)
  return __logf(v);
#else
  return logf(v);
#endif
}

// float64 overloads: the CPU computes float64 inputs in float64 (for gradcheck).
KD_HD double kd_exp(double v) { return exp(v); }
KD_HD double kd_log(double v) { return log(v); }

// exp(old_max - new_max), the factor that moves a running sum onto a new maximum.
// A running max of -inf means an empty sum: its factor is 0, never exp(-inf + inf) = NaN.
template <typename acc_t>
KD_HD acc_t kd_rescale(acc_t old_max, acc_t new_max) {
  return old_max == -INFINITY ? acc_t(0) : kd_exp(old_max - new_max);
}

// Online statistics of a (part of a) row; merging is associative, so any split of the row
// (SIMD lanes, threads, blocks) gives the same result up to rounding.
// acc_t is float everywhere except float64 inputs on the CPU.
template <typename acc_t>
struct RowStatsT {
  acc_t max_x;  // running max of x
  acc_t sum_x;  // sum exp(x - max_x)
  acc_t max_y;  // running max of y
  acc_t sum_y;  // sum exp(y - max_y)
  acc_t cross;  // sum exp(y - max_y) * (y - x)
};
using RowStats = RowStatsT<float>;

template <typename acc_t = float>
KD_HD RowStatsT<acc_t> row_stats_empty() {
  RowStatsT<acc_t> r;
  r.max_x = -INFINITY;
  r.sum_x = acc_t(0);
  r.max_y = -INFINITY;
  r.sum_y = acc_t(0);
  r.cross = acc_t(0);
  return r;
}

// NaN must not vanish in a max (fmaxf drops it), so comparisons keep the first NaN seen.
template <typename acc_t>
KD_HD acc_t kd_max_nan(acc_t a, acc_t b) { return (a != a || a >= b) ? a : b; }

// Teacher weight times (y - x): a teacher entry of -inf has weight 0 and contributes 0
// (0 * log 0 = 0), not 0 * inf = NaN.
template <typename acc_t>
KD_HD acc_t kd_cross_term(acc_t weight, acc_t y_minus_x) {
  return weight == acc_t(0) ? acc_t(0) : weight * y_minus_x;
}

template <typename acc_t>
KD_HD void row_stats_add(RowStatsT<acc_t>& r, acc_t x, acc_t y) {
  const acc_t new_max_x = kd_max_nan(r.max_x, x);
  // kd_rescale, not kd_exp: an entry of -inf weighs 0 even while the running max is -inf.
  r.sum_x = r.sum_x * kd_rescale(r.max_x, new_max_x) + kd_rescale(x, new_max_x);
  r.max_x = new_max_x;

  const acc_t new_max_y = kd_max_nan(r.max_y, y);
  const acc_t scale_y = kd_rescale(r.max_y, new_max_y);
  const acc_t weight = kd_rescale(y, new_max_y);
  r.sum_y = r.sum_y * scale_y + weight;
  r.cross = r.cross * scale_y + kd_cross_term(weight, y - x);
  r.max_y = new_max_y;
}

template <typename acc_t>
KD_HD RowStatsT<acc_t> row_stats_merge(const RowStatsT<acc_t>& a, const RowStatsT<acc_t>& b) {
  RowStatsT<acc_t> r;
  r.max_x = kd_max_nan(a.max_x, b.max_x);
  r.sum_x = a.sum_x * kd_rescale(a.max_x, r.max_x) + b.sum_x * kd_rescale(b.max_x, r.max_x);
  r.max_y = kd_max_nan(a.max_y, b.max_y);
  const acc_t scale_a = kd_rescale(a.max_y, r.max_y);
  const acc_t scale_b = kd_rescale(b.max_y, r.max_y);
  r.sum_y = a.sum_y * scale_a + b.sum_y * scale_b;
  r.cross = kd_cross_term(scale_a, a.cross) + kd_cross_term(scale_b, b.cross);
  return r;
}

// What the per-element gradients of a row need, derived once from its final statistics.
// log q = (x - max_x) - log_sum_x, never x - lse(x): at |x| ~ 1e5 a float32 lse has no room
// left for the log of the sum, while x - max_x is exact near the maximum.
template <typename acc_t>
struct RowResultT {
  acc_t max_x, log_sum_x;  // lse(x) = max_x + log_sum_x
  acc_t max_y, log_sum_y;  // lse(y) = max_y + log_sum_y
  acc_t loss_over_t2;      // sum p (log p - log q)
};
using RowResult = RowResultT<float>;

template <typename acc_t>
KD_HD RowResultT<acc_t> row_result(const RowStatsT<acc_t>& r) {
  RowResultT<acc_t> out;
  out.max_x = r.max_x;
  out.log_sum_x = kd_log(r.sum_x);
  out.max_y = r.max_y;
  out.log_sum_y = kd_log(r.sum_y);
  out.loss_over_t2 =
      r.cross / r.sum_y + (r.max_x - r.max_y) + (out.log_sum_x - out.log_sum_y);
  return out;
}

template <typename acc_t>
KD_HD acc_t log_q_of(acc_t x, const RowResultT<acc_t>& r) { return (x - r.max_x) - r.log_sum_x; }

template <typename acc_t>
KD_HD acc_t log_p_of(acc_t y, const RowResultT<acc_t>& r) { return (y - r.max_y) - r.log_sum_y; }

// d loss_row / d s_c = T (q_c - p_c), times the caller's scale (reduction and incoming gradient).
template <typename acc_t>
KD_HD acc_t grad_student(acc_t x, acc_t y, const RowResultT<acc_t>& r, acc_t t_times_scale) {
  return t_times_scale * (kd_exp(log_q_of(x, r)) - kd_exp(log_p_of(y, r)));
}

// d loss_row / d t_c = T p_c ((log p_c - log q_c) - loss_row / T^2); 0 where p_c = 0.
template <typename acc_t>
KD_HD acc_t grad_teacher(acc_t x, acc_t y, const RowResultT<acc_t>& r, acc_t t_times_scale) {
  const acc_t log_p = log_p_of(y, r);
  const acc_t p = kd_exp(log_p);
  if (p == acc_t(0)) return acc_t(0);
  return t_times_scale * p * ((log_p - log_q_of(x, r)) - r.loss_over_t2);
}

// ---------------------------------------------------------------------------------------------
// Top-k teacher: the teacher is known on k distinct classes only, as indices and values v_i, the
// log-probabilities at T = 1 (log_softmax of its logits, as a teacher cache stores them). At
// temperature T its distribution over those classes is
//   renormalize: p_i = softmax_i(v / T)                 the top-k teacher, exact at any T;
//   bucket:      p_i = (1 - r) softmax_i(v / T)         r = 1 - sum_i exp(v_i), the mass outside
//                                                        the top-k at T = 1, kept as one class;
// and the student is compared on the same classes: q_i = q_{idx_i} and, with a bucket, the rest
// q_r = 1 - sum_i q_i. Per row, with x = s/T:
//   loss/T^2 = sum_i p_i (log p_i - log q_i) + r (log r - log q_r)
//   d loss/d s_c = T (q_c - p_c)                for c in the top-k
//                = T q_c (1 - r / q_r)          elsewhere (= T q_c when renormalizing)

// The teacher side of a row: max and scaled sum of v/T, and the rest mass r (0 to renormalize).
template <typename acc_t>
struct TopkTeacherT {
  acc_t max_v, sum_v, rest;
};

template <typename acc_t, typename value_t>
KD_HD TopkTeacherT<acc_t> topk_teacher(const value_t* v, int64_t k, acc_t inv_t, bool bucket) {
  TopkTeacherT<acc_t> out;
  out.max_v = -INFINITY;
  for (int64_t i = 0; i < k; ++i) out.max_v = kd_max_nan(out.max_v, acc_t(v[i]) * inv_t);
  out.sum_v = acc_t(0);
  acc_t mass = acc_t(0);
  for (int64_t i = 0; i < k; ++i) {
    out.sum_v += kd_rescale(acc_t(v[i]) * inv_t, out.max_v);
    mass += kd_exp(acc_t(v[i]));
  }
  const acc_t rest = acc_t(1) - mass;
  out.rest = bucket && rest > acc_t(0) ? rest : acc_t(0);
  return out;
}

template <typename acc_t>
KD_HD acc_t topk_p(acc_t v_over_t, const TopkTeacherT<acc_t>& te) {
  return (acc_t(1) - te.rest) * kd_rescale(v_over_t, te.max_v) / te.sum_v;
}

// A student rest mass below this is taken as this: the loss stays finite, if huge.
template <typename acc_t>
KD_HD acc_t topk_min_rest() { return acc_t(1e-30); }

// What a row's gradient pass needs: the student's log-normalizer, the loss, and the factor of
// the classes outside the top-k.
template <typename acc_t>
struct TopkRowT {
  acc_t max_x, log_sum_x;  // log q_c = (x_c - max_x) - log_sum_x
  acc_t loss_over_t2;
  acc_t outside_factor;    // 1 - r / q_r
};

// The sum of exp(x - max_x) over the teacher's classes, gathered (k is small next to C).
template <typename acc_t, typename scalar_t>
KD_HD acc_t topk_inside_sum(const scalar_t* s, const int64_t* idx, int64_t k, acc_t inv_t,
                            acc_t max_x) {
  acc_t inside = acc_t(0);
  for (int64_t i = 0; i < k; ++i) inside += kd_rescale(acc_t(s[idx[i]]) * inv_t, max_x);
  return inside;
}

// The k-sized part of a row, sequential. max_x is the student's row max; inside and outside are
// its sums of exp(x - max_x) over the teacher's classes and over the others, each summed on its
// own: the student's rest, outside / (inside + outside), is then exact even when it is tiny,
// where 1 - sum q would be all rounding.
template <typename acc_t, typename scalar_t, typename value_t>
KD_HD TopkRowT<acc_t> topk_row(const scalar_t* s, const int64_t* idx, const value_t* v, int64_t k,
                               acc_t inv_t, acc_t max_x, acc_t inside, acc_t outside,
                               const TopkTeacherT<acc_t>& te) {
  TopkRowT<acc_t> out;
  const acc_t sum_x = inside + outside;
  out.max_x = max_x;
  out.log_sum_x = kd_log(sum_x);
  const acc_t log_in = kd_log(acc_t(1) - te.rest) - kd_log(te.sum_v) - te.max_v;
  acc_t loss = acc_t(0);
  for (int64_t i = 0; i < k; ++i) {
    const acc_t x = acc_t(s[idx[i]]) * inv_t;
    const acc_t v_over_t = acc_t(v[i]) * inv_t;
    const acc_t p = topk_p(v_over_t, te);
    if (p > acc_t(0)) loss += p * ((v_over_t + log_in) - ((x - max_x) - out.log_sum_x));
  }
  acc_t q_rest = outside / sum_x;
  if (!(q_rest > topk_min_rest<acc_t>())) q_rest = topk_min_rest<acc_t>();
  if (te.rest > acc_t(0)) loss += te.rest * (kd_log(te.rest) - kd_log(q_rest));
  out.loss_over_t2 = loss;
  out.outside_factor = acc_t(1) - te.rest / q_rest;
  return out;
}

template <typename acc_t>
KD_HD acc_t topk_q(acc_t x, const TopkRowT<acc_t>& r) {
  return kd_exp((x - r.max_x) - r.log_sum_x);
}

KD_NAMESPACE_END
