// The per-thread part of the CUDA kd_loss_fwd kernel: which elements of a row (or of a chunk of a
// row) one thread visits, the 16-byte vector loads and stores, and the kd_math.h arithmetic on
// them. Everything is __host__ __device__, so a host program can run a kernel's thread layout
// lane by lane and check it; the cross-thread reductions live in kd_loss_kernel.cu.
#pragma once

#include <stdint.h>
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kd_faults.h"
#include "kd_math.h"

#define KDC_HD __host__ __device__ __forceinline__

// `#pragma unroll` for the device pass only (the host compiler would warn about it).
#if defined(__CUDA_ARCH__)
#define KDC_UNROLL _Pragma("unroll")
#else
#define KDC_UNROLL
#endif

namespace kdplug {
namespace kd_cuda {

// ---- element conversion ----------------------------------------------------------------------

template <typename T>
struct KdElem;

template <>
struct KdElem<float> {
  static KDC_HD float to_float(float v) { return v; }
  static KDC_HD float from_float(float v) { return v; }
};

template <>
struct KdElem<__half> {
  static KDC_HD float to_float(__half v) { return __half2float(v); }
  static KDC_HD __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct KdElem<__nv_bfloat16> {
  static KDC_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static KDC_HD __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// ---- 16-byte loads and stores ----------------------------------------------------------------

// kKeep: first pass, the line should stay in cache for the second pass (ld.global.nc);
// kLast: second pass, the last use of the line (ld.global.cs, evict first).
enum class KdLoad { kKeep, kLast };

template <KdLoad H>
KDC_HD uint4 kd_load16(const void* p) {
#if defined(__CUDA_ARCH__)
  if (H == KdLoad::kKeep) return __ldg(static_cast<const uint4*>(p));
  return __ldcs(static_cast<const uint4*>(p));
#else
  uint4 v;
  memcpy(&v, p, sizeof(v));
  return v;
#endif
}

// Gradients are written once and not read again by this op: streaming stores (evict first) keep
// the L2 for the inputs' second pass.
KDC_HD void kd_store16(void* p, const uint4& v) {
#if defined(__CUDA_ARCH__)
  __stcs(static_cast<uint4*>(p), v);
#else
  memcpy(p, &v, sizeof(v));
#endif
}

// VEC consecutive elements at p (16-byte aligned when VEC > 1), converted, times `mul`.
template <typename T, int VEC, KdLoad H>
KDC_HD void kd_load_vec(const T* p, float mul, float* out) {
  if constexpr (VEC == 1) {
    out[0] = KdElem<T>::to_float(*p) * mul;
  } else {
    static_assert(VEC * sizeof(T) == 16, "a vector is 16 bytes");
    const uint4 raw = kd_load16<H>(p);
    T e[VEC];
    memcpy(static_cast<void*>(e), &raw, sizeof(raw));  // bits, no conversion
    KDC_UNROLL
    for (int i = 0; i < VEC; ++i) out[i] = KdElem<T>::to_float(e[i]) * mul;
  }
}

template <typename T, int VEC>
KDC_HD void kd_store_vec(T* p, const float* in) {
  if constexpr (VEC == 1) {
    *p = KdElem<T>::from_float(in[0]);
  } else {
    static_assert(VEC * sizeof(T) == 16, "a vector is 16 bytes");
    T e[VEC];
    KDC_UNROLL
    for (int i = 0; i < VEC; ++i) e[i] = KdElem<T>::from_float(in[i]);
    uint4 raw;
    memcpy(&raw, static_cast<const void*>(e), sizeof(raw));
    kd_store16(p, raw);
  }
}

// ---- what a row's passes gather and need --------------------------------------------------------

// A row's statistics pass: kd_math.h's online statistics of x = s/T and y = t/T and, when the
// hard-label term's softmax at T = 1 is not q (T != 1), the student's own log-sum-exp of s.
struct KdStats {
  RowStats st;
  LseT<float> ce;
};

KDC_HD KdStats kd_stats_empty() { return {row_stats_empty(), lse_empty<float>()}; }

template <int KIND>
KDC_HD KdStats kd_stats_merge(const KdStats& a, const KdStats& b) {
  return {row_stats_merge<KIND>(a.st, b.st), lse_merge(a.ce, b.ce)};
}

// The launch's constants the per-thread functions need.
struct KdParams {
  float inv_t;       // float(1/T), 1/T in double
  float beta;
  int divergence;
  bool ce_separate;  // a hard-label term at T != 1
};

// What the per-element passes of a row need, derived once from its merged statistics.
struct KdRow {
  RowResult res;
  RowTermsT<float> terms;    // D, Gq, Gp (for the mixture divergences: after their own pass)
  float ce_max, ce_log_sum;  // the hard-label term's log-sum-exp at T = 1
  TermCoefsT<float> k;       // the row's coefficients (no hard-label term without a label)
  int label;                 // the hard label's column, or -1
};

// A row's label: its column, -1 when it has none (or it is ignore_index), -2 when it is out of
// range (the row is then NaN and the fault recorded: the kernel must never read outside the row).
KDC_HD int kd_label_of(const int64_t* labels, int64_t row, int64_t ignore_index, int cols) {
  if (labels == nullptr) return -1;
  const int64_t y = labels[row];
  if (y == ignore_index) return -1;
  return y >= 0 && y < cols ? static_cast<int>(y) : -2;
}

// Records a row's out-of-range label (kd_label_of's -2) as a fault; one thread per row calls it.
KDC_HD void kd_note_label_fault(KdFaultRecord* fault, const int64_t* labels, int64_t row,
                                int label, int64_t ignore_index, int cols) {
  if (label == -2) {
    kd_record_fault(fault, kFaultLabelOutOfRange, kFaultOpKdLoss, row, labels[row], cols,
                    ignore_index);
  }
}

// The row's KdRow from its merged statistics; false for a row that is NaN.
template <int KIND>
KDC_HD bool kd_row_begin(const KdStats& st, const KdParams& p, const TermCoefsT<float>& k,
                         int label, KdRow& row) {
  row.res = row_result(st.st);
  row.label = label;
  row.k = row_coefs(k, label >= 0);
  row.ce_max = p.ce_separate ? st.ce.max : row.res.max_x;
  row.ce_log_sum = p.ce_separate ? kd_log(st.ce.sum) : row.res.log_sum_x;
  if constexpr (KIND != kMixture) {
    row.terms = online_row_terms<KIND>(st.st, row.res);
  } else {
    row.terms = row_terms_empty<float>();
  }
  return label != -2 && row_is_finite(row.res);
}

// The row's loss with its factors, from its student row s (read at the label).
template <typename T>
KDC_HD float kd_row_loss(const KdRow& row, const T* s) {
  const float ce = row.label < 0 ? 0.f
                                 : (row.ce_max + row.ce_log_sum) - KdElem<T>::to_float(s[row.label]);
  return row.k.kd_loss * row.terms.value + row.k.ce * ce;
}

// ---- statistics of a few elements at once ----------------------------------------------------

// KdStats of N elements (raw logits s, t), equal (up to rounding) to N row_stats_add calls from
// row_stats_empty(), at one exponential per element and input instead of two: the maxima first,
// then one exp per element against them. Same kd_math.h rules: NaN wins the max, -inf weighs 0
// (kd_rescale with an old max of -inf), a 0 weight contributes 0 to the cross term.
template <int KIND, int N>
KDC_HD KdStats kd_stats_of(const float* s, const float* t, const KdParams& p) {
  float x[N];
  float y[N];
  KDC_UNROLL
  for (int i = 0; i < N; ++i) {
    x[i] = s[i] * p.inv_t;
    y[i] = t[i] * p.inv_t;
  }
  float mx = x[0];
  float my = y[0];
  KDC_UNROLL
  for (int i = 1; i < N; ++i) {
    mx = kd_max_nan(mx, x[i]);
    my = kd_max_nan(my, y[i]);
  }
  KdStats r = kd_stats_empty();
  r.st.max_x = mx;
  r.st.max_y = my;
  KDC_UNROLL
  for (int i = 0; i < N; ++i) {
    const float wx = kd_rescale(x[i], mx);
    const float wy = kd_rescale(y[i], my);
    r.st.sum_x += wx;
    r.st.sum_y += wy;
    if constexpr (KIND == kKL) r.st.cross += kd_cross_term(wy, y[i] - x[i]);
    if constexpr (KIND == kReverseKL) r.st.cross += kd_cross_term(wx, x[i] - y[i]);
  }
  if (p.ce_separate) {
    float ms = s[0];
    KDC_UNROLL
    for (int i = 1; i < N; ++i) ms = kd_max_nan(ms, s[i]);
    r.ce.max = ms;
    KDC_UNROLL
    for (int i = 0; i < N; ++i) r.ce.sum += kd_rescale(s[i], ms);
  }
  return r;
}

// ---- which elements a thread visits -----------------------------------------------------------

// A range [begin, end) of a row, cut into an unaligned head (< VEC elements, scalar), a body of
// 16-byte vectors and a tail (< VEC elements, scalar). The head is computed from the student's
// address; the launcher takes the vector path only when student, teacher and the gradients have
// the same address modulo 16, so the same cut is aligned for all four.
struct KdSegment {
  int head_begin;  // = begin
  int head;        // scalar elements before the first aligned vector
  int body_begin;  // first element of the vectors
  int nvec;        // vectors of VEC elements
  int tail_begin;  // first element after the vectors
  int tail;        // scalar elements after the vectors
};

template <typename T, int VEC>
KDC_HD KdSegment kd_segment(const T* row, int begin, int end) {
  const int len = end - begin;
  int head = 0;
  if (VEC > 1) {
    const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(row + begin) & 15u);
    head = mis == 0 ? 0 : static_cast<int>((16u - mis) / sizeof(T));
    if (head > len) head = len;
  }
  KdSegment g;
  g.head_begin = begin;
  g.head = head;
  g.body_begin = begin + head;
  g.nvec = (len - head) / VEC;
  g.tail_begin = g.body_begin + g.nvec * VEC;
  g.tail = end - g.tail_begin;
  return g;
}

// Vectors a thread loads before using any (memory-level parallelism; also the elements per
// kd_row_stats_of, so the merge's 4 exponentials are shared by UNROLL*VEC elements).
template <int VEC>
struct KdUnroll {
  static constexpr int value = VEC == 1 ? 4 : 2;
};

// Statistics of the elements thread `tid` of `nthreads` visits in segment g: head and tail
// element i goes to thread i, body vector v to thread v % nthreads.
template <int KIND, typename T, int VEC>
KDC_HD KdStats kd_thread_stats(const T* __restrict__ s, const T* __restrict__ t,
                               const KdSegment& g, int tid, int nthreads, const KdParams& p) {
  constexpr int U = KdUnroll<VEC>::value;
  KdStats acc = kd_stats_empty();
  auto add_one = [&](int c) {
    const float sv = KdElem<T>::to_float(s[c]);
    row_stats_add<KIND>(acc.st, sv * p.inv_t, KdElem<T>::to_float(t[c]) * p.inv_t);
    if (p.ce_separate) lse_add(acc.ce, sv);
  };
  for (int i = tid; i < g.head; i += nthreads) add_one(g.head_begin + i);
  const T* __restrict__ sb = s + g.body_begin;
  const T* __restrict__ tb = t + g.body_begin;
  int v = tid;
  for (; v + (U - 1) * nthreads < g.nvec; v += U * nthreads) {
    float sv[U * VEC];
    float tv[U * VEC];
    KDC_UNROLL
    for (int u = 0; u < U; ++u) {
      const int e = (v + u * nthreads) * VEC;
      kd_load_vec<T, VEC, KdLoad::kKeep>(sb + e, 1.f, sv + u * VEC);
      kd_load_vec<T, VEC, KdLoad::kKeep>(tb + e, 1.f, tv + u * VEC);
    }
    acc = kd_stats_merge<KIND>(acc, kd_stats_of<KIND, U * VEC>(sv, tv, p));
  }
  for (; v < g.nvec; v += nthreads) {
    float sv[VEC];
    float tv[VEC];
    kd_load_vec<T, VEC, KdLoad::kKeep>(sb + v * VEC, 1.f, sv);
    kd_load_vec<T, VEC, KdLoad::kKeep>(tb + v * VEC, 1.f, tv);
    acc = kd_stats_merge<KIND>(acc, kd_stats_of<KIND, VEC>(sv, tv, p));
  }
  for (int i = tid; i < g.tail; i += nthreads) add_one(g.tail_begin + i);
  return acc;
}

// The mixture divergences' sums Σφ, Gq, Gp over the elements thread `tid` visits (same layout).
template <typename T, int VEC>
KDC_HD RowTermsT<float> kd_thread_terms(const T* __restrict__ s, const T* __restrict__ t,
                                        const KdSegment& g, int tid, int nthreads,
                                        const KdParams& p, const RowResult& res) {
  RowTermsT<float> acc = row_terms_empty<float>();
  auto add_one = [&](float sv, float tv) {
    float pi, qi;
    row_terms_add(acc, class_terms_of<kMixture>(p.divergence, sv * p.inv_t, tv * p.inv_t, res,
                                                p.beta, &pi, &qi));
  };
  for (int i = tid; i < g.head; i += nthreads) {
    const int c = g.head_begin + i;
    add_one(KdElem<T>::to_float(s[c]), KdElem<T>::to_float(t[c]));
  }
  for (int v = tid; v < g.nvec; v += nthreads) {
    float sv[VEC];
    float tv[VEC];
    kd_load_vec<T, VEC, KdLoad::kKeep>(s + g.body_begin + v * VEC, 1.f, sv);
    kd_load_vec<T, VEC, KdLoad::kKeep>(t + g.body_begin + v * VEC, 1.f, tv);
    KDC_UNROLL
    for (int i = 0; i < VEC; ++i) add_one(sv[i], tv[i]);
  }
  for (int i = tid; i < g.tail; i += nthreads) {
    const int c = g.tail_begin + i;
    add_one(KdElem<T>::to_float(s[c]), KdElem<T>::to_float(t[c]));
  }
  return acc;
}

// The gradients of one element (raw logits sv, tv at column col) from the row's KdRow:
// kd_math.h's class terms, the chain rule, and the hard-label term.
template <int KIND>
KDC_HD void kd_elem_grads(float sv, float tv, int col, const KdParams& p, const KdRow& row,
                          float* gs, float* gt) {
  float pi, qi;
  const ClassTerms<float> ct =
      class_terms_of<KIND>(p.divergence, sv * p.inv_t, tv * p.inv_t, row.res, p.beta, &pi, &qi);
  const float sigma = p.ce_separate ? kd_exp((sv - row.ce_max) - row.ce_log_sum) : qi;
  *gs = grad_student_of(ct, qi, sigma, row.terms, row.k) - (col == row.label ? row.k.ce : 0.f);
  *gt = grad_teacher_of(ct, pi, row.terms, row.k);
}

// Writes the gradients of the elements of segment g that thread `tid` of `nthreads` visits (gs
// or gt may be nullptr: that gradient is not wanted). The vectors are
// visited last to first (vector nvec-1-v goes to thread v % nthreads, still coalesced): the end
// of the segment, read last by kd_thread_stats, is the likeliest to be still in cache, and a
// re-scan in the same order as the first would be the worst case of an LRU-like cache once the
// rows in flight exceed the L2.
template <int KIND, typename T, int VEC>
KDC_HD void kd_thread_grads(const T* __restrict__ s, const T* __restrict__ t, T* __restrict__ gs,
                            T* __restrict__ gt, const KdSegment& g, int tid, int nthreads,
                            const KdParams& p, const KdRow& row) {
  constexpr int U = KdUnroll<VEC>::value;
  auto one = [&](int c) {
    float a, b;
    kd_elem_grads<KIND>(KdElem<T>::to_float(s[c]), KdElem<T>::to_float(t[c]), c, p, row, &a, &b);
    if (gs != nullptr) gs[c] = KdElem<T>::from_float(a);
    if (gt != nullptr) gt[c] = KdElem<T>::from_float(b);
  };
  for (int i = tid; i < g.head; i += nthreads) one(g.head_begin + i);
  const T* __restrict__ sb = s + g.body_begin;
  const T* __restrict__ tb = t + g.body_begin;
  auto vectors = [&](int e, const float* sv, const float* tv) {
    float gsv[VEC];
    float gtv[VEC];
    KDC_UNROLL
    for (int i = 0; i < VEC; ++i) {
      kd_elem_grads<KIND>(sv[i], tv[i], g.body_begin + e + i, p, row, gsv + i, gtv + i);
    }
    if (gs != nullptr) kd_store_vec<T, VEC>(gs + g.body_begin + e, gsv);
    if (gt != nullptr) kd_store_vec<T, VEC>(gt + g.body_begin + e, gtv);
  };
  int v = tid;
  for (; v + (U - 1) * nthreads < g.nvec; v += U * nthreads) {
    float sv[U * VEC];
    float tv[U * VEC];
    KDC_UNROLL
    for (int u = 0; u < U; ++u) {
      const int e = (g.nvec - 1 - (v + u * nthreads)) * VEC;
      kd_load_vec<T, VEC, KdLoad::kLast>(sb + e, 1.f, sv + u * VEC);
      kd_load_vec<T, VEC, KdLoad::kLast>(tb + e, 1.f, tv + u * VEC);
    }
    KDC_UNROLL
    for (int u = 0; u < U; ++u) {
      vectors((g.nvec - 1 - (v + u * nthreads)) * VEC, sv + u * VEC, tv + u * VEC);
    }
  }
  for (; v < g.nvec; v += nthreads) {
    const int e = (g.nvec - 1 - v) * VEC;
    float sv[VEC];
    float tv[VEC];
    kd_load_vec<T, VEC, KdLoad::kLast>(sb + e, 1.f, sv);
    kd_load_vec<T, VEC, KdLoad::kLast>(tb + e, 1.f, tv);
    vectors(e, sv, tv);
  }
  for (int i = tid; i < g.tail; i += nthreads) one(g.tail_begin + i);
}

// A row that does not count (value 0) or is NaN (value NaN): its gradients over segment g are
// that value, and no input is read.
template <typename T, int VEC>
KDC_HD void kd_thread_fill(T* __restrict__ gs, T* __restrict__ gt, const KdSegment& g, int tid,
                           int nthreads, float value) {
  const T fill = KdElem<T>::from_float(value);
  auto one = [&](int c) {
    if (gs != nullptr) gs[c] = fill;
    if (gt != nullptr) gt[c] = fill;
  };
  for (int i = tid; i < g.head; i += nthreads) one(g.head_begin + i);
  float lanes[VEC];
  KDC_UNROLL
  for (int i = 0; i < VEC; ++i) lanes[i] = value;
  for (int v = tid; v < g.nvec; v += nthreads) {
    const int e = g.body_begin + v * VEC;
    if (gs != nullptr) kd_store_vec<T, VEC>(gs + e, lanes);
    if (gt != nullptr) kd_store_vec<T, VEC>(gt + e, lanes);
  }
  for (int i = tid; i < g.tail; i += nthreads) one(g.tail_begin + i);
}

}  // namespace kd_cuda
}  // namespace kdplug
