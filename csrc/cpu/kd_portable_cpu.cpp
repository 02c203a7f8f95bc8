// The portable CPU kernel: each row through exactly the scalar functions of kd_math.h, with the
// row's statistics gathered in 32 strided "lanes" and merged pairwise, as a CUDA warp does, and
// templated on the divergence's kind as the CUDA kernels are. acc_t is float, as on the GPU,
// except for float64 inputs, computed in float64 for gradcheck. Tests compare it with the vector
// kernels; it is also the float64 path of kdplug::kd_loss_fwd. 16-bit inputs arrive here as
// float32 (the entry converts them, as the GPU converts each element on load).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include <c10/util/Exception.h>

#include "cpu/cpu_common.h"
#include "cpu/kd_cpu.h"

KD_NAMESPACE_BEGIN
namespace cpu {
namespace {

constexpr int kLanes = 32;

template <typename V, typename Merge>
V merge_lanes(V* lanes, Merge merge) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] = merge(lanes[l], lanes[l + width]);
  }
  return lanes[0];
}

template <typename T>
void fill_row(T* row, int64_t n, float value) {
  if (row) std::fill(row, row + n, static_cast<T>(value));
}

template <int KIND, typename T, typename acc_t>
void portable_rows(const DenseProblem& p) {
  const KernelConsts<acc_t> c(p);
  const int64_t cols = p.cols;
  const T* s_all = static_cast<const T*>(p.student);
  const T* t_all = static_cast<const T*>(p.teacher);
  T* gs_all = static_cast<T*>(p.grad_student);
  T* gt_all = static_cast<T*>(p.grad_teacher);
  acc_t* loss_rows = static_cast<acc_t*>(p.loss_rows);
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * cols;
      const T* s = s_all + off;
      const T* t = t_all + off;
      T* gs = gs_all ? gs_all + off : nullptr;
      T* gt = gt_all ? gt_all + off : nullptr;
      if (p.mask && !p.mask[r]) {
        loss_rows[r] = acc_t(0);
        fill_row(gs, cols, 0.f);
        fill_row(gt, cols, 0.f);
        continue;
      }
      RowStatsT<acc_t> lanes[kLanes];
      LseT<acc_t> ce_lanes[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        lanes[l] = row_stats_empty<acc_t>();
        ce_lanes[l] = lse_empty<acc_t>();
      }
      for (int64_t i = 0; i < cols; ++i) {
        row_stats_add<KIND>(lanes[i % kLanes], static_cast<acc_t>(s[i]) * c.inv_t,
                           static_cast<acc_t>(t[i]) * c.inv_t);
        if (c.ce_separate) lse_add(ce_lanes[i % kLanes], static_cast<acc_t>(s[i]));
      }
      const RowStatsT<acc_t> st = merge_lanes(lanes, row_stats_merge<KIND, acc_t>);
      const RowResultT<acc_t> res = row_result(st);
      if (!row_is_finite(res)) {
        loss_rows[r] = acc_t(NAN);
        fill_row(gs, cols, NAN);
        fill_row(gt, cols, NAN);
        continue;
      }
      RowTermsT<acc_t> terms;
      if constexpr (is_online_divergence(KIND)) {
        terms = online_row_terms<KIND>(st, res);
      } else {
        RowTermsT<acc_t> term_lanes[kLanes];
        for (int l = 0; l < kLanes; ++l) term_lanes[l] = row_terms_empty<acc_t>();
        for (int64_t i = 0; i < cols; ++i) {
          acc_t pi, qi;
          row_terms_add(term_lanes[i % kLanes],
                        class_terms_of<KIND>(p.divergence, static_cast<acc_t>(s[i]) * c.inv_t,
                                             static_cast<acc_t>(t[i]) * c.inv_t, res, c.beta,
                                             &pi, &qi));
        }
        terms = merge_lanes(term_lanes, row_terms_merge<acc_t>);
      }
      // The hard-label term's log-sum-exp at T = 1: the student's own, or lse(x) when T = 1.
      acc_t ce_max = res.max_x, ce_log_sum = res.log_sum_x;
      if (c.ce_separate) {
        const LseT<acc_t> ce = merge_lanes(ce_lanes, lse_merge<acc_t>);
        ce_max = ce.max;
        ce_log_sum = kd_log(ce.sum);
      }
      const int64_t label = c.label_of(p, r);
      const TermCoefsT<acc_t> k = row_coefs(c.k, label >= 0);
      const acc_t ce_value =
          label < 0 ? acc_t(0) : (ce_max + ce_log_sum) - static_cast<acc_t>(s[label]);
      loss_rows[r] = k.kd_loss * terms.value + k.ce * ce_value;
      if (!gs && !gt) continue;
      for (int64_t i = 0; i < cols; ++i) {
        acc_t pi, qi;
        const ClassTerms<acc_t> ct =
            class_terms_of<KIND>(p.divergence, static_cast<acc_t>(s[i]) * c.inv_t,
                                 static_cast<acc_t>(t[i]) * c.inv_t, res, c.beta, &pi, &qi);
        if (gs) {
          const acc_t sigma =
              c.ce_separate ? kd_exp((static_cast<acc_t>(s[i]) - ce_max) - ce_log_sum) : qi;
          acc_t g = grad_student_of(ct, qi, sigma, terms, k);
          if (i == label) g -= k.ce;
          gs[i] = static_cast<T>(g);
        }
        if (gt) gt[i] = static_cast<T>(grad_teacher_of(ct, pi, terms, k));
      }
    }
  });
}

}  // namespace

void dense_portable(const DenseProblem& p) {
  TORCH_CHECK(p.dtype == at::kFloat || p.dtype == at::kDouble,
              "dense_portable: float32 or float64 inputs");
  with_kind(p.divergence, [&](auto kind) {
    constexpr int KIND = decltype(kind)::value;
    if (p.dtype == at::kDouble) {
      portable_rows<KIND, double, double>(p);
    } else {
      portable_rows<KIND, float, float>(p);
    }
  });
}

}  // namespace cpu
KD_NAMESPACE_END
