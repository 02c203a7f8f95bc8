// The CPU kernel of kdplug::kd_loss_fwd for rows of at most kSmallClasses classes (CIFAR-10's
// 10, ImageNet-100's 100): a row is too short for its own vectors (a scalar loop per row would be
// all per-row overhead and scalar exps), so blocks of kVec rows are transposed into float scratch,
// class-major, and one vector lane holds one row. Every row statistic is then a lane-wise vector
// operation over the classes, with the per-class arithmetic of kd_math.h instantiated on vectors;
// the gradients are transposed back. A block's scratch (a few times kVec x C floats) stays in L1.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/cpu_common.h"
#include "cpu/kd_cpu.h"

KD_NAMESPACE_BEGIN
namespace cpu {
namespace {

using Consts = KernelConsts<float>;
constexpr int64_t R = kVec;  // rows per block

#if defined(CPU_CAPABILITY_AVX512)
// r[i][j] -> r[j][i] for a 16x16 float tile, in registers (unpacks, then 128-bit lane shuffles).
// Every loop here and in its callers is unrolled, so that the tiles stay in registers.
__attribute__((always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]),
                  c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 x0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44);
    const __m512 x1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    const __m512 x2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    const __m512 x3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_f32x4(x0, x2, 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(x0, x2, 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(x1, x3, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(x1, x3, 0xDD);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// Sixteen rows of ten classes are 160 contiguous floats: ten full vectors, which a network of 40
// two-source permutes turns class-major (and back), where the 16 x 16 transposes above take 16
// masked loads and ~58 shuffles (measured: the kernel ~10% faster at 8192 x 10). Write row r as
// 8g + 4a + 2d + e: its class c is at 80g + 40a + 20d + 10e + c. Stage 0 puts rows 8-15 (g = 1)
// in the upper 256 bits beside rows 0-7, so that everything after it works on both halves alike
// (on octets of 8 floats). Each of the three levels after it pairs vectors 5 apart, which hold
// the same classes 40, 20, then 10 floats apart (a, d, e), and deals each pair's 16 floats per
// half out into two vectors; after the third, vector c holds class c of rows 0-15 in order.
namespace ten {

// Which lane of which source (0: the first operand, 1: the second) lane l (0-7) of each half of
// a level's output `half` (0 or 1, the pair's two outputs) reads: the permute's index.
struct Source {
  int from, lane;
};

// Forward. h = 8o + l is lane l of octet o, h' = 4m + i of vector m after level 1, h'' = 2n + i
// after level 2.
//   level 1: Z[2o + half] lane 2i + a    = P[o + 5a]  lane 4 half + i
//   level 2: W[2m + half] lane 4i + 2d + a = Z[m + 5d] lane 2 (2 half + i) + a
//   level 3: class 2n + half, lane (row) 4a + 2d + e = W[n + 5e] lane 4 half + 2d + a
constexpr Source forward(int level, int half, int l) {
  const int b0 = l & 1, b1 = (l >> 1) & 1, b2 = l >> 2;
  return level == 1   ? Source{b0, 4 * half + (l >> 1)}
         : level == 2 ? Source{b1, 2 * (2 * half + b2) + b0}
                      : Source{b0, 4 * half + 2 * b1 + b2};
}

// Backward: the same equations read the other way, `half` now the bit (a, d, e) the output
// vector stands for, the pair's two inputs being the two `half`s of the forward level.
constexpr Source backward(int level, int half, int l) {
  const int b0 = l & 1, b1 = (l >> 1) & 1, b2 = l >> 2;
  return level == 1   ? Source{b2, 2 * (l & 3) + half}
         : level == 2 ? Source{b2, 4 * b1 + 2 * half + b0}
                      : Source{b2, 4 * b0 + 2 * b1 + half};
}

struct Indices {
  __m512i fwd[3][2], bwd[3][2];
  Indices() {
    for (int level = 1; level <= 3; ++level) {
      for (int half = 0; half < 2; ++half) {
        alignas(64) int32_t f[16], b[16];
        for (int lane = 0; lane < 16; ++lane) {
          const Source sf = forward(level, half, lane & 7), sb = backward(level, half, lane & 7);
          f[lane] = 16 * sf.from + (lane & 8) + sf.lane;  // (lane & 8): the same 256-bit half
          b[lane] = 16 * sb.from + (lane & 8) + sb.lane;
        }
        fwd[level - 1][half] = _mm512_load_si512(f);
        bwd[level - 1][half] = _mm512_load_si512(b);
      }
    }
  }
};

inline const Indices& indices() {
  static const Indices table;
  return table;
}

// One forward level: out[2i + half] from the pair in[i], in[i + 5].
__attribute__((always_inline)) inline void pairs_apart(const __m512 in[10],
                                                       const __m512i idx[2], __m512 out[10]) {
#pragma GCC unroll 5
  for (int i = 0; i < 5; ++i) {
    out[2 * i] = _mm512_permutex2var_ps(in[i], idx[0], in[i + 5]);
    out[2 * i + 1] = _mm512_permutex2var_ps(in[i], idx[1], in[i + 5]);
  }
}

// One backward level: out[i + 5 half] from the pair in[2i], in[2i + 1].
__attribute__((always_inline)) inline void pairs_adjacent(const __m512 in[10],
                                                          const __m512i idx[2], __m512 out[10]) {
#pragma GCC unroll 5
  for (int i = 0; i < 5; ++i) {
    out[i] = _mm512_permutex2var_ps(in[2 * i], idx[0], in[2 * i + 1]);
    out[i + 5] = _mm512_permutex2var_ps(in[2 * i], idx[1], in[2 * i + 1]);
  }
}

// v: 16 rows of 10 classes, row-major, in; class k of the 16 rows in v[k], out.
__attribute__((always_inline)) inline void to_classes(__m512 v[10]) {
  const Indices& ix = indices();
  __m512 p[10], q[10];
#pragma GCC unroll 10
  for (int o = 0; o < 10; ++o) {  // octet o of rows 0-7, beside octet o of rows 8-15
    p[o] = _mm512_shuffle_f32x4(v[o >> 1], v[(o >> 1) + 5], (o & 1) ? 0xEE : 0x44);
  }
  pairs_apart(p, ix.fwd[0], q);
  pairs_apart(q, ix.fwd[1], p);
  pairs_apart(p, ix.fwd[2], v);
}

// The inverse of to_classes.
__attribute__((always_inline)) inline void to_rows(__m512 v[10]) {
  const Indices& ix = indices();
  __m512 p[10], q[10];
  pairs_adjacent(v, ix.bwd[2], p);
  pairs_adjacent(p, ix.bwd[1], q);
  pairs_adjacent(q, ix.bwd[0], p);
#pragma GCC unroll 5
  for (int j = 0; j < 5; ++j) {
    v[j] = _mm512_shuffle_f32x4(p[2 * j], p[2 * j + 1], 0x44);
    v[j + 5] = _mm512_shuffle_f32x4(p[2 * j], p[2 * j + 1], 0xEE);
  }
}

}  // namespace ten
#endif

// A block of R rows (`rows`, each `cols` long) into class-major float dst[k * R + r]; returns each
// lane's maximum over the classes. Rows whose lane is off are never read: their lanes hold zeros
// (on == nullptr: every lane is on). float rows go by masked loads and 16x16 transposes (AVX-512;
// a full block of ten classes by ten::to_classes) or masked gathers (AVX2), 16-bit rows element
// by element.
template <int kClasses, typename T>
Vec block_in(const T* rows, int64_t cols, const bool* on, float* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kClasses == 10 && std::is_same_v<T, float>) {
    if (!on) {
      __m512 v[10];
#pragma GCC unroll 10
      for (int j = 0; j < 10; ++j) v[j] = _mm512_loadu_ps(rows + 16 * j);
      ten::to_classes(v);
#pragma GCC unroll 10
      for (int k = 0; k < 10; ++k) _mm512_storeu_ps(dst + k * R, v[k]);
      // the maxima by a tree of pairs: nine vmaxps, four deep
      const __m512 a = _mm512_max_ps(_mm512_max_ps(v[0], v[1]), _mm512_max_ps(v[2], v[3]));
      const __m512 b = _mm512_max_ps(_mm512_max_ps(v[4], v[5]), _mm512_max_ps(v[6], v[7]));
      return Vec(_mm512_max_ps(_mm512_max_ps(a, b), _mm512_max_ps(v[8], v[9])));
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    // 16 classes at a time: each row's stretch by a masked load (contiguous, and lanes past the
    // row never touch memory), then one in-register transpose; several times cheaper than one
    // gather per class, which loads each element on its own. The maxima are taken from the tile
    // in registers, by vmaxps, which may pass over a NaN: the exps of the sums carry it still.
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t k0 = 0; k0 < cols; k0 += 16) {
      const __mmask16 cmask = first_lanes(cols - k0);
      const int64_t nk = std::min<int64_t>(16, cols - k0);
      __m512 tile[16];
      const T* row = rows + k0;  // stepped, not indexed: 16 row addresses would spill registers
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r, row += cols) {
        tile[r] = _mm512_maskz_loadu_ps(!on || on[r] ? cmask : 0, row);
      }
      transpose16(tile);
#pragma GCC unroll 16
      for (int k = 0; k < 16; ++k) {
        if (k < nk) _mm512_storeu_ps(dst + (k0 + k) * R, tile[k]);
      }
      // The tile's maximum by a tree of pairs: a chain of nk dependent vmaxps (4 cycles each)
      // was ~40% of this function's time at 10 classes. Classes past the row repeat class 0.
#pragma GCC unroll 16
      for (int k = 0; k < 16; ++k) {
        if (k >= nk) tile[k] = tile[0];
      }
#pragma GCC unroll 4
      for (int width = 8; width >= 1; width /= 2) {
#pragma GCC unroll 8
        for (int k = 0; k < width; ++k) tile[k] = _mm512_max_ps(tile[k], tile[k + width]);
      }
      vmax = _mm512_max_ps(vmax, tile[0]);
    }
    return Vec(vmax);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    // (at::vec::mask_gather is not used: its AVX-512 version compares the all-ones mask, a NaN,
    // for equality and so never loads anything.)
    int32_t index[R], bits[R];
    for (int64_t r = 0; r < R; ++r) {
      index[r] = static_cast<int32_t>(r * cols);
      bits[r] = !on || on[r] ? -1 : 0;
    }
    const __m256i vindex = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(index));
    const __m256 mask = _mm256_castsi256_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits)));
    Vec vmax(-INFINITY);
    for (int64_t k = 0; k < cols; ++k) {
      const Vec v = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), rows + k, vindex, mask, 4);
      v.store(dst + k * R);
      vmax = at::vec::maximum(vmax, v);
    }
    return vmax;
  }
#endif
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t k = 0; k < cols; ++k) {
      dst[k * R + r] = !on || on[r] ? static_cast<float>(rows[r * cols + k]) : 0.f;
    }
  }
  Vec vmax(-INFINITY);
  for (int64_t k = 0; k < cols; ++k) vmax = at::vec::maximum(vmax, Vec::loadu(dst + k * R));
  return vmax;
}

// The inverse for the lanes that are on (on == nullptr: all): class-major src back into the
// rows. float rows go by 16x16 transposes (AVX-512) or gathers from src (AVX2: strided loads from
// L1), then contiguous masked stores, several times cheaper than scatters into the rows.
template <int kClasses, typename T>
void block_out(const float* src, int64_t cols, const bool* on, T* rows) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kClasses == 10 && std::is_same_v<T, float>) {
    if (!on) {
      __m512 v[10];
#pragma GCC unroll 10
      for (int k = 0; k < 10; ++k) v[k] = _mm512_loadu_ps(src + k * R);
      ten::to_rows(v);
#pragma GCC unroll 10
      for (int j = 0; j < 10; ++j) _mm512_storeu_ps(rows + 16 * j, v[j]);
      return;
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t k0 = 0; k0 < cols; k0 += 16) {
      const int64_t nk = std::min<int64_t>(16, cols - k0);
      __m512 tile[16];
#pragma GCC unroll 16
      for (int k = 0; k < 16; ++k) {
        tile[k] = k < nk ? _mm512_loadu_ps(src + (k0 + k) * R) : _mm512_setzero_ps();
      }
      transpose16(tile);
      const __mmask16 cmask = first_lanes(nk);
      T* row = rows + k0;
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r, row += cols) {
        _mm512_mask_storeu_ps(row, !on || on[r] ? cmask : 0, tile[r]);
      }
    }
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t r = 0; r < R; ++r) {
      if (on && !on[r]) continue;
      for (int64_t k = 0; k < cols; k += 8) {
        const __m256i classes = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(k)));
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols)),
                                                classes);
        const __m256i index = _mm256_add_epi32(
            _mm256_mullo_epi32(classes, _mm256_set1_epi32(static_cast<int>(R))),
            _mm256_set1_epi32(static_cast<int>(r)));
        const __m256 v = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), src, index,
                                                  _mm256_castsi256_ps(mask), 4);
        _mm256_maskstore_ps(rows + r * cols + k, mask, v);
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < R; ++r) {
    if (on && !on[r]) continue;
    for (int64_t k = 0; k < cols; ++k) rows[r * cols + k] = static_cast<T>(src[k * R + r]);
  }
}

// Σφ, Gq, Gp of a block's rows for a mixture divergence, keeping each class's terms.
template <int DIV>
RowTermsT<Vec> block_terms(int64_t cols, const float* bs, const float* bt, const float* ex,
                           const float* ey, const Vec& fq, const Vec& fp,
                           const RowResultT<Vec>& res, const Consts& c, float* qg, float* pg) {
  const Vec vinv(c.inv_t), vbeta(c.beta), zero(0.f);
  // the mixture's weights folded into the factors, a multiply a class less each
  const MixtureWeights<float> w = mixture_weights<DIV>(c.beta);
  const Vec weighted_fp = fp * Vec(w.p), weighted_fq = fq * Vec(w.q);
  RowTermsT<Vec> terms{zero, zero, zero};
  for (int64_t k = 0; k < cols; ++k) {
    const Vec x = Vec::loadu(bs + k * R) * vinv, y = Vec::loadu(bt + k * R) * vinv;
    const Vec kept_x = Vec::loadu(ex + k * R), kept_y = Vec::loadu(ey + k * R);
    const ClassTerms<Vec> ct = weighted_divergence_terms<DIV>(
        kept_y * fp, kept_x * fq, kept_y * weighted_fp, kept_x * weighted_fq, log_p_of(y, res),
        log_q_of(x, res), vbeta);
    terms.value = terms.value + ct.value;
    terms.gq = terms.gq + ct.qg;
    terms.gp = terms.gp + ct.pg;
    ct.qg.store(qg + k * R);
    ct.pg.store(pg + k * R);
  }
  return terms;
}

// kClasses: the row length when known at compile time, else 0 (p.cols).
template <int KIND, bool HAS_GT, typename T, int kClasses>
void small_blocks(const DenseProblem& p) {
  const Consts c(p);
  const int64_t cols = kClasses ? kClasses : p.cols;
  const int64_t blocks = (p.rows + R - 1) / R;
  const int64_t grain = std::max<int64_t>(1, 2048 / (R * cols));
  const T* s_all = static_cast<const T*>(p.student);
  const T* t_all = static_cast<const T*>(p.teacher);
  T* gs_all = static_cast<T*>(p.grad_student);
  T* gt_all = static_cast<T*>(p.grad_teacher);
  float* loss_rows = static_cast<float*>(p.loss_rows);
  constexpr bool mixture = KIND == kMixture;
  parallel_for_flushed(0, blocks, grain, [&](int64_t begin, int64_t end) {
    const int64_t plane = cols * R;  // one class-major [cols][R] array
    std::vector<float> scratch(plane * 8);
    float* bs = scratch.data();  // student logits
    float* bt = bs + plane;      // teacher logits
    float* ex = bt + plane;      // exp(x - max_x)
    float* ey = ex + plane;      // exp(y - max_y)
    float* es = ey + plane;      // exp(s - max_s), the hard-label term's own softmax (T != 1)
    float* qg = es + plane;      // mixture divergences' q dphi/dq
    float* pg = qg + plane;      // ... and p dphi/dp
    float* gb = pg + plane;      // the gradient being built (student, then teacher)
    const Vec vinv(c.inv_t), vbeta(c.beta), zero(0.f);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * R;
      const int64_t nr = std::min(R, p.rows - r0);
      // The common block, R rows that all count, skips the per-row bookkeeping below.
      const bool full = nr == R && !p.mask;
      bool counted[R];
      int64_t label[R];
      for (int64_t r = 0; r < R; ++r) {
        counted[r] = full || (r < nr && (!p.mask || p.mask[r0 + r]));
        label[r] = c.with_ce && counted[r] ? c.label_of(p, r0 + r) : -1;
      }
      // The gradient's lines a page past this block's, asked for now (prefetch_for_write): they
      // arrive while this block and the next compute.
      for (int64_t b = 0; b < R * cols * static_cast<int64_t>(sizeof(T)); b += 64) {
        if (gs_all) prefetch_for_write(reinterpret_cast<char*>(gs_all + r0 * cols) + b);
        if (gt_all) prefetch_for_write(reinterpret_cast<char*>(gt_all + r0 * cols) + b);
      }
      // rows that do not count are never read: their lanes compute on zeros
      const bool* on = full ? nullptr : counted;
      const Vec vmax_s = block_in<kClasses>(s_all + r0 * cols, cols, on, bs);
      const Vec vmax_t = block_in<kClasses>(t_all + r0 * cols, cols, on, bt);
      RowStatsT<Vec> st{vmax_s * vinv, zero, vmax_t * vinv, zero, zero};
      Vec sum_s(0.f);
      // The per-class work of the whole kernel is here (two exps per class), so it is kept
      // lean: x - max_x as one FMA of the logit (rounded once), the exps' arguments clamped
      // below here (they are <= 0, so no upper clamp), and kl's and reverse kl's cross term
      // taken against the maxima, as sum e_y (dy - dx), which the maxima cancel out of below.
      const Vec lowest(-104.f);
      for (int64_t k = 0; k < cols; ++k) {
        const Vec sv = Vec::loadu(bs + k * R);
        const Vec dx = at::vec::fmsub(sv, vinv, st.max_x);
        const Vec dy = at::vec::fmsub(Vec::loadu(bt + k * R), vinv, st.max_y);
        const Vec exv = exp_in_range(clamp_low(lowest, dx));
        const Vec eyv = exp_in_range(clamp_low(lowest, dy));
        st.sum_x = st.sum_x + exv;
        st.sum_y = st.sum_y + eyv;
        if constexpr (KIND == kKL) st.cross = add_weighted(st.cross, eyv, dy - dx);
        if constexpr (KIND == kReverseKL) st.cross = add_weighted(st.cross, exv, dx - dy);
        exv.store(ex + k * R);
        eyv.store(ey + k * R);
        if (c.ce_separate) {
          const Vec esv = fast_exp(sv - vmax_s);
          sum_s = sum_s + esv;
          esv.store(es + k * R);
        }
      }
      const RowResultT<Vec> res{st.max_x, fast_log(st.sum_x), st.max_y, fast_log(st.sum_y)};
      const Vec fq = Vec(1.f) / st.sum_x, fp = Vec(1.f) / st.sum_y;
      RowTermsT<Vec> terms;
      if constexpr (mixture) {
        terms = with_mixture_divergence(p.divergence, [&](auto d) {
          return block_terms<decltype(d)::value>(cols, bs, bt, ex, ey, fq, fp, res, c, qg, pg);
        });
      } else {
        // (the cross term is relative to the maxima: so are the log-sum-exps it meets)
        terms = online_row_terms<KIND>(st, {zero, res.log_sum_x, zero, res.log_sum_y});
      }
      // The hard-label term's log-sum-exp at T = 1 and its value per lane.
      const Vec ce_max = c.ce_separate ? vmax_s : res.max_x;
      const Vec ce_log_sum = c.ce_separate ? fast_log(sum_s) : res.log_sum_x;
      const Vec fs = c.ce_separate ? Vec(1.f) / sum_s : fq;
      // Each lane's coefficients: no hard-label term where the row's label does not count
      // (without labels, none anywhere: the per-row loops below are skipped).
      float lane_ce[R] = {}, lane_coef[R] = {};
      if (c.with_ce) {
        float s_label[R];
        for (int64_t r = 0; r < R; ++r) s_label[r] = label[r] < 0 ? 0.f : bs[label[r] * R + r];
        ((ce_max + ce_log_sum) - Vec::loadu(s_label)).store(lane_ce);
        for (int64_t r = 0; r < R; ++r) {
          lane_ce[r] = label[r] < 0 ? 0.f : lane_ce[r];
          lane_coef[r] = label[r] < 0 ? 0.f : c.k.ce;
        }
      }
      const TermCoefsT<Vec> coefs{Vec(c.k.kd_loss), Vec(c.k.kd_grad), Vec::loadu(lane_coef)};
      const Vec loss = coefs.kd_loss * terms.value + coefs.ce * Vec::loadu(lane_ce);
      // 0 in a lane whose four statistics are finite, NaN otherwise (0 * inf and 0 * NaN are NaN)
      const Vec nonfinite =
          res.max_x * zero + res.max_y * zero + res.log_sum_x * zero + res.log_sum_y * zero;
      const bool all_good = full && nonfinite.zero_mask() == (1 << Vec::size()) - 1;
      bool good[R];
      if (all_good) {
        loss.store(loss_rows + r0);
      } else {
        float lane_loss[R], lane_nonfinite[R];
        loss.store(lane_loss);
        nonfinite.store(lane_nonfinite);
        for (int64_t r = 0; r < R; ++r) {
          const bool finite = lane_nonfinite[r] == 0.f;
          good[r] = counted[r] && finite;
          if (r < nr) loss_rows[r0 + r] = !counted[r] ? 0.f : finite ? lane_loss[r] : NAN;
        }
      }
      if (!gs_all && !gt_all) continue;

      // Gradients, class-major, then transposed back into each row.
      auto write_rows = [&](T* out_all) {
        if (all_good) {
          block_out<kClasses>(gb, cols, nullptr, out_all + r0 * cols);
          return;
        }
        for (int64_t r = 0; r < nr; ++r) {
          if (good[r]) continue;
          T* out = out_all + (r0 + r) * cols;
          std::fill(out, out + cols, static_cast<T>(counted[r] ? NAN : 0.f));
        }
        block_out<kClasses>(gb, cols, good, out_all + r0 * cols);
      };
      auto class_terms = [&](int64_t k, const Vec& p_k, const Vec& q_k) {
        if constexpr (mixture) {
          return ClassTerms<Vec>{zero, Vec::loadu(qg + k * R), Vec::loadu(pg + k * R)};
        } else {
          const Vec x = Vec::loadu(bs + k * R) * vinv, y = Vec::loadu(bt + k * R) * vinv;
          return divergence_terms<KIND>(p_k, q_k, log_p_of(y, res), log_q_of(x, res), vbeta);
        }
      };
      if (gs_all) {
        for (int64_t j = 0; j < cols; ++j) {
          const Vec q_k = Vec::loadu(ex + j * R) * fq, p_k = Vec::loadu(ey + j * R) * fp;
          const Vec sigma = c.ce_separate ? Vec::loadu(es + j * R) * fs : q_k;
          grad_student_of(class_terms(j, p_k, q_k), q_k, sigma, terms, coefs).store(gb + j * R);
        }
        if (c.with_ce) {
          for (int64_t r = 0; r < R; ++r) {
            if (label[r] >= 0) gb[label[r] * R + r] -= c.k.ce;
          }
        }
        write_rows(gs_all);
      }
      if constexpr (HAS_GT) {
        for (int64_t j = 0; j < cols; ++j) {
          const Vec q_k = Vec::loadu(ex + j * R) * fq, p_k = Vec::loadu(ey + j * R) * fp;
          grad_teacher_of(class_terms(j, p_k, q_k), p_k, terms, coefs).store(gb + j * R);
        }
        write_rows(gt_all);
      }
    }
  });
}

}  // namespace

void dense_small(const DenseProblem& p) {
  with_kind(p.divergence, [&](auto kind) {
    constexpr int KIND = decltype(kind)::value;
    KD_DISPATCH_FLOATING(p.dtype, "kd_loss_fwd", [&] {
      auto run = [&](auto classes) {
        constexpr int kClasses = decltype(classes)::value;
        if (p.grad_teacher) {
          small_blocks<KIND, true, scalar_t, kClasses>(p);
        } else {
          small_blocks<KIND, false, scalar_t, kClasses>(p);
        }
      };
      // Ten classes (CIFAR-10, MNIST, SVHN: the commonest short rows) get loops compiled for
      // that count: the unrolled transposes lose their unused lanes and the loops their
      // bookkeeping (~8% of the kernel at 8192 x 10).
      if (p.cols == 10) {
        run(std::integral_constant<int, 10>{});
      } else {
        run(std::integral_constant<int, 0>{});
      }
    });
  });
}

}  // namespace cpu
KD_NAMESPACE_END
