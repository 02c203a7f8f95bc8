// The arithmetic of kdplug's fused KD losses, shared by the CPU and the CUDA kernels.
//
// Everything here is a small inline function usable on host and device, so the CPU tests exercise
// the very arithmetic the GPU runs; the kernels only add memory layout and reductions. The
// per-class functions are templates over the lane type V: float or double (CUDA, the CPU's
// portable path), or a CPU vector of floats (cpu/cpu_common.h supplies its KdLane).
//
// Per row, with x = s/T (student) and y = t/T (teacher), p = softmax(y), q = softmax(x), the loss is
// T²·D(p, q) for one of the divergences below, optionally fused with the hard-label cross-entropy:
//   α·kd_scale·T²·D + (1 − α)·ce_scale·CE(s, label),   CE at T = 1.
// Every divergence is a sum over classes of φ(p_c, q_c), so with
//   Gq = Σ_c q_c ∂φ/∂q_c,  Gp = Σ_c p_c ∂φ/∂p_c
// the softmax's chain rule gives
//   dD/dx_c = q_c ∂φ/∂q_c − q_c Gq,   dD/dy_c = p_c ∂φ/∂p_c − p_c Gp,
// and d(T²D)/ds = T dD/dx. kl and reverse_kl need no per-class log: one pass of online
// statistics (max and scaled sum of exp for x and y, plus one weighted cross sum) gives D, Gq, Gp.
// The others need the normalized p and q first, so their rows take one more pass for Σφ, Gq, Gp.
#pragma once

#include <math.h>
#include <stdint.h>

#include "kd_namespace.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline
#endif

KD_NAMESPACE_BEGIN

// Reduction codes shared by the schema and the kernels.
enum Reduction : int { kNone = 0, kSum = 1, kBatchMean = 2 };

// Divergence codes shared by the schema, kdplug/_op_support.py and the kernels.
enum Divergence : int {
  kKL = 0,             // KL(p ‖ q)
  kReverseKL = 1,      // KL(q ‖ p)
  kJSD = 2,            // β KL(p ‖ m) + (1 − β) KL(q ‖ m),  m = β p + (1 − β) q
  kTVD = 3,            // ½ Σ |p − q|
  kSkewKL = 4,         // KL(p ‖ β p + (1 − β) q)
  kSkewReverseKL = 5,  // KL(q ‖ β q + (1 − β) p)
};
constexpr int kNumDivergences = 6;

KD_HD constexpr bool is_online_divergence(int d) { return d == kKL || d == kReverseKL; }

// The accurate expf/logf on the device too (CUDA's: 2 and 1 ulp), not the __expf/__logf
// intrinsics (2 + a few ulp, worse near 0 for __logf), so the CPU tests of this arithmetic hold
// for the GPU to the ulp; T² multiplies any error of a row's log-sum.
KD_HD float kd_exp(float v) { return expf(v); }
KD_HD float kd_log(float v) { return logf(v); }

// float64 overloads: the CPU computes float64 inputs in float64 (for gradcheck).
KD_HD double kd_exp(double v) { return exp(v); }
KD_HD double kd_log(double v) { return log(v); }

constexpr float kMixtureFloor = 1.17549435e-38f;  // FLT_MIN

// Lane operations the per-class templates need beyond + − × ÷. Scalars here; the CPU kernel
// specializes KdLane for its vectors.
template <typename V>
struct KdLane {
  static KD_HD V where_pos(V c, V a) { return c > V(0) ? a : V(0); }  // a where c > 0, else 0
  // log of a mixture m in (0, 1]: jsd drops every class whose weights are 0 (where_pos), the
  // skews floor m (mixture_floor), so its value at 0 is free (the CPU's vectors skip the
  // fix-ups of log 0 and log inf)
  static KD_HD V log_mixture(V v) { return kd_log(v); }
  static KD_HD V abs(V v) { return v < V(0) ? -v : v; }
  static KD_HD V sign(V v) { return V((v > V(0)) - (v < V(0))); }
  // a / b for b in [FLT_MIN, 1] (a mixture_floor); the CPU's vectors may trade the division
  // for a reciprocal
  static KD_HD V div_mixture(V a, V b) { return a / b; }
  // a mixture m in [0, 1] raised to at least FLT_MIN, so that its log and a division by it are
  // finite (NaN stays NaN)
  static KD_HD V mixture_floor(V m) { return m < V(kMixtureFloor) ? V(kMixtureFloor) : m; }
};

// exp(old_max - new_max), the factor that moves a running sum onto a new maximum.
// A running max of -inf means an empty sum: its factor is 0, never exp(-inf + inf) = NaN.
template <typename acc_t>
KD_HD acc_t kd_rescale(acc_t old_max, acc_t new_max) {
  return old_max == -INFINITY ? acc_t(0) : kd_exp(old_max - new_max);
}

// NaN must not vanish in a max (fmaxf drops it), so comparisons keep the first NaN seen.
template <typename acc_t>
KD_HD acc_t kd_max_nan(acc_t a, acc_t b) { return (a != a || a >= b) ? a : b; }

// weight * difference, where a weight of 0 contributes 0 (0 · log 0 = 0), not 0 * inf = NaN.
template <typename acc_t>
KD_HD acc_t kd_cross_term(acc_t weight, acc_t difference) {
  return weight == acc_t(0) ? acc_t(0) : weight * difference;
}

// ---------------------------------------------------------------------------------------------
// Per-class terms of each divergence.

// A class's share of the divergence and its two gradient terms, q·∂φ/∂q and p·∂φ/∂p (additive
// constants in ∂φ dropped: Σq = Σp = 1 makes them cancel against Gq, Gp).
template <typename V>
struct ClassTerms {
  V value, qg, pg;
};

// The weights each divergence's mixture m puts on p and on q, where they are not 1: jsd's
// m = β p + (1 − β) q, skew_kl's β p + (1 − β) q (whose terms take p itself and (1 − β) q),
// skew_reverse_kl's β q + (1 − β) p.
template <typename acc_t>
struct MixtureWeights {
  acc_t p, q;
};

template <int DIV, typename acc_t>
KD_HD MixtureWeights<acc_t> mixture_weights(acc_t beta) {
  const acc_t one(1);
  return {DIV == kJSD ? beta : DIV == kSkewReverseKL ? one - beta : one,
          DIV == kJSD || DIV == kSkewKL ? one - beta : one};
}

// The skews, KL(a ‖ m) with m = β a + b_w and b_w = (1 − β) b: the value, a's own gradient term
// and the other side's. A class with a = 0 contributes 0. Where a > 0 the mixture may still
// underflow (β a below FLT_MIN, b_w 0): it is taken as FLT_MIN, so such a class weighs under
// 1e-36 instead of making log m infinite.
template <typename V>
struct SkewTerms {
  V value, own, other;
};

template <typename V>
KD_HD SkewTerms<V> skew_terms(V a, V b_w, V log_a, V beta) {
  using L = KdLane<V>;
  const V m = L::mixture_floor(beta * a + b_w);
  const V v = L::where_pos(a, a * (log_a - L::log_mixture(m)));
  const V w = L::where_pos(a, L::div_mixture(a, m));
  return {v, v - beta * a * w, V(0) - b_w * w};
}

// p, q: the probabilities; wp, wq: the same times mixture_weights<DIV> (a kernel that scales
// kept exps folds the weights into its factors); log_p, log_q: their logs, from the row
// statistics (exact where p or q underflows). A class where the weighting probability is 0
// contributes 0 (0 · log 0 = 0); a teacher p = 0 where q > 0 makes reverse_kl infinite, as the
// mathematics says. beta is the mixing weight of jsd and the skews (ignored by the others).
template <int DIV, typename V>
KD_HD ClassTerms<V> weighted_divergence_terms(V p, V q, V wp, V wq, V log_p, V log_q, V beta) {
  using L = KdLane<V>;
  const V zero(0);
  if constexpr (DIV == kKL) {
    const V v = L::where_pos(p, p * (log_p - log_q));
    return {v, zero - p, v};
  } else if constexpr (DIV == kReverseKL) {
    const V v = L::where_pos(q, q * (log_q - log_p));
    return {v, v, zero - q};
  } else if constexpr (DIV == kJSD) {
    // wp = β p > 0 makes m >= wp > 0, so log m is finite wherever a weight is positive; a class
    // whose weights underflow to 0 (p or q a denormal times β) drops out: its terms weigh less
    // than 1e-38, and log 0 would make them infinite. value = pg + qg exactly: the CPU's dense
    // sweep sums pg and qg, not the value too.
    const V log_m = L::log_mixture(wp + wq);
    const V pg = L::where_pos(wp, wp * (log_p - log_m));  // β KL(p ‖ m)'s share
    const V qg = L::where_pos(wq, wq * (log_q - log_m));  // (1-β) KL(q ‖ m)'s share
    return {pg + qg, qg, pg};
  } else if constexpr (DIV == kTVD) {
    const V d = p - q;
    const V half_sign = V(0.5f) * L::sign(d);
    return {V(0.5f) * L::abs(d), zero - q * half_sign, p * half_sign};
  } else if constexpr (DIV == kSkewKL) {
    const SkewTerms<V> k = skew_terms(p, wq, log_p, beta);
    return {k.value, k.other, k.own};
  } else {
    static_assert(DIV == kSkewReverseKL, "unknown divergence");
    const SkewTerms<V> k = skew_terms(q, wp, log_q, beta);
    return {k.value, k.own, k.other};
  }
}

template <int DIV, typename V>
KD_HD ClassTerms<V> divergence_terms(V p, V q, V log_p, V log_q, V beta) {
  const MixtureWeights<V> w = mixture_weights<DIV>(beta);
  return weighted_divergence_terms<DIV>(p, q, w.p * p, w.q * q, log_p, log_q, beta);
}

// A row's sums of the terms: D = Σ value, Gq = Σ qg, Gp = Σ pg. Merging is a sum.
template <typename acc_t>
struct RowTermsT {
  acc_t value, gq, gp;
};

template <typename acc_t>
KD_HD RowTermsT<acc_t> row_terms_empty() {
  return {acc_t(0), acc_t(0), acc_t(0)};
}

template <typename acc_t>
KD_HD RowTermsT<acc_t> row_terms_merge(const RowTermsT<acc_t>& a, const RowTermsT<acc_t>& b) {
  return {a.value + b.value, a.gq + b.gq, a.gp + b.gp};
}

template <typename acc_t, typename V>
KD_HD void row_terms_add(RowTermsT<acc_t>& r, const ClassTerms<V>& c) {
  r.value += c.value;
  r.gq += c.qg;
  r.gp += c.pg;
}

// dD/dx_c (student) and dD/dy_c (teacher) of a class from its terms and the row's sums.
template <typename V, typename acc_t>
KD_HD V student_dd(const ClassTerms<V>& c, V q, const RowTermsT<acc_t>& row) {
  return c.qg - q * V(row.gq);
}

template <typename V, typename acc_t>
KD_HD V teacher_dd(const ClassTerms<V>& c, V p, const RowTermsT<acc_t>& row) {
  return c.pg - p * V(row.gp);
}

// ---------------------------------------------------------------------------------------------
// Online row statistics.

// Statistics of a (part of a) row; merging is associative, so any split of the row (SIMD lanes,
// threads, blocks) gives the same result up to rounding. acc_t is float everywhere except
// float64 inputs on the CPU. cross is kl's Σ exp(y − max_y)(y − x), reverse_kl's
// Σ exp(x − max_x)(x − y), and 0 for the other divergences.
template <typename acc_t>
struct RowStatsT {
  acc_t max_x;  // running max of x
  acc_t sum_x;  // sum exp(x - max_x)
  acc_t max_y;  // running max of y
  acc_t sum_y;  // sum exp(y - max_y)
  acc_t cross;
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

template <int DIV, typename acc_t>
KD_HD void row_stats_add(RowStatsT<acc_t>& r, acc_t x, acc_t y) {
  const acc_t new_max_x = kd_max_nan(r.max_x, x);
  const acc_t scale_x = kd_rescale(r.max_x, new_max_x);
  // kd_rescale, not kd_exp: an entry of -inf weighs 0 even while the running max is -inf.
  const acc_t weight_x = kd_rescale(x, new_max_x);
  r.sum_x = r.sum_x * scale_x + weight_x;
  r.max_x = new_max_x;

  const acc_t new_max_y = kd_max_nan(r.max_y, y);
  const acc_t scale_y = kd_rescale(r.max_y, new_max_y);
  const acc_t weight_y = kd_rescale(y, new_max_y);
  r.sum_y = r.sum_y * scale_y + weight_y;
  r.max_y = new_max_y;
  if constexpr (DIV == kKL) r.cross = r.cross * scale_y + kd_cross_term(weight_y, y - x);
  if constexpr (DIV == kReverseKL) r.cross = r.cross * scale_x + kd_cross_term(weight_x, x - y);
}

template <int DIV, typename acc_t>
KD_HD RowStatsT<acc_t> row_stats_merge(const RowStatsT<acc_t>& a, const RowStatsT<acc_t>& b) {
  RowStatsT<acc_t> r;
  r.max_x = kd_max_nan(a.max_x, b.max_x);
  const acc_t xa = kd_rescale(a.max_x, r.max_x);
  const acc_t xb = kd_rescale(b.max_x, r.max_x);
  r.sum_x = a.sum_x * xa + b.sum_x * xb;
  r.max_y = kd_max_nan(a.max_y, b.max_y);
  const acc_t ya = kd_rescale(a.max_y, r.max_y);
  const acc_t yb = kd_rescale(b.max_y, r.max_y);
  r.sum_y = a.sum_y * ya + b.sum_y * yb;
  if constexpr (DIV == kKL) {
    r.cross = kd_cross_term(ya, a.cross) + kd_cross_term(yb, b.cross);
  } else if constexpr (DIV == kReverseKL) {
    r.cross = kd_cross_term(xa, a.cross) + kd_cross_term(xb, b.cross);
  } else {
    r.cross = acc_t(0);
  }
  return r;
}

// What the per-class passes need, derived once from a row's final statistics.
// log q = (x - max_x) - log_sum_x, never x - lse(x): at |x| ~ 1e5 a float32 lse has no room
// left for the log of the sum, while x - max_x is exact near the maximum.
template <typename acc_t>
struct RowResultT {
  acc_t max_x, log_sum_x;  // lse(x) = max_x + log_sum_x
  acc_t max_y, log_sum_y;  // lse(y) = max_y + log_sum_y
};
using RowResult = RowResultT<float>;

template <typename acc_t>
KD_HD RowResultT<acc_t> row_result(const RowStatsT<acc_t>& r) {
  RowResultT<acc_t> out;
  out.max_x = r.max_x;
  out.log_sum_x = kd_log(r.sum_x);
  out.max_y = r.max_y;
  out.log_sum_y = kd_log(r.sum_y);
  return out;
}

// A row whose statistics are not finite (a NaN, a +inf, or a side that is all -inf) is NaN, as
// PyTorch's softmax makes it.
template <typename acc_t>
KD_HD bool row_is_finite(const RowResultT<acc_t>& r) {
  return isfinite(r.max_x) && isfinite(r.max_y) && isfinite(r.log_sum_x) &&
         isfinite(r.log_sum_y);
}

template <typename V, typename acc_t>
KD_HD V log_q_of(V x, const RowResultT<acc_t>& r) { return (x - V(r.max_x)) - V(r.log_sum_x); }

template <typename V, typename acc_t>
KD_HD V log_p_of(V y, const RowResultT<acc_t>& r) { return (y - V(r.max_y)) - V(r.log_sum_y); }

// kl and reverse_kl's D, Gq, Gp from the statistics alone:
//   KL(p‖q) = Σ p (y − x) − lse(y) + lse(x):  Gq = −Σ p = −1, Gp = Σ p (log p − log q) = D;
//   KL(q‖p) likewise with the roles swapped:   Gq = D, Gp = −1.
template <int DIV, typename acc_t>
KD_HD RowTermsT<acc_t> online_row_terms(const RowStatsT<acc_t>& st, const RowResultT<acc_t>& r) {
  static_assert(is_online_divergence(DIV), "kl and reverse_kl only");
  const acc_t lse_gap = (r.max_x - r.max_y) + (r.log_sum_x - r.log_sum_y);  // lse(x) - lse(y)
  if constexpr (DIV == kKL) {
    const acc_t d = st.cross / st.sum_y + lse_gap;
    return {d, acc_t(-1), d};
  } else {
    const acc_t d = st.cross / st.sum_x - lse_gap;
    return {d, d, acc_t(-1)};
  }
}

// The CUDA kernels (and the portable CPU path that mirrors them) are templates over a "kind":
// kl and reverse_kl, with their own statistics, or kMixture, the divergences whose terms need the
// normalized p and q, picked at run time (one instantiation instead of four).
constexpr int kMixture = -1;

KD_HD constexpr int divergence_kind(int d) { return is_online_divergence(d) ? d : kMixture; }

template <typename V>
KD_HD ClassTerms<V> divergence_terms_dynamic(int d, V p, V q, V log_p, V log_q, V beta) {
  switch (d) {
    case kJSD: return divergence_terms<kJSD>(p, q, log_p, log_q, beta);
    case kTVD: return divergence_terms<kTVD>(p, q, log_p, log_q, beta);
    case kSkewKL: return divergence_terms<kSkewKL>(p, q, log_p, log_q, beta);
    case kSkewReverseKL: return divergence_terms<kSkewReverseKL>(p, q, log_p, log_q, beta);
    case kReverseKL: return divergence_terms<kReverseKL>(p, q, log_p, log_q, beta);
    default: return divergence_terms<kKL>(p, q, log_p, log_q, beta);
  }
}

template <int KIND, typename V>
KD_HD ClassTerms<V> kind_terms(int d, V p, V q, V log_p, V log_q, V beta) {
  if constexpr (KIND == kMixture) {
    return divergence_terms_dynamic(d, p, q, log_p, log_q, beta);
  } else {
    return divergence_terms<KIND>(p, q, log_p, log_q, beta);
  }
}

// The per-class terms of a row from x and y (exps recomputed), for the portable and CUDA paths.
template <int KIND, typename acc_t>
KD_HD ClassTerms<acc_t> class_terms_of(int d, acc_t x, acc_t y, const RowResultT<acc_t>& r,
                                       acc_t beta, acc_t* p_out, acc_t* q_out) {
  const acc_t log_p = log_p_of(y, r), log_q = log_q_of(x, r);
  *p_out = kd_exp(log_p);
  *q_out = kd_exp(log_q);
  return kind_terms<KIND>(d, *p_out, *q_out, log_p, log_q, beta);
}

// ---------------------------------------------------------------------------------------------
// The fused hard-label cross-entropy, at T = 1: CE = lse(s) − s_label, dCE/ds_c = σ_c − [c = y].
// At T = 1 σ is q; otherwise the student's own log-sum-exp at T = 1 is gathered online as well.

template <typename acc_t>
struct LseT {
  acc_t max, sum;  // lse = max + log(sum)
};

template <typename acc_t>
KD_HD LseT<acc_t> lse_empty() { return {acc_t(-INFINITY), acc_t(0)}; }

template <typename acc_t>
KD_HD void lse_add(LseT<acc_t>& r, acc_t v) {
  const acc_t m = kd_max_nan(r.max, v);
  r.sum = r.sum * kd_rescale(r.max, m) + kd_rescale(v, m);
  r.max = m;
}

template <typename acc_t>
KD_HD LseT<acc_t> lse_merge(const LseT<acc_t>& a, const LseT<acc_t>& b) {
  const acc_t m = kd_max_nan(a.max, b.max);
  return {m, a.sum * kd_rescale(a.max, m) + b.sum * kd_rescale(b.max, m)};
}

// The coefficients a row's loss and gradient carry, from the op's arguments:
//   loss_row = kd_loss · D + ce · CE,  grad_s = kd_grad · dD/dx + ce · (σ − onehot),
//   grad_t = kd_grad · dD/dy.
// kd_scale and ce_scale are the reduction's factors (1, or 1/counted rows and 1/labelled rows
// for batchmean); without labels α is 1.
template <typename acc_t>
struct TermCoefsT {
  acc_t kd_loss, kd_grad, ce;
};

template <typename acc_t>
KD_HD TermCoefsT<acc_t> term_coefs(double temperature, double alpha, double kd_scale,
                                   double ce_scale) {
  // In double, each rounded once: 1/0.05 is exactly 20, 1/float(0.05) is not.
  const double kd = alpha * kd_scale, ce = (1.0 - alpha) * ce_scale;
  return {acc_t(kd * temperature * temperature), acc_t(kd * temperature), acc_t(ce)};
}

// A class's gradients from its terms: the student's with the hard-label term's softmax sigma
// (the caller subtracts k.ce at the label), and the teacher's. Row is RowTermsT of a scalar or of
// the lane type (one row per lane), K a TermCoefsT.
template <typename V, typename Row, typename K>
KD_HD V grad_student_of(const ClassTerms<V>& c, V q, V sigma, const Row& row, const K& k) {
  return V(k.kd_grad) * student_dd(c, q, row) + V(k.ce) * sigma;
}

template <typename V, typename Row, typename K>
KD_HD V grad_teacher_of(const ClassTerms<V>& c, V p, const Row& row, const K& k) {
  return V(k.kd_grad) * teacher_dd(c, p, row);
}

// A row's coefficients: without its hard-label term when its label does not count.
template <typename acc_t>
KD_HD TermCoefsT<acc_t> row_coefs(const TermCoefsT<acc_t>& k, bool label_counts) {
  return {k.kd_loss, k.kd_grad, label_counts ? k.ce : acc_t(0)};
}

// ---------------------------------------------------------------------------------------------
// Top-k teacher: the teacher is known on k distinct classes only, as indices and values v_i, the
// log-probabilities at T = 1 (log_softmax of its logits, as a teacher cache stores them). The
// divergence is taken over k + 1 bins: the k classes and one rest bin holding everything else.
//   teacher: P_i = (1 − r) softmax_i(v / T), P_rest = r, with r = 1 − Σ_i exp(v_i) for
//            rest='bucket' (the mass outside the top-k at T = 1, kept as one class) and r = 0 for
//            'renormalize' (the top-k teacher, exact at any T);
//   student: Q_i = q_{idx_i} (the full softmax of x = s/T), Q_rest = 1 − Σ_i Q_i, summed over
//            the other classes (exact even when tiny, where 1 − Σ Q_i would be all rounding).
// With renormalize every divergence equals the dense one with the teacher at −inf outside its
// top-k; reverse_kl is then infinite (the student has mass where the teacher has none). By the
// same chain rule as above, over bins: for a class c of bin b,
//   dD/dx_c = q_c (∂φ_b/∂Q_b − Gq),  so a top-k class gets qg_i − Q_i Gq and every other class
//   c gets q_c · (qg_rest / Q_rest − Gq), one factor for all of them.

// The teacher side of a row: max and scaled sum of v/T, and the rest mass r (0 to renormalize).
template <typename acc_t>
struct TopkTeacherT {
  acc_t max_v, sum_v, rest;
  acc_t log_in;  // log P_i = v_i / T + log_in
};

template <typename acc_t, typename value_t>
KD_HD TopkTeacherT<acc_t> topk_teacher(const value_t* v, int64_t k, acc_t inv_t, bool bucket) {
  TopkTeacherT<acc_t> out;
  out.max_v = -INFINITY;
  for (int64_t i = 0; i < k; ++i) out.max_v = kd_max_nan(out.max_v, acc_t(v[i]) * inv_t);
  out.sum_v = acc_t(0);
  // The rest 1 - Σ exp(v) cancels: in double it is as exact as the float32 values allow (its
  // relative error is what reverse divergences' gradients carry).
  double mass = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    out.sum_v += kd_rescale(acc_t(v[i]) * inv_t, out.max_v);
    mass += kd_exp(static_cast<double>(v[i]));
  }
  const double rest = 1.0 - mass;
  out.rest = bucket && rest > 0.0 ? acc_t(rest) : acc_t(0);
  out.log_in = kd_log(acc_t(1) - out.rest) - kd_log(out.sum_v) - out.max_v;
  return out;
}

template <typename acc_t>
KD_HD acc_t topk_p(acc_t v_over_t, const TopkTeacherT<acc_t>& te) {
  return (acc_t(1) - te.rest) * kd_rescale(v_over_t, te.max_v) / te.sum_v;
}

// A student rest mass below this is taken as this inside logs and divisions: the loss stays
// finite, if huge, when the student's mass outside the top-k underflows.
template <typename acc_t>
KD_HD acc_t topk_min_rest() { return acc_t(1e-30); }

// What a row's gradient pass needs.
template <typename acc_t>
struct TopkRowT {
  acc_t max_x, log_sum_x;  // log q_c = (x_c - max_x) - log_sum_x
  RowTermsT<acc_t> terms;  // D, Gq, Gp over the k + 1 bins
  acc_t outside_factor;    // dD/dx_c = q_c * outside_factor for c outside the top-k
};

// The sum of exp(x - max_x) over the teacher's classes, gathered (k is small next to C).
template <typename acc_t, typename scalar_t>
KD_HD acc_t topk_inside_sum(const scalar_t* s, const int64_t* idx, int64_t k, acc_t inv_t,
                            acc_t max_x) {
  acc_t inside = acc_t(0);
  for (int64_t i = 0; i < k; ++i) inside += kd_rescale(acc_t(s[idx[i]]) * inv_t, max_x);
  return inside;
}

// The terms of top-k class i (x = its student logit / T, v_over_t = its value / T).
template <int DIV, typename acc_t>
KD_HD ClassTerms<acc_t> topk_class_terms(acc_t x, acc_t v_over_t, acc_t max_x, acc_t log_sum_x,
                                         const TopkTeacherT<acc_t>& te, acc_t beta, acc_t* q_out) {
  const acc_t log_q = (x - max_x) - log_sum_x;
  *q_out = kd_exp(log_q);
  return divergence_terms<DIV>(topk_p(v_over_t, te), *q_out, v_over_t + te.log_in, log_q, beta);
}

// The k-sized part of a row, sequential. max_x is the student's row max; inside and outside are
// its sums of exp(x - max_x) over the teacher's classes and over the others, each summed on its
// own.
template <int DIV, typename acc_t, typename scalar_t, typename value_t>
KD_HD TopkRowT<acc_t> topk_row(const scalar_t* s, const int64_t* idx, const value_t* v, int64_t k,
                               acc_t inv_t, acc_t max_x, acc_t inside, acc_t outside,
                               const TopkTeacherT<acc_t>& te, acc_t beta) {
  TopkRowT<acc_t> out;
  const acc_t sum_x = inside + outside;
  out.max_x = max_x;
  out.log_sum_x = kd_log(sum_x);
  out.terms = row_terms_empty<acc_t>();
  for (int64_t i = 0; i < k; ++i) {
    acc_t q;
    row_terms_add(out.terms, topk_class_terms<DIV>(acc_t(s[idx[i]]) * inv_t, acc_t(v[i]) * inv_t,
                                                   max_x, out.log_sum_x, te, beta, &q));
  }
  const acc_t q_rest = outside / sum_x;
  const acc_t q_rest_floor = q_rest > topk_min_rest<acc_t>() ? q_rest : topk_min_rest<acc_t>();
  const acc_t log_p_rest = te.rest > acc_t(0) ? kd_log(te.rest) : acc_t(-INFINITY);
  const ClassTerms<acc_t> rest =
      divergence_terms<DIV>(te.rest, q_rest, log_p_rest, kd_log(q_rest_floor), beta);
  row_terms_add(out.terms, rest);
  out.outside_factor = (q_rest > acc_t(0) ? rest.qg / q_rest_floor : acc_t(0)) - out.terms.gq;
  return out;
}

template <typename acc_t>
KD_HD acc_t topk_q(acc_t x, const TopkRowT<acc_t>& r) {
  return kd_exp((x - r.max_x) - r.log_sum_x);
}

// dD/dx of top-k class i (recomputes its terms: k is small).
template <int DIV, typename acc_t>
KD_HD acc_t topk_class_dd(acc_t x, acc_t v_over_t, const TopkTeacherT<acc_t>& te,
                          const TopkRowT<acc_t>& r, acc_t beta) {
  acc_t q;
  const ClassTerms<acc_t> c = topk_class_terms<DIV>(x, v_over_t, r.max_x, r.log_sum_x, te, beta, &q);
  return student_dd(c, q, r.terms);
}

// The divergence code as a type, so a generic lambda can take it as a compile-time constant:
//   with_divergence(code, [&](auto div) { constexpr int DIV = decltype(div)::value; ... });
template <int D>
struct DivergenceTag {
  static constexpr int value = D;
};

template <typename F>
KD_HD auto with_kind(int divergence, F&& f) {
  switch (divergence_kind(divergence)) {
    case kKL: return f(DivergenceTag<kKL>{});
    case kReverseKL: return f(DivergenceTag<kReverseKL>{});
    default: return f(DivergenceTag<kMixture>{});
  }
}

// The four divergences of kind kMixture.
template <typename F>
KD_HD auto with_mixture_divergence(int divergence, F&& f) {
  switch (divergence) {
    case kTVD: return f(DivergenceTag<kTVD>{});
    case kSkewKL: return f(DivergenceTag<kSkewKL>{});
    case kSkewReverseKL: return f(DivergenceTag<kSkewReverseKL>{});
    default: return f(DivergenceTag<kJSD>{});
  }
}

template <typename F>
KD_HD auto with_divergence(int divergence, F&& f) {
  switch (divergence) {
    case kReverseKL: return f(DivergenceTag<kReverseKL>{});
    case kJSD: return f(DivergenceTag<kJSD>{});
    case kTVD: return f(DivergenceTag<kTVD>{});
    case kSkewKL: return f(DivergenceTag<kSkewKL>{});
    case kSkewReverseKL: return f(DivergenceTag<kSkewReverseKL>{});
    default: return f(DivergenceTag<kKL>{});
  }
}

KD_NAMESPACE_END
