// Pieces shared by the CPU kernels: float vectors over any storage type, the fast exp, the lane
// operations kd_math.h's templates need on vectors, the dtype dispatch. Only the vector headers
// of ATen (not ATen.h): every kernel file is compiled three times.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/version.h>

#include "kd_math.h"
#include "kd_namespace.h"

KD_NAMESPACE_BEGIN
namespace cpu {

// float32, float16, bfloat16 (float64 takes the portable path).
#define KD_DISPATCH_FLOATING(TYPE, NAME, ...)                                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)            \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)         \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

inline Vec fast_exp(const Vec& v) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 6)
  return v.exp_u20();  // polynomial, ~3x the throughput of the Sleef exp; NaN/inf handled by callers
#else
  return v.exp();
#endif
}

// Loads and stores of kVec elements, in float whatever the storage type.
inline Vec load_vec(const float* p) { return Vec::loadu(p); }
template <typename T>
inline Vec load_vec(const T* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}
inline void store_vec(float* p, const Vec& v) { v.store(p); }
template <typename T>
inline void store_vec(T* p, const Vec& v) {
  at::vec::convert_from_float<T>(v, v).store(p, kVec);
}

// n <= kVec elements as a vector, in float whatever the storage type: a row's tail is padded
// with `fill` (-inf for logits: such a lane weighs 0 in every sum and every divergence term).
template <typename T>
inline Vec load_n(const T* p, int64_t n, float fill) {
  if (n == kVec) return load_vec(p);
  float lanes[kVec];
  for (int64_t i = 0; i < kVec; ++i) lanes[i] = i < n ? static_cast<float>(p[i]) : fill;
  return Vec::loadu(lanes);
}

template <typename T>
inline void store_n(T* p, const Vec& v, int64_t n) {
  if (n == kVec) {
    store_vec(p, v);
    return;
  }
  float lanes[kVec];
  v.store(lanes);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(lanes[i]);
}

inline float hmax_nan(const Vec& v) {
  float lanes[kVec];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kVec; ++i) m = kd_max_nan(m, lanes[i]);
  return m;
}

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

}  // namespace cpu

// kd_math.h's lane operations on vectors, so its per-class templates run 16 (or 8) classes, or
// rows, at once.
template <>
struct KdLane<cpu::Vec> {
  using Vec = cpu::Vec;
  static Vec where_pos(const Vec& c, const Vec& a) {
    return Vec::blendv(Vec(0.f), a, c > Vec(0.f));
  }
  static Vec log(const Vec& v) { return v.log(); }
  static Vec abs(const Vec& v) { return v.abs(); }
  static Vec sign(const Vec& v) {
    const Vec one(1.f), zero(0.f);
    return ((v > zero) & one) - ((v < zero) & one);
  }
};

KD_NAMESPACE_END
