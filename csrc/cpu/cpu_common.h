// Pieces shared by the CPU kernels: float vectors over any storage type, the fast exp, the lane
// operations kd_math.h's templates need on vectors, the dtype dispatch. Only the vector headers
// of ATen (not ATen.h): every kernel file is compiled three times.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>  // _mm_getcsr, _mm_setcsr
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/version.h>

#include <cmath>

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

// exp and log for the sweeps. With AVX-512 or AVX2 (the kernel files are compiled once per
// capability), e^v = 2^n e^r with n = round(v log2 e), r = v - n ln 2 in two steps (Cody-Waite),
// e^r a degree-5 minimax polynomial on [-ln2/2, ln2/2]: relative error < 2e-7 (ATen's exp_u20:
// 4e-7), about twice its throughput (9-11 instructions instead of 17). NaN stays NaN, -inf and
// anything below the float range give 0 (denormal results are flushed to 0 inside the kernels,
// NoDenormals below). log: x = m 2^e with m in [1/sqrt2, sqrt2),
// log m = f - f^2/2 + f^3 P(f), f = m - 1, P of degree 6: relative error < 2e-7, several times
// the throughput of ATen's Sleef log (what the mixture divergences spend most of their time in).
namespace fastmath {
constexpr float kLog2e = 1.4426950216293335f, kLn2Hi = 0.6931471824645996f,
                kLn2Lo = -1.9046542121259336e-09f;
constexpr float kExp[6] = {0.008296923711895943f, 0.04192033037543297f, 0.1666761189699173f,
                           0.49998849630355835f, 0.9999997019767761f, 1.0000001192092896f};
constexpr float kLog[7] = {0.08699174225330353f,  -0.1426648050546646f, 0.1491478681564331f,
                           -0.1657770574092865f, 0.19963067770004272f, -0.2500133216381073f,
                           0.3333390951156616f};
}  // namespace fastmath

#if defined(CPU_CAPABILITY_AVX512)
// exp of v in [-104, 88.72] (or NaN): fast_exp without its clamps, for callers whose arguments
// are x - max <= 0 and clamp them below themselves (the statistics sweeps of the CPU kernels).
inline Vec exp_in_range(const Vec& v) {
  using namespace fastmath;
  const __m512 x = v;
  // n = round(x log2 e) by adding and taking away 1.5 * 2^23, where a float's unit in the last
  // place is 1: the FMA rounds the product to an integer once (two uops, latency 8; a multiply
  // and a roundscale are three, latency 12)
  const __m512 shift = _mm512_set1_ps(12582912.f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), shift), shift);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExp[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExp[i]));
  return _mm512_scalef_ps(p, n);  // p * 2^n, with IEEE underflow to 0
}

// max(lo, v) returns its second operand for NaN: NaN goes through (one instruction).
inline Vec clamp_low(const Vec& lo, const Vec& v) { return _mm512_max_ps(lo, v); }

inline Vec fast_exp(const Vec& v) {
  // exp(-104) is below half the least denormal: -inf and everything below come out 0
  return exp_in_range(_mm512_min_ps(_mm512_set1_ps(88.72f), clamp_low(Vec(-104.f), v)));
}

// SPECIAL_VALUES false: for x in (0, inf) only (0 and inf come out NaN), four instructions less.
template <bool SPECIAL_VALUES = true>
inline Vec fast_log(const Vec& v) {
  using namespace fastmath;
  const __m512 x = v;
  __m512 e = _mm512_getexp_ps(x);  // floor(log2 x); -inf for 0
  __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_nan);  // [1, 2); NaN if x < 0
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.f));
  __m512 p = _mm512_set1_ps(kLog[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLog[i]));
  const __m512 f2 = _mm512_mul_ps(f, f);
  __m512 r = _mm512_fmadd_ps(f2, _mm512_set1_ps(-0.5f), f);
  r = _mm512_fmadd_ps(_mm512_mul_ps(f2, f), p, r);
  r = _mm512_fmadd_ps(e, _mm512_set1_ps(kLn2Lo), r);
  r = _mm512_fmadd_ps(e, _mm512_set1_ps(kLn2Hi), r);
  if constexpr (!SPECIAL_VALUES) return r;
  // log 0 = -inf, log inf = inf (negatives and NaN are NaN already)
  r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_EQ_OQ),
                         _mm512_set1_ps(-INFINITY));
  return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ), x);
}

// log of a positive finite x for the mixture divergences' log m, in about two thirds of
// fast_log's instructions (what jsd and the skews spend most of their extra time in). x = m 2^e
// with m in [0.75, 1.5) (getmant), the top four bits of m's mantissa pick one of 16 intervals
// of m, and with r the float nearest 1/c for the interval's centre c, log m = log(1/r) +
// log1p(m r - 1), |m r - 1| < 1/16, log1p(f) = f P(f) with P of degree 4 (relative error
// 2e-9). The intervals next to 1 take c = 1 (r = 1, f = m - 1 exactly), so log x stays
// relatively exact there, where the mixture's log is small; for m < 1 the table entry holds
// log(1/r) + ln 2 and e counts from the mantissa in [1, 2) (getexp of x). Checked against double
// log over every float in [FLT_MIN, 1.5]: absolute error < 3e-8 for |log x| < 1, relative error
// < 5e-7 throughout. (0 gives -inf, NaN stays NaN; the kernels flush denormals to 0.)
namespace mixture_log_table {
constexpr float kRcp[16] = {1.0f,          0.91428572f, 0.86486489f, 0.82051283f,
                            0.78048778f,   0.74418604f, 0.71111113f, 0.68085104f,
                            1.30612242f,   1.25490201f, 1.20754719f, 1.16363633f,
                            1.12280703f,   1.08474576f, 1.04918027f, 1.0f};
// -log(kRcp[i]) (+ ln 2 for i >= 8), rounded once to float; [15] is float(ln 2) itself, so
// e ln2 + table cancels exactly below 1.
constexpr float kLog[16] = {0.0f,         0.089612156f, 0.14518198f, 0.19782573f,
                            0.24783620f,  0.29546422f, 0.34092656f, 0.38441172f,
                            0.42608443f,  0.46608970f, 0.50455600f, 0.54159731f,
                            0.57731533f,  0.61180156f, 0.64513803f, 0.69314718f};
constexpr float kPoly[5] = {0.18796901f, -0.25006902f, 0.33334747f, -0.5f, 1.0f};
}  // namespace mixture_log_table

inline Vec mixture_log(const Vec& v) {
  using namespace mixture_log_table;
  const __m512 x = v;
  const __m512 e = _mm512_getexp_ps(x);
  const __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_nan);
  // vpermps reads the low four bits of each index: m's top four mantissa bits
  const __m512i i = _mm512_srli_epi32(_mm512_castps_si512(m), 19);
  const __m512 f =
      _mm512_fmsub_ps(m, _mm512_permutexvar_ps(i, _mm512_loadu_ps(kRcp)), _mm512_set1_ps(1.f));
  __m512 p = _mm512_set1_ps(kPoly[0]);
  for (int k = 1; k < 5; ++k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kPoly[k]));
  const __m512 base = _mm512_fmadd_ps(e, _mm512_set1_ps(fastmath::kLn2Hi),
                                      _mm512_permutexvar_ps(i, _mm512_loadu_ps(kLog)));
  return _mm512_fmadd_ps(f, p, base);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline Vec fast_exp(const Vec& v) {
  using namespace fastmath;
  const __m256 lo = _mm256_set1_ps(-87.33654f);  // ln(FLT_MIN): below it the result is 0
  const __m256 x = _mm256_min_ps(_mm256_set1_ps(88.37f), _mm256_max_ps(lo, v));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExp[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExp[i]));
  const __m256 pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  const __m256 out = _mm256_mul_ps(p, pow2n);
  return _mm256_blendv_ps(out, _mm256_setzero_ps(), _mm256_cmp_ps(v, lo, _CMP_LT_OQ));
}

template <bool SPECIAL_VALUES = true>  // (the special values are always fixed up here)
inline Vec fast_log(const Vec& v) {
  using namespace fastmath;
  const __m256 in = v;
  // Denormals are scaled into the normal range first (2^23), zero and below handled at the end.
  const __m256 tiny = _mm256_cmp_ps(in, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  const __m256 x = _mm256_blendv_ps(in, _mm256_mul_ps(in, _mm256_set1_ps(8388608.f)), tiny);
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23),
                                                 _mm256_set1_epi32(127)));
  e = _mm256_sub_ps(e, _mm256_and_ps(tiny, _mm256_set1_ps(23.f)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffff)), _mm256_set1_epi32(0x3f800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_add_ps(e, _mm256_and_ps(big, _mm256_set1_ps(1.f)));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.f));
  __m256 p = _mm256_set1_ps(kLog[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kLog[i]));
  const __m256 f2 = _mm256_mul_ps(f, f);
  __m256 r = _mm256_fmadd_ps(f2, _mm256_set1_ps(-0.5f), f);
  r = _mm256_fmadd_ps(_mm256_mul_ps(f2, f), p, r);
  r = _mm256_fmadd_ps(e, _mm256_set1_ps(kLn2Lo), r);
  r = _mm256_fmadd_ps(e, _mm256_set1_ps(kLn2Hi), r);
  // log 0 = -inf, log of a negative or NaN = NaN, log inf = inf
  r = _mm256_blendv_ps(r, _mm256_set1_ps(-INFINITY),
                       _mm256_cmp_ps(in, _mm256_setzero_ps(), _CMP_EQ_OQ));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(NAN), _mm256_cmp_ps(in, _mm256_setzero_ps(), _CMP_NGE_UQ));
  return _mm256_blendv_ps(r, in, _mm256_cmp_ps(in, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
}
#else
inline Vec fast_exp(const Vec& v) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 6)
  return v.exp_u20();  // polynomial, ~3x the throughput of the Sleef exp; NaN/inf handled by callers
#else
  return v.exp();
#endif
}
template <bool SPECIAL_VALUES = true>
inline Vec fast_log(const Vec& v) { return v.log(); }
#endif
#if !defined(CPU_CAPABILITY_AVX512)
inline Vec exp_in_range(const Vec& v) { return fast_exp(v); }  // (which clamps again)
inline Vec clamp_low(const Vec& lo, const Vec& v) { return at::vec::maximum(lo, v); }
inline Vec mixture_log(const Vec& v) { return fast_log<false>(v); }
#endif

// Loads and stores of kVec elements, in float whatever the storage type.
inline Vec load_vec(const float* p) { return Vec::loadu(p); }
template <typename T>
inline Vec load_vec(const T* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}
inline void store_vec(float* p, const Vec& v) { v.store(p); }
#if defined(CPU_CAPABILITY_AVX512)
// 16 lanes to 16-bit floats: ATen's one-vector conversions (the same rounding, bit for bit, as
// convert_from_float, which converts two vectors and would be given this one twice).
inline __m256i to_half_bits(const Vec& v, at::BFloat16*) { return at::vec::cvtfp32_bf16(v); }
inline __m256i to_half_bits(const Vec& v, at::Half*) { return at::vec::cvtfp32_fp16(v); }
template <typename T>
inline void store_vec(T* p, const Vec& v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_half_bits(v, p));
}
#else
template <typename T>
inline void store_vec(T* p, const Vec& v) {
  at::vec::convert_from_float<T>(v, v).store(p, kVec);
}
#endif

// A row's last, partial vector. With AVX-512 by masked loads and stores (lanes past the row never
// touch memory): a row of 1000 classes spent a quarter of its time in the scalar fallback below,
// whose lane-by-lane stores then stall the vector load that reads them back.
#if defined(CPU_CAPABILITY_AVX512)
// The first n lanes (all 16 for n >= 16).
inline __mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xffff : (1u << n) - 1u);
}

inline Vec load_tail(const float* p, int64_t n, float fill) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), first_lanes(n), p);
}
template <typename T>
inline Vec load_tail(const T* p, int64_t n, float fill) {
  static_assert(sizeof(T) == 2, "16-bit floats");
  const __mmask16 m = first_lanes(n);
  const __m256i bits = _mm256_maskz_loadu_epi16(m, p);
  Vec out;  // the lanes that were loaded, converted as load_vec converts them
  at::vec::load_to_float(reinterpret_cast<const T*>(&bits), out);
  return _mm512_mask_blend_ps(m, _mm512_set1_ps(fill), out);
}

inline void store_tail(float* p, const Vec& v, int64_t n) {
  _mm512_mask_storeu_ps(p, first_lanes(n), v);
}
template <typename T>
inline void store_tail(T* p, const Vec& v, int64_t n) {
  _mm256_mask_storeu_epi16(p, first_lanes(n), to_half_bits(v, p));
}
#else
template <typename T>
inline Vec load_tail(const T* p, int64_t n, float fill) {
  float lanes[kVec];
  for (int64_t i = 0; i < kVec; ++i) lanes[i] = i < n ? static_cast<float>(p[i]) : fill;
  return Vec::loadu(lanes);
}

template <typename T>
inline void store_tail(T* p, const Vec& v, int64_t n) {
  float lanes[kVec];
  v.store(lanes);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(lanes[i]);
}
#endif

// acc + w * d where w != 0, acc where w == 0 (a weight of 0 from a logit of -inf meets an
// infinite d: 0 * inf would be NaN). With AVX-512 one masked FMA.
inline Vec add_weighted(const Vec& acc, const Vec& w, const Vec& d) {
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 weighted = _mm512_cmp_ps_mask(w, _mm512_setzero_ps(), _CMP_NEQ_UQ);
  return _mm512_mask3_fmadd_ps(w, d, acc, weighted);
#else
  return acc + ((w != Vec(0.f)) & (w * d));
#endif
}

// n <= kVec elements as a vector, in float whatever the storage type: a row's tail is padded
// with `fill` (-inf for logits: such a lane weighs 0 in every sum and every divergence term).
template <typename T>
inline Vec load_n(const T* p, int64_t n, float fill) {
  return n == kVec ? load_vec(p) : load_tail(p, n, fill);
}

template <typename T>
inline void store_n(T* p, const Vec& v, int64_t n) {
  if (n == kVec) {
    store_vec(p, v);
  } else {
    store_tail(p, v, n);
  }
}

// The largest lane, NaN if any lane is NaN.
inline float hmax_nan(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  // one compare and a log-step reduction: the lane loop below is a serial chain of 15
  // compare-and-selects, twice per row in the row kernel (~50 ns of a row's ~200 ns overhead)
  if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) return NAN;
  return _mm512_reduce_max_ps(v);
#else
  float lanes[kVec];
  v.store(lanes);
  float m = lanes[0];
  for (int64_t i = 1; i < kVec; ++i) m = kd_max_nan(m, lanes[i]);
  return m;
#endif
}

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

}  // namespace cpu

// Flush-to-zero and denormals-are-zero on this thread while in scope (the caller's setting comes
// back after). Without them every arithmetic result or operand that is a denormal costs a
// microcode assist of ~100+ cycles: the exps of every row tail padded with -inf (two a row: 330
// against 150 ns a row at 100 against 96 classes), and at low temperatures or in peaked rows
// most exps and their products (probabilities under 1.2e-38, which weigh nothing in these sums
// and gradients; T = 0.05 ran ~10x slower). The
// portable kernel, the GPU's arithmetic for the tests, keeps IEEE denormals.
class NoDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  NoDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~NoDenormals() { _mm_setcsr(saved_); }
  NoDenormals(const NoDenormals&) = delete;
  NoDenormals& operator=(const NoDenormals&) = delete;

 private:
  unsigned saved_;
#endif
};

// at::parallel_for with NoDenormals on every thread, for each chunk it runs: the one way the
// fast kernels spread their work.
template <typename F>
inline void parallel_for_flushed(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    const NoDenormals no_denormals;
    f(chunk_begin, chunk_end);
  });
}

// Asks for the cache line kPrefetchWriteBytes past p, to be written. The gradients are written to
// memory the caches have not seen since it was allocated (or since other work evicted it): each
// line a store misses is first read from memory (a read-for-ownership), the store buffer fills
// behind those reads and the arithmetic stalls with it. Asked for a page ahead, the line is there
// when the store comes: kl at 2048 x 1000 with cold caches 4.4 -> 3.0 ms (docs/op.md). (An
// address past the tensor's end is fine: a prefetch never faults.)
constexpr int64_t kPrefetchWriteBytes = 4096;
template <typename T>
inline void prefetch_for_write(T* p) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) +
                                                   kPrefetchWriteBytes), 1);
}

// kd_math.h's lane operations on vectors, so its per-class templates run 16 (or 8) classes, or
// rows, at once.
template <>
struct KdLane<cpu::Vec> {
  using Vec = cpu::Vec;
#if defined(CPU_CAPABILITY_AVX512)
  // One compare into a mask register and one masked move: at::vec's comparison would widen the
  // mask into a vector of all-ones lanes and blendv compare that back into a mask.
  static Vec where_pos(const Vec& c, const Vec& a) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(c, _mm512_setzero_ps(), _CMP_GT_OQ), a);
  }
  static Vec sign(const Vec& v) {
    const __m512 zero = _mm512_setzero_ps();
    const __m512 negative =
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), _mm512_set1_ps(-1.f));
    return _mm512_mask_mov_ps(negative, _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ),
                              _mm512_set1_ps(1.f));
  }
#else
  static Vec where_pos(const Vec& c, const Vec& a) {
    return Vec::blendv(Vec(0.f), a, c > Vec(0.f));
  }
  static Vec sign(const Vec& v) {
    const Vec one(1.f), zero(0.f);
    return ((v > zero) & one) - ((v < zero) & one);
  }
#endif
  static Vec log_mixture(const Vec& v) { return cpu::mixture_log(v); }
  static Vec abs(const Vec& v) { return v.abs(); }
  // max(floor, m) returns its second operand for NaN: NaN goes through (one instruction)
  static Vec mixture_floor(const Vec& m) { return cpu::clamp_low(Vec(kMixtureFloor), m); }
  // A division takes ~10 cycles a vector; with AVX-512 a 14-bit reciprocal refined by one
  // Newton step (error ~2^-28, then two roundings: within 2 ulp) takes ~2. b is at least FLT_MIN
  // (mixture_floor), where the reciprocal is finite (below it rcp14 would flush to inf).
  static Vec div_mixture(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 r = _mm512_rcp14_ps(b);
    const __m512 e = _mm512_fnmadd_ps(b, r, _mm512_set1_ps(2.f));  // 2 - b r
    return a * Vec(_mm512_mul_ps(r, e));
#else
    return a / b;
#endif
  }
};

KD_NAMESPACE_END
