// The CPU vector kernel of kdplug::kd_loss_fwd for rows of more than kSmallClasses classes.
//
// A row goes by stretches of kStretch classes that stay in L1 (student + teacher float32: 32 KiB)
// while two sweeps run on them: the maxima, then the sums of exponentials, which are kept (a few
// floats per class and thread, in L2). Then, for divergences that need the normalized p and q
// (jsd, tvd, the skews), a sweep of their per-class terms (one log per class), kept as well; then
// the gradient sweep, which writes every gradient from what was kept, with no exp of its own. So
// every input element costs one exp (two with a hard-label term at T != 1) and is read from
// memory once; nothing of size N*C is allocated besides the gradients. The stretches' statistics
// merge as the GPU's threads do (kd_math.h). With fewer rows than threads, rows are cut into
// chunks processed in parallel in phases (statistics, terms, gradients) that recompute their exps.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/kd_cpu.h"

KD_NAMESPACE_BEGIN
namespace cpu {
namespace {

constexpr int64_t kStretch = 4096;

using Consts = KernelConsts<float>;
using RowTerms = RowTermsT<float>;

// Statistics of one stretch, relative to the stretch's own maxima (so stretches merge with
// row_stats_merge and lse_merge). ce: the student's log-sum-exp at T = 1 (when the hard-label
// term needs its own). A non-finite maximum (NaN, +inf, or a stretch that is all -inf) is returned
// as is: the polynomial exp below would not carry it, so row_is_finite() makes the whole row NaN
// instead, as PyTorch's softmax does.
struct StretchStats {
  RowStats st;
  LseT<float> ce;
};

// Where kept values live for the gradient sweep; all nullptr when the caller recomputes them.
struct Kept {
  float* ex;  // exp(x - stretch max_x)
  float* ey;  // exp(y - stretch max_y)
  float* es;  // exp(s - stretch max_s), only when the hard-label term needs its own softmax
  float* qg;  // q dphi/dq of the mixture divergences
  float* pg;  // p dphi/dp, only with a teacher gradient
};

// The largest of a vector and the maximum so far. Not NaN-propagating (one instruction instead
// of four): a NaN the maxima miss still reaches the sums of exponentials below (the polynomial
// exp carries NaN), so the row's statistics are NaN and the row is NaN all the same.
inline Vec max_so_far(const Vec& so_far, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(so_far, v);
#else
  return at::vec::maximum(so_far, v);
#endif
}

template <int KIND, typename T>
StretchStats stretch_stats(const T* s, const T* t, int64_t n, const Consts& c, const Kept& keep) {
  Vec vmax_s(-INFINITY), vmax_t(-INFINITY);
  for (int64_t i = 0; i < n; i += kVec) {
    const int64_t m = std::min(kVec, n - i);
    vmax_s = max_so_far(vmax_s, load_n(s + i, m, -INFINITY));
    vmax_t = max_so_far(vmax_t, load_n(t + i, m, -INFINITY));
  }
  const float max_s = hmax_nan(vmax_s), max_t = hmax_nan(vmax_t);
  StretchStats out;
  out.st = row_stats_empty();
  out.st.max_x = max_s * c.inv_t;  // T > 0, so max(s)/T is the max of s/T, rounding included
  out.st.max_y = max_t * c.inv_t;
  out.ce = {max_s, 0.f};
  if (std::isnan(out.st.max_x) || std::isnan(out.st.max_y) || out.st.max_x == INFINITY ||
      out.st.max_y == INFINITY) {
    return out;
  }
  // A side that is all -inf in this stretch has sums 0 (exp against 0 gives exactly that); the
  // other side's sums are still needed when the stretch is one part of a longer row.
  const Vec vinv(c.inv_t);
  // in registers: the stores below could alias them for all the compiler knows
  const bool keep_exps = keep.ex != nullptr, ce_separate = c.ce_separate;
  const float ref_x_s = out.st.max_x == -INFINITY ? 0.f : out.st.max_x;
  const float ref_y_s = out.st.max_y == -INFINITY ? 0.f : out.st.max_y;
  const Vec ref_x(ref_x_s), ref_y(ref_y_s);
  const Vec ref_s(max_s == -INFINITY ? 0.f : max_s);
  Vec sum_x(0.f), sum_y(0.f), cross(0.f), sum_s(0.f);
  const Vec lowest(-104.f);
  for (int64_t i = 0; i < n; i += kVec) {
    // The next stretch (rows are contiguous: the next row's start after a row's last stretch)
    // comes in from memory while this one computes in L1.
    __builtin_prefetch(s + n + i);
    __builtin_prefetch(t + n + i);
    const int64_t m = std::min(kVec, n - i);
    const Vec sv = load_n(s + i, m, -INFINITY);
    // x - ref as one FMA of the logit; the arguments are <= 0 (or NaN): clamped below only
    const Vec dx = at::vec::fmsub(sv, vinv, ref_x);
    const Vec dy = at::vec::fmsub(load_n(t + i, m, -INFINITY), vinv, ref_y);
    const Vec ex = exp_in_range(clamp_low(lowest, dx));
    const Vec ey = exp_in_range(clamp_low(lowest, dy));
    sum_x = sum_x + ex;
    sum_y = sum_y + ey;
    if constexpr (KIND == kKL) cross = add_weighted(cross, ey, dy - dx);
    if constexpr (KIND == kReverseKL) cross = add_weighted(cross, ex, dx - dy);
    if (keep_exps) {
      ex.store(keep.ex + i);
      ey.store(keep.ey + i);
    }
    if (ce_separate) {
      const Vec es = fast_exp(sv - ref_s);
      sum_s = sum_s + es;
      if (keep.es) es.store(keep.es + i);
    }
  }
  out.st.sum_x = hsum(sum_x);
  out.st.sum_y = hsum(sum_y);
  // The cross term was summed against the references, sum e_y (dy - dx): back to sum e_y (y - x)
  // (reverse kl: e_x, x - y), what the merges of stretches and rows take.
  out.st.cross = hsum(cross);
  if constexpr (KIND == kKL) out.st.cross += (ref_y_s - ref_x_s) * out.st.sum_y;
  if constexpr (KIND == kReverseKL) out.st.cross += (ref_x_s - ref_y_s) * out.st.sum_x;
  out.ce.sum = hsum(sum_s);
  return out;
}

// What the per-class sweeps of a row need besides its inputs.
struct RowState {
  RowResult res;
  RowTerms terms;
  float ce_max, ce_log_sum;  // the hard-label term's log-sum-exp at T = 1
  TermCoefsT<float> k;       // the row's coefficients (no hard-label term without a label)
  int64_t label;             // the row's hard label, or -1
};

// exp(stretch max - lse): turns a stretch's kept exp(v - stretch max) into probabilities. A
// stretch that was all -inf kept zeros and gets 0 (its reference was 0, not its max).
inline float kept_factor(float stretch_max, float row_max, float log_sum) {
  return stretch_max == -INFINITY ? 0.f : std::exp((stretch_max - row_max) - log_sum);
}

struct KeptFactors {
  float fq, fp, fs;
};

// A row of one stretch: the factors are 1/sum, one division each instead of exp(-log sum)
// through libm, and rounded once. (A finite row's sums are at least 1: its maximum adds exp(0).)
inline KeptFactors whole_row_factors(const StretchStats& st, const Consts& c) {
  const float fq = 1.f / st.st.sum_x;
  return {fq, 1.f / st.st.sum_y, c.ce_separate ? 1.f / st.ce.sum : fq};
}

inline KeptFactors kept_factors(const StretchStats& st, const RowState& row, const Consts& c) {
  KeptFactors f;
  f.fq = kept_factor(st.st.max_x, row.res.max_x, row.res.log_sum_x);
  f.fp = kept_factor(st.st.max_y, row.res.max_y, row.res.log_sum_y);
  f.fs = c.ce_separate ? kept_factor(st.ce.max, row.ce_max, row.ce_log_sum) : f.fq;
  return f;
}

// p, q and the hard-label softmax of kVec classes, and the logs of p and q: from kept exps, or
// recomputed. Built once per stretch, so that the loops below hold their pointers and constants
// in registers (the gradient stores could alias the structs they come from, for all the
// compiler knows).
template <bool KEPT>
class ClassProbabilities {
 public:
  ClassProbabilities(const RowState& row, const Consts& c, const Kept& keep, const KeptFactors& f)
      : inv_(c.inv_t),
        // log q = x - max_x - lse_x as one FMA of the logit, the two row constants added once
        off_q_(row.res.max_x + row.res.log_sum_x),
        off_p_(row.res.max_y + row.res.log_sum_y),
        fq_(f.fq),
        fp_(f.fp),
        fs_(f.fs),  // (fq when the hard-label term has no softmax of its own)
        ce_off_(row.ce_max + row.ce_log_sum),
        ex_(keep.ex),
        ey_(keep.ey),
        // without a softmax of its own, the hard-label term's is q: the same kept exps
        es_(c.ce_separate ? keep.es : keep.ex),
        ce_separate_(c.ce_separate) {}

  Vec log_q(const Vec& sv) const { return at::vec::fmsub(sv, inv_, off_q_); }
  Vec log_p(const Vec& tv) const { return at::vec::fmsub(tv, inv_, off_p_); }

  // KEPT only: the kept exps times a factor (the stretch's, or one with a weight folded in)
  Vec kept_q(int64_t i, const Vec& factor) const { return Vec::loadu(ex_ + i) * factor; }
  Vec kept_p(int64_t i, const Vec& factor) const { return Vec::loadu(ey_ + i) * factor; }
  // lq, lp: log q and log p of the same classes
  Vec q(int64_t i, const Vec& lq) const {
    if constexpr (KEPT) return kept_q(i, fq_);
    return fast_exp(lq);
  }
  Vec p(int64_t i, const Vec& lp) const {
    if constexpr (KEPT) return kept_p(i, fp_);
    return fast_exp(lp);
  }
  Vec sigma(int64_t i, const Vec& sv, const Vec& q) const {
    if constexpr (KEPT) return Vec::loadu(es_ + i) * fs_;
    return ce_separate_ ? fast_exp(sv - ce_off_) : q;
  }

 private:
  Vec inv_, off_q_, off_p_, fq_, fp_, fs_, ce_off_;
  const float *ex_, *ey_, *es_;
  bool ce_separate_;
};

// Σφ, Gq, Gp of a stretch (the mixture divergences), keeping q dphi/dq (and p dphi/dp) per
// class for the gradient sweep. Gp is the teacher gradient's (and part of jsd's value): without
// them it is left 0, and the skews and tvd skip their p dphi/dp.
template <int DIV, bool KEPT, bool HAS_GT, typename T>
RowTerms stretch_terms(const T* s, const T* t, int64_t n, const RowState& row, const Consts& c,
                       const Kept& keep, const KeptFactors& f) {
  constexpr bool kSumGp = HAS_GT || DIV == kJSD;
  const ClassProbabilities<KEPT> pr(row, c, keep, f);
  const Vec vbeta(c.beta);
  // kept exps: the mixture's weights folded into the factors, a multiply a class less each
  const MixtureWeights<float> w = mixture_weights<DIV>(c.beta);
  const Vec weighted_fp(f.fp * w.p), weighted_fq(f.fq * w.q);
  float* const kept_qg = keep.qg;
  float* const kept_pg = keep.pg;
  Vec value(0.f), gq(0.f), gp(0.f);
  for (int64_t i = 0; i < n; i += kVec) {
    const int64_t m = std::min(kVec, n - i);
    const Vec log_q = pr.log_q(load_n(s + i, m, -INFINITY));
    const Vec log_p = pr.log_p(load_n(t + i, m, -INFINITY));
    const Vec p = pr.p(i, log_p), q = pr.q(i, log_q);
    const Vec wp = KEPT ? pr.kept_p(i, weighted_fp) : Vec(w.p) * p;
    const Vec wq = KEPT ? pr.kept_q(i, weighted_fq) : Vec(w.q) * q;
    const ClassTerms<Vec> ct =
        weighted_divergence_terms<DIV>(p, q, wp, wq, log_p, log_q, vbeta);
    if constexpr (DIV != kJSD) value = value + ct.value;  // jsd's value is qg + pg
    gq = gq + ct.qg;
    if constexpr (kSumGp) gp = gp + ct.pg;
    if (kept_qg) ct.qg.store(kept_qg + i);
    if (HAS_GT && kept_pg) ct.pg.store(kept_pg + i);
  }
  const float sum_gq = hsum(gq), sum_gp = kSumGp ? hsum(gp) : 0.f;
  return {DIV == kJSD ? sum_gq + sum_gp : hsum(value), sum_gq, sum_gp};
}

// The mixture divergences' terms sweep, with the divergence picked once per stretch.
template <bool KEPT, bool HAS_GT, typename T>
RowTerms mixture_terms(int divergence, const T* s, const T* t, int64_t n, const RowState& row,
                       const Consts& c, const Kept& keep, const KeptFactors& f) {
  return with_mixture_divergence(divergence, [&](auto d) {
    return stretch_terms<decltype(d)::value, KEPT, HAS_GT>(s, t, n, row, c, keep, f);
  });
}

// The gradients of a stretch. label: the hard-label class's offset in the stretch, or -1.
// Mixture divergences read their kept terms, or (not KEPT) recompute them, picked per vector.
template <int KIND, bool HAS_GT, bool KEPT, typename T>
void stretch_grads(const T* s, const T* t, int64_t n, int64_t label, const RowState& row,
                   const Consts& c, int divergence, const Kept& keep, const KeptFactors& f,
                   T* gs, T* gt) {
  const ClassProbabilities<KEPT> pr(row, c, keep, f);
  const Vec vbeta(c.beta), zero(0.f);
  const float* const kept_qg = keep.qg;
  const float* const kept_pg = keep.pg;
  const RowTerms terms = row.terms;
  const TermCoefsT<float> k = row.k;
  // The student's gradient of kVec classes and their teacher gradient (with HAS_GT). For kl
  // without a teacher gradient the logits are dead and the compiler drops them.
  auto grads_at = [&](int64_t i, int64_t m, Vec& g_teacher) {
    const Vec sv = load_n(s + i, m, -INFINITY), tv = load_n(t + i, m, -INFINITY);
    const Vec log_q = pr.log_q(sv), log_p = pr.log_p(tv);
    const Vec q = pr.q(i, log_q), p = pr.p(i, log_p);
    ClassTerms<Vec> ct;
    if constexpr (KIND == kMixture && KEPT) {
      ct = {zero, Vec::loadu(kept_qg + i), HAS_GT ? Vec::loadu(kept_pg + i) : zero};
    } else {
      ct = kind_terms<KIND>(divergence, p, q, log_p, log_q, vbeta);
    }
    if constexpr (HAS_GT) g_teacher = grad_teacher_of(ct, p, terms, k);
    return grad_student_of(ct, q, pr.sigma(i, sv, q), terms, k);
  };
  Vec g_teacher;
  for (int64_t i = 0; i < n; i += kVec) {
    const int64_t m = std::min(kVec, n - i);
    const Vec g_student = grads_at(i, m, g_teacher);
    if (gs) {
      prefetch_for_write(gs + i);
      store_n(gs + i, g_student, m);
    }
    if constexpr (HAS_GT) {
      prefetch_for_write(gt + i);
      store_n(gt + i, g_teacher, m);
    }
  }
  if (gs && label >= 0 && label < n) {
    // the hard label's -1, in float before rounding: its vector once more
    const int64_t i = label / kVec * kVec, m = std::min(kVec, n - i);
    float lanes[kVec];
    grads_at(i, m, g_teacher).store(lanes);
    lanes[label - i] -= k.ce;
    store_n(gs + i, Vec::loadu(lanes), m);
  }
}

template <typename T>
void fill_span(T* p, int64_t n, float value) {
  if (p) std::fill(p, p + n, static_cast<T>(value));
}

// The row's loss (with its factors) and what its gradient sweep needs, from its merged
// statistics; false for a row that is NaN.
template <int KIND>
bool finish_stats(const RowStats& st, const LseT<float>& ce, const Consts& c, int64_t label,
                  RowState& row) {
  row.label = label;
  row.k = row_coefs(c.k, label >= 0);
  row.res = row_result(st);
  if (!row_is_finite(row.res)) return false;
  row.ce_max = row.res.max_x;
  row.ce_log_sum = row.res.log_sum_x;
  if (c.ce_separate) {
    row.ce_max = ce.max;
    row.ce_log_sum = std::log(ce.sum);
  }
  if constexpr (KIND != kMixture) row.terms = online_row_terms<KIND>(st, row.res);
  return true;
}

template <typename T>
float row_loss(const RowState& row, const T* s) {
  const float ce =
      row.label < 0 ? 0.f : (row.ce_max + row.ce_log_sum) - static_cast<float>(s[row.label]);
  return row.k.kd_loss * row.terms.value + row.k.ce * ce;
}

template <typename T>
struct RowPointers {
  const T* s;
  const T* t;
  T* gs;
  T* gt;
  RowPointers(const DenseProblem& p, int64_t offset)
      : s(static_cast<const T*>(p.student) + offset),
        t(static_cast<const T*>(p.teacher) + offset),
        gs(p.grad_student ? static_cast<T*>(p.grad_student) + offset : nullptr),
        gt(p.grad_teacher ? static_cast<T*>(p.grad_teacher) + offset : nullptr) {}
};

// Rows spread over threads; each row by stretches, everything kept in per-thread scratch.
template <int KIND, bool HAS_GT, typename T>
void dense_rows(const DenseProblem& p) {
  const Consts c(p);
  const int64_t cols = p.cols;
  const int64_t stretches = (cols + kStretch - 1) / kStretch;
  const int64_t grain = std::max<int64_t>(1, 16384 / cols);
  float* loss_rows = static_cast<float*>(p.loss_rows);
  const bool wants_grads = p.grad_student || p.grad_teacher;
  parallel_for_flushed(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    // Padded by a vector: a row's tail stores whole vectors.
    const int64_t len = cols + kVec;
    const bool mixture = KIND == kMixture && wants_grads;
    std::vector<float> scratch(len * (2 + (c.ce_separate ? 1 : 0) + (mixture ? 1 : 0) +
                                      (mixture && HAS_GT ? 1 : 0)));
    float* next = scratch.data();
    auto take = [&](bool wanted) {
      float* out = wanted ? next : nullptr;
      if (wanted) next += len;
      return out;
    };
    Kept keep;
    keep.ex = take(true);
    keep.ey = take(true);
    keep.es = take(c.ce_separate);
    keep.qg = take(mixture);
    keep.pg = take(mixture && HAS_GT);
    std::vector<StretchStats> stats(stretches);
    for (int64_t r = begin; r < end; ++r) {
      const RowPointers<T> rp(p, r * cols);
      if (p.mask && !p.mask[r]) {
        loss_rows[r] = 0.f;
        fill_span(rp.gs, cols, 0.f);
        fill_span(rp.gt, cols, 0.f);
        continue;
      }
      RowStats st = row_stats_empty();
      LseT<float> ce = lse_empty<float>();
      for (int64_t k = 0; k < stretches; ++k) {
        const int64_t at = k * kStretch, n = std::min(kStretch, cols - at);
        const Kept here{keep.ex + at, keep.ey + at, keep.es ? keep.es + at : nullptr, nullptr,
                        nullptr};
        stats[k] = stretch_stats<KIND>(rp.s + at, rp.t + at, n, c, here);
        if (stretches == 1) {  // the merge would only rescale by exp(0), through libm
          st = stats[k].st;
          ce = stats[k].ce;
        } else {
          st = row_stats_merge<KIND>(st, stats[k].st);
          ce = lse_merge(ce, stats[k].ce);
        }
      }
      RowState row;
      if (!finish_stats<KIND>(st, ce, c, c.label_of(p, r), row)) {
        loss_rows[r] = NAN;
        fill_span(rp.gs, cols, NAN);
        fill_span(rp.gt, cols, NAN);
        continue;
      }
      auto factors = [&](int64_t k) {
        return stretches == 1 ? whole_row_factors(stats[0], c) : kept_factors(stats[k], row, c);
      };
      auto stretch_kept = [&](int64_t k) {
        const int64_t at = k * kStretch;
        return Kept{keep.ex + at, keep.ey + at, keep.es ? keep.es + at : nullptr,
                    keep.qg ? keep.qg + at : nullptr, keep.pg ? keep.pg + at : nullptr};
      };
      if constexpr (KIND == kMixture) {
        row.terms = row_terms_empty<float>();
        for (int64_t k = 0; k < stretches; ++k) {
          const int64_t at = k * kStretch, n = std::min(kStretch, cols - at);
          row.terms = row_terms_merge(
              row.terms, mixture_terms<true, HAS_GT>(p.divergence, rp.s + at, rp.t + at, n, row,
                                                     c, stretch_kept(k), factors(k)));
        }
      }
      loss_rows[r] = row_loss(row, rp.s);
      if (!wants_grads) continue;
      for (int64_t k = 0; k < stretches; ++k) {
        const int64_t at = k * kStretch, n = std::min(kStretch, cols - at);
        stretch_grads<KIND, HAS_GT, true>(rp.s + at, rp.t + at, n, row.label - at, row, c,
                                          p.divergence, stretch_kept(k),
                                          factors(k),
                                         rp.gs ? rp.gs + at : nullptr,
                                         HAS_GT ? rp.gt + at : nullptr);
      }
    }
  });
}

// Fewer rows than threads: cut each row into chunks, one task each, in phases: statistics, then
// (mixture divergences) terms, then gradients; every phase recomputes its exps.
template <int KIND, bool HAS_GT, typename T>
void dense_split(const DenseProblem& p, int64_t chunks) {
  const Consts c(p);
  const int64_t cols = p.cols;
  const int64_t len = ((cols + chunks - 1) / chunks + kVec - 1) / kVec * kVec;
  chunks = (cols + len - 1) / len;
  const int64_t tasks = p.rows * chunks;
  float* loss_rows = static_cast<float*>(p.loss_rows);
  auto active = [&](int64_t r) { return !p.mask || p.mask[r]; };
  auto span = [&](int64_t task, int64_t& at, int64_t& n) {
    at = (task % chunks) * len;
    n = std::min(len, cols - at);
  };
  const Kept none{nullptr, nullptr, nullptr, nullptr, nullptr};
  const KeptFactors no_factors{0.f, 0.f, 0.f};

  std::vector<StretchStats> partial(tasks);
  parallel_for_flushed(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      if (!active(task / chunks)) continue;
      int64_t at, n;
      span(task, at, n);
      const RowPointers<T> rp(p, (task / chunks) * cols + at);
      StretchStats merged{row_stats_empty(), lse_empty<float>()};
      for (int64_t k = 0; k < n; k += kStretch) {
        const StretchStats part =
            stretch_stats<KIND>(rp.s + k, rp.t + k, std::min(kStretch, n - k), c, none);
        merged = {row_stats_merge<KIND>(merged.st, part.st), lse_merge(merged.ce, part.ce)};
      }
      partial[task] = merged;
    }
  });
  std::vector<RowState> rows(p.rows);
  std::vector<char> finite(p.rows, 0);
  for (int64_t r = 0; r < p.rows; ++r) {
    if (!active(r)) continue;
    RowStats st = row_stats_empty();
    LseT<float> ce = lse_empty<float>();
    for (int64_t k = 0; k < chunks; ++k) {
      st = row_stats_merge<KIND>(st, partial[r * chunks + k].st);
      ce = lse_merge(ce, partial[r * chunks + k].ce);
    }
    finite[r] = finish_stats<KIND>(st, ce, c, c.label_of(p, r), rows[r]);
  }
  if constexpr (KIND == kMixture) {
    std::vector<RowTerms> terms(tasks, row_terms_empty<float>());
    parallel_for_flushed(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        if (!active(task / chunks) || !finite[task / chunks]) continue;
        int64_t at, n;
        span(task, at, n);
        const RowPointers<T> rp(p, (task / chunks) * cols + at);
        terms[task] = mixture_terms<false, HAS_GT>(p.divergence, rp.s, rp.t, n,
                                                   rows[task / chunks], c, none, no_factors);
      }
    });
    for (int64_t r = 0; r < p.rows; ++r) {
      rows[r].terms = row_terms_empty<float>();
      for (int64_t k = 0; k < chunks; ++k) {
        rows[r].terms = row_terms_merge(rows[r].terms, terms[r * chunks + k]);
      }
    }
  }
  for (int64_t r = 0; r < p.rows; ++r) {
    loss_rows[r] = !active(r)   ? 0.f
                   : finite[r] ? row_loss(rows[r], RowPointers<T>(p, r * cols).s)
                               : NAN;
  }
  if (!p.grad_student && !p.grad_teacher) return;
  parallel_for_flushed(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / chunks;
      int64_t at, n;
      span(task, at, n);
      const RowPointers<T> rp(p, r * cols + at);
      if (!active(r) || !finite[r]) {
        fill_span(rp.gs, n, active(r) ? NAN : 0.f);
        fill_span(rp.gt, n, active(r) ? NAN : 0.f);
        continue;
      }
      stretch_grads<KIND, HAS_GT, false>(rp.s, rp.t, n, rows[r].label - at, rows[r], c,
                                         p.divergence, none, no_factors, rp.gs, rp.gt);
    }
  });
}

template <int KIND, bool HAS_GT, typename T>
void dense_vector_typed(const DenseProblem& p) {
  const int64_t threads = at::get_num_threads();
  const int64_t min_chunk = 4096;
  const int64_t chunks =
      std::min(threads / std::max<int64_t>(p.rows, 1) + 1, p.cols / min_chunk);
  if (p.rows < threads && chunks > 1) {
    dense_split<KIND, HAS_GT, T>(p, chunks);
  } else {
    dense_rows<KIND, HAS_GT, T>(p);
  }
}

}  // namespace

void dense_vector(const DenseProblem& p) {
  with_kind(p.divergence, [&](auto kind) {
    constexpr int KIND = decltype(kind)::value;
    KD_DISPATCH_FLOATING(p.dtype, "kd_loss_fwd", [&] {
      if (p.grad_teacher) {
        dense_vector_typed<KIND, true, scalar_t>(p);
      } else {
        dense_vector_typed<KIND, false, scalar_t>(p);
      }
    });
  });
}

}  // namespace cpu
KD_NAMESPACE_END
