// The per-thread part of the CUDA kd_kl_fwd kernel: which elements of a row (or of a chunk of a
// row) one thread visits, the 16-byte vector loads and stores, and the kd_math.h arithmetic on
// them. Everything is __host__ __device__, so a host program can run a kernel's thread layout
// lane by lane and check it; the cross-thread reductions live in kd_loss_kernel.cu.
#pragma once

#include <stdint.h>
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

// ---- statistics of a few elements at once ----------------------------------------------------

// RowStats of N elements, equal (up to rounding) to N row_stats_add calls from row_stats_empty(),
// at 2 exponentials per element instead of 4: the maxima first, then one exp per element
// against them. Same kd_math.h rules: NaN wins the max, -inf weighs 0 (kd_rescale with an
// old max of -inf), a 0 teacher weight contributes 0 to the cross term.
template <int N>
KDC_HD RowStats kd_row_stats_of(const float* x, const float* y) {
  float mx = x[0];
  float my = y[0];
  KDC_UNROLL
  for (int i = 1; i < N; ++i) {
    mx = kd_max_nan(mx, x[i]);
    my = kd_max_nan(my, y[i]);
  }
  RowStats r;
  r.max_x = mx;
  r.max_y = my;
  r.sum_x = 0.f;
  r.sum_y = 0.f;
  r.cross = 0.f;
  KDC_UNROLL
  for (int i = 0; i < N; ++i) {
    r.sum_x += kd_rescale(x[i], mx);
    const float w = kd_rescale(y[i], my);
    r.sum_y += w;
    r.cross += kd_cross_term(w, y[i] - x[i]);
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
// element i goes to thread i, body vector v to thread v % nthreads. x = s * inv_t, y = t * inv_t.
template <typename T, int VEC>
KDC_HD RowStats kd_thread_stats(const T* __restrict__ s, const T* __restrict__ t,
                                const KdSegment& g, int tid, int nthreads, float inv_t) {
  constexpr int U = KdUnroll<VEC>::value;
  RowStats acc = row_stats_empty();
  for (int i = tid; i < g.head; i += nthreads) {
    const int c = g.head_begin + i;
    row_stats_add(acc, KdElem<T>::to_float(s[c]) * inv_t, KdElem<T>::to_float(t[c]) * inv_t);
  }
  const T* __restrict__ sb = s + g.body_begin;
  const T* __restrict__ tb = t + g.body_begin;
  int v = tid;
  for (; v + (U - 1) * nthreads < g.nvec; v += U * nthreads) {
    float x[U * VEC];
    float y[U * VEC];
    KDC_UNROLL
    for (int u = 0; u < U; ++u) {
      const int e = (v + u * nthreads) * VEC;
      kd_load_vec<T, VEC, KdLoad::kKeep>(sb + e, inv_t, x + u * VEC);
      kd_load_vec<T, VEC, KdLoad::kKeep>(tb + e, inv_t, y + u * VEC);
    }
    acc = row_stats_merge(acc, kd_row_stats_of<U * VEC>(x, y));
  }
  for (; v < g.nvec; v += nthreads) {
    float x[VEC];
    float y[VEC];
    kd_load_vec<T, VEC, KdLoad::kKeep>(sb + v * VEC, inv_t, x);
    kd_load_vec<T, VEC, KdLoad::kKeep>(tb + v * VEC, inv_t, y);
    acc = row_stats_merge(acc, kd_row_stats_of<VEC>(x, y));
  }
  for (int i = tid; i < g.tail; i += nthreads) {
    const int c = g.tail_begin + i;
    row_stats_add(acc, KdElem<T>::to_float(s[c]) * inv_t, KdElem<T>::to_float(t[c]) * inv_t);
  }
  return acc;
}

// Gradients of N elements from the row's final result (kd_math.h grad_student / grad_teacher).
template <int N, bool HAS_GT>
KDC_HD void kd_grads_of(const float* x, const float* y, const RowResult& res, float ts,
                        float* gsv, float* gtv) {
  KDC_UNROLL
  for (int i = 0; i < N; ++i) {
    gsv[i] = grad_student(x[i], y[i], res, ts);
    if (HAS_GT) gtv[i] = grad_teacher(x[i], y[i], res, ts);
  }
}

// Writes the gradients of the elements of segment g that thread `tid` of `nthreads` visits. The
// vectors are visited last to first (vector nvec-1-v goes to thread v % nthreads, still coalesced):
// the end of the segment, read last by kd_thread_stats, is the likeliest to be still in cache, and
// a re-scan in the same order as the first would be the worst case of an LRU-like cache once the
// rows in flight exceed the L2. gt is only touched when HAS_GT. ts = T * row_scale.
template <typename T, int VEC, bool HAS_GT>
KDC_HD void kd_thread_grads(const T* __restrict__ s, const T* __restrict__ t, T* __restrict__ gs,
                            T* __restrict__ gt, const KdSegment& g, int tid, int nthreads,
                            float inv_t, const RowResult& res, float ts) {
  constexpr int U = KdUnroll<VEC>::value;
  for (int i = tid; i < g.head; i += nthreads) {
    const int c = g.head_begin + i;
    const float x = KdElem<T>::to_float(s[c]) * inv_t;
    const float y = KdElem<T>::to_float(t[c]) * inv_t;
    gs[c] = KdElem<T>::from_float(grad_student(x, y, res, ts));
    if (HAS_GT) gt[c] = KdElem<T>::from_float(grad_teacher(x, y, res, ts));
  }
  const T* __restrict__ sb = s + g.body_begin;
  const T* __restrict__ tb = t + g.body_begin;
  T* __restrict__ gsb = gs + g.body_begin;
  T* __restrict__ gtb = HAS_GT ? gt + g.body_begin : gt;
  int v = tid;
  for (; v + (U - 1) * nthreads < g.nvec; v += U * nthreads) {
    float x[U * VEC];
    float y[U * VEC];
    KDC_UNROLL
    for (int u = 0; u < U; ++u) {
      const int e = (g.nvec - 1 - (v + u * nthreads)) * VEC;
      kd_load_vec<T, VEC, KdLoad::kLast>(sb + e, inv_t, x + u * VEC);
      kd_load_vec<T, VEC, KdLoad::kLast>(tb + e, inv_t, y + u * VEC);
    }
    KDC_UNROLL
    for (int u = 0; u < U; ++u) {
      const int e = (g.nvec - 1 - (v + u * nthreads)) * VEC;
      float gsv[VEC];
      float gtv[VEC];
      kd_grads_of<VEC, HAS_GT>(x + u * VEC, y + u * VEC, res, ts, gsv, gtv);
      kd_store_vec<T, VEC>(gsb + e, gsv);
      if (HAS_GT) kd_store_vec<T, VEC>(gtb + e, gtv);
    }
  }
  for (; v < g.nvec; v += nthreads) {
    const int e = (g.nvec - 1 - v) * VEC;
    float x[VEC];
    float y[VEC];
    kd_load_vec<T, VEC, KdLoad::kLast>(sb + e, inv_t, x);
    kd_load_vec<T, VEC, KdLoad::kLast>(tb + e, inv_t, y);
    float gsv[VEC];
    float gtv[VEC];
    kd_grads_of<VEC, HAS_GT>(x, y, res, ts, gsv, gtv);
    kd_store_vec<T, VEC>(gsb + e, gsv);
    if (HAS_GT) kd_store_vec<T, VEC>(gtb + e, gtv);
  }
  for (int i = tid; i < g.tail; i += nthreads) {
    const int c = g.tail_begin + i;
    const float x = KdElem<T>::to_float(s[c]) * inv_t;
    const float y = KdElem<T>::to_float(t[c]) * inv_t;
    gs[c] = KdElem<T>::from_float(grad_student(x, y, res, ts));
    if (HAS_GT) gt[c] = KdElem<T>::from_float(grad_teacher(x, y, res, ts));
  }
}

// A masked row: zero gradients over segment g, no input read.
template <typename T, int VEC, bool HAS_GT>
KDC_HD void kd_thread_zero(T* __restrict__ gs, T* __restrict__ gt, const KdSegment& g, int tid,
                           int nthreads) {
  const T zero = KdElem<T>::from_float(0.f);
  for (int i = tid; i < g.head; i += nthreads) {
    gs[g.head_begin + i] = zero;
    if (HAS_GT) gt[g.head_begin + i] = zero;
  }
  float zeros[VEC];
  KDC_UNROLL
  for (int i = 0; i < VEC; ++i) zeros[i] = 0.f;
  for (int v = tid; v < g.nvec; v += nthreads) {
    const int e = g.body_begin + v * VEC;
    kd_store_vec<T, VEC>(gs + e, zeros);
    if (HAS_GT) kd_store_vec<T, VEC>(gt + e, zeros);
  }
  for (int i = tid; i < g.tail; i += nthreads) {
    gs[g.tail_begin + i] = zero;
    if (HAS_GT) gt[g.tail_begin + i] = zero;
  }
}

}  // namespace kd_cuda
}  // namespace kdplug
