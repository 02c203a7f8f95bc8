// Host-side, lane-by-lane run of the CUDA kd_loss_fwd kernel's thread layouts (issue #17 item 14).
//
// Compiled by tests/test_cuda_lanes.py with the host C++ compiler against CUDA's headers (where
// __host__/__device__ are empty): kd_loss_thread.cuh's per-thread functions run unchanged for every
// lane, and the cross-thread reductions of kd_loss_kernel.cu (butterflies of __shfl_xor_sync over
// a group or a warp, the block's merge of per-warp results through shared memory, the split path's
// per-chunk partials merged by every warp in a fixed order) are replayed here with the same lane
// pairing and the same argument order of each merge. Keep them in step with kd_loss_kernel.cu.
//
// Usage: cuda_lane_sim DTYPE ROWS COLS BASE DIV T BETA ALPHA PATH SPLITS SMS FLAGS IN OUT
//   DTYPE 0 fp32, 1 fp16, 2 bf16; BASE: elements by which every array starts past a 16-byte
//   boundary; DIV: kd_math.h's divergence code; PATH 0 auto, 1 group, 2 block, 3 split; SPLITS
//   forced splits (0: the plan's); FLAGS bit 0 labels, bit 1 mask, bit 2 teacher gradient.
//   IN: float32 s[ROWS*COLS], float32 t[ROWS*COLS], int64 labels[ROWS], uint8 mask[ROWS].
//   OUT: int64 path, threads, group, splits, chunk; float32 loss[ROWS], grad_s[ROWS*COLS],
//   grad_t[ROWS*COLS] (NaN where not written); int64 fault record (kd_faults.h: code, op, row,
//   value, cols, ignore_index).
// Exit status 0; 2 on bad usage; 3 when a write landed outside the arrays; 4 when a segment
// does not cover its range or its 16-byte vectors are misaligned.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "cuda/kd_loss_cuda.h"
#include "cuda/kd_loss_thread.cuh"

using namespace kdplug;
using namespace kdplug::kd_cuda;

namespace {

constexpr int kWarp = 32;
constexpr size_t kGuardBytes = 64;
constexpr unsigned char kGuardByte = 0xA5;

// kd_loss_kernel.cu's KdMergeStats / KdMergeTerms (device-only there).
template <int KIND>
struct MergeStats {
  KdStats operator()(const KdStats& a, const KdStats& b) const {
    return kd_stats_merge<KIND>(a, b);
  }
  static KdStats empty() { return kd_stats_empty(); }
};

struct MergeTerms {
  RowTermsT<float> operator()(const RowTermsT<float>& a, const RowTermsT<float>& b) const {
    return row_terms_merge(a, b);
  }
  static RowTermsT<float> empty() { return row_terms_empty<float>(); }
};

// kd_group_reduce<G> over every aligned group of G lanes of v: at each step every lane merges its
// own value (first argument) with that of lane ^ off (__shfl_xor_sync: read before any lane
// writes).
template <typename S, typename M>
void group_reduce(std::vector<S>& v, int g, M merge) {
  for (int off = g / 2; off > 0; off >>= 1) {
    const std::vector<S> before = v;
    for (size_t lane = 0; lane < v.size(); ++lane) {
      v[lane] = merge(before[lane], before[lane ^ off]);
    }
  }
}

// kd_group_allreduce<G>: the butterfly, then every lane takes its group's lane 0 (__shfl_sync).
template <typename S, typename M>
void group_allreduce(std::vector<S>& v, int g, M merge) {
  group_reduce(v, g, merge);
  for (size_t lane = 0; lane < v.size(); ++lane) v[lane] = v[lane - lane % g];
}

// kd_block_reduce<THREADS>: a butterfly per warp, lane 0 of each warp to warp_sh, then warp 0
// merges warp_sh (empty beyond the warps) by one more butterfly; thread 0's value.
template <typename S, typename M>
S block_reduce(std::vector<S> v, M merge) {
  const int warps = static_cast<int>(v.size()) / kWarp;
  group_reduce(v, kWarp, merge);
  std::vector<S> warp0(kWarp);
  for (int lane = 0; lane < kWarp; ++lane) {
    warp0[lane] = lane < warps ? v[lane * kWarp] : M::empty();
  }
  group_reduce(warp0, kWarp, merge);
  return warp0[0];
}

// kd_warp_merge_partials: lane l merges partials l, l+32, ... from empty, then a warp allreduce.
template <typename S, typename M>
S warp_merge_partials(const S* partials, int n, M merge) {
  std::vector<S> v(kWarp, M::empty());
  for (int lane = 0; lane < kWarp; ++lane) {
    for (int i = lane; i < n; i += kWarp) v[lane] = merge(v[lane], partials[i]);
  }
  group_allreduce(v, kWarp, merge);
  return v[0];
}

// The host's memcpy loads would not fault where the GPU's 16-byte loads do: check every segment
// the kernel cuts is whole (head + vectors + tail = the range, head and tail < VEC) and that its
// vectors start on a 16-byte boundary in all four arrays (exit status 4 otherwise).
bool g_segments_ok = true;

template <typename T, int VEC>
void check_segment(const KdSegment& g, int begin, int end, const T* s, const T* t, const T* gs,
                   const T* gt) {
  const bool whole = g.head_begin == begin && g.body_begin == begin + g.head &&
                     g.tail_begin == g.body_begin + g.nvec * VEC && g.tail_begin + g.tail == end &&
                     g.head >= 0 && g.nvec >= 0 && g.tail >= 0 &&
                     (VEC == 1 || (g.head < VEC && g.tail < VEC));
  auto aligned = [&](const T* p) {
    return p == nullptr || g.nvec == 0 ||
           (reinterpret_cast<uintptr_t>(p + g.body_begin) & 15u) == 0;
  };
  if (!whole || !aligned(s) || !aligned(t) || !aligned(gs) || !aligned(gt)) g_segments_ok = false;
}

// An array of n elements of T starting `base` elements past a 16-byte boundary, between guard
// bytes.
template <typename T>
struct Guarded {
  std::vector<unsigned char> raw;
  T* data;
  size_t n;
  Guarded(size_t count, int base)
      : raw(count * sizeof(T) + 2 * kGuardBytes + 32, kGuardByte), n(count) {
    uintptr_t p = reinterpret_cast<uintptr_t>(raw.data()) + kGuardBytes;
    p = (p + 15) & ~uintptr_t(15);
    data = reinterpret_cast<T*>(p) + base;
  }
  bool guards_intact() const {
    const unsigned char* first = reinterpret_cast<const unsigned char*>(data);
    const unsigned char* last = reinterpret_cast<const unsigned char*>(data + n);
    const unsigned char* end = raw.data() + raw.size();
    for (const unsigned char* c = raw.data(); c < end; ++c) {
      if ((c < first || c >= last) && *c != kGuardByte) return false;
    }
    return true;
  }
};

struct Problem {
  int64_t rows, cols;
  int base, divergence, path, splits, sms, flags;
  double temperature, beta, alpha;
  std::vector<float> s, t;
  std::vector<int64_t> labels;
  std::vector<unsigned char> mask;
};

constexpr int64_t kIgnoreIndex = -100;

template <typename T>
struct Arrays {
  Guarded<T> s, t, gs, gt;
  float* loss;
  const int64_t* labels;
  const unsigned char* mask;
  bool grad_teacher;
  KdFaultRecord fault;  // kd_faults.h's record, written as the kernels write it
};

// kd_thread_fill by every thread: a masked (0) or NaN row's gradients over segment g.
template <typename T, int VEC>
void fill_lanes(T* gs, T* gt, const KdSegment& g, int nthreads, float value) {
  for (int lane = 0; lane < nthreads; ++lane) {
    kd_thread_fill<T, VEC>(gs, gt, g, lane, nthreads, value);
  }
}

template <int KIND>
struct RowContext {
  KdParams p;
  TermCoefsT<float> coefs;
};

// The row's lanes: statistics (merged by `reduce`, every lane the same value), KdRow, the mixture
// terms, gradients and loss, as the group and block kernels do for one row.
template <typename T, int VEC, int KIND, typename Reduce>
void run_row(Arrays<T>& a, int64_t row, int cols, int nthreads, const RowContext<KIND>& c,
             Reduce reduce) {
  const int64_t off = row * cols;
  const T* s = a.s.data + off;
  const T* t = a.t.data + off;
  T* gs = a.gs.data + off;
  T* gt = a.grad_teacher ? a.gt.data + off : nullptr;
  const KdSegment seg = kd_segment<T, VEC>(s, 0, cols);
  check_segment<T, VEC>(seg, 0, cols, s, t, gs, gt);
  if (a.mask != nullptr && !a.mask[row]) {
    fill_lanes<T, VEC>(gs, gt, seg, nthreads, 0.f);
    a.loss[row] = 0.f;
    return;
  }
  std::vector<KdStats> st(nthreads);
  for (int lane = 0; lane < nthreads; ++lane) {
    st[lane] = kd_thread_stats<KIND, T, VEC>(s, t, seg, lane, nthreads, c.p);
  }
  const KdStats merged = reduce(st, MergeStats<KIND>());
  const int label = kd_label_of(a.labels, row, kIgnoreIndex, cols);
  KdRow r;
  if (!kd_row_begin<KIND>(merged, c.p, c.coefs, label, r)) {
    fill_lanes<T, VEC>(gs, gt, seg, nthreads, NAN);
    a.loss[row] = NAN;
    kd_note_label_fault(&a.fault, a.labels, row, label, kIgnoreIndex, cols);
    return;
  }
  if constexpr (KIND == kMixture) {
    std::vector<RowTermsT<float>> terms(nthreads);
    for (int lane = 0; lane < nthreads; ++lane) {
      terms[lane] = kd_thread_terms<T, VEC>(s, t, seg, lane, nthreads, c.p, r.res);
    }
    r.terms = reduce(terms, MergeTerms());
  }
  for (int lane = 0; lane < nthreads; ++lane) {
    kd_thread_grads<KIND, T, VEC>(s, t, gs, gt, seg, lane, nthreads, c.p, r);
  }
  a.loss[row] = kd_row_loss(r, s);
}

// kd_split_*_kernel: block (row, split) of kSplitThreads over [split*chunk, min(.., cols)).
template <typename T, int VEC, int KIND>
void run_split(Arrays<T>& a, int64_t rows, int cols, int splits, int chunk,
               const RowContext<KIND>& c) {
  std::vector<KdStats> stats(rows * splits);
  std::vector<RowTermsT<float>> terms(rows * splits);
  auto seg_of = [&](const T* row_s, int split) {
    const int begin = split * chunk;
    const int end = begin + chunk < cols ? begin + chunk : cols;
    const KdSegment seg = kd_segment<T, VEC>(row_s, begin, end);
    const int64_t off = row_s - a.s.data;
    check_segment<T, VEC>(seg, begin, end, row_s, a.t.data + off, a.gs.data + off, a.gt.data + off);
    return seg;
  };
  auto counts = [&](int64_t row) { return a.mask == nullptr || a.mask[row]; };
  auto row_stats_of = [&](int64_t row) {  // kd_warp_merge_partials of the row's chunks
    return warp_merge_partials(stats.data() + row * splits, splits, MergeStats<KIND>());
  };
  for (int64_t row = 0; row < rows; ++row) {  // kd_split_stats_kernel
    if (!counts(row)) continue;
    const T* s = a.s.data + row * cols;
    const T* t = a.t.data + row * cols;
    for (int split = 0; split < splits; ++split) {
      const KdSegment seg = seg_of(s, split);
      std::vector<KdStats> st(kSplitThreads);
      for (int tid = 0; tid < kSplitThreads; ++tid) {
        st[tid] = kd_thread_stats<KIND, T, VEC>(s, t, seg, tid, kSplitThreads, c.p);
      }
      stats[row * splits + split] = block_reduce(st, MergeStats<KIND>());
    }
  }
  if constexpr (KIND == kMixture) {  // kd_split_terms_kernel
    for (int64_t row = 0; row < rows; ++row) {
      if (!counts(row)) continue;
      const T* s = a.s.data + row * cols;
      const T* t = a.t.data + row * cols;
      const KdStats st = row_stats_of(row);
      const RowResult res = row_result(st.st);
      for (int split = 0; split < splits; ++split) {
        const KdSegment seg = seg_of(s, split);
        std::vector<RowTermsT<float>> part(kSplitThreads);
        for (int tid = 0; tid < kSplitThreads; ++tid) {
          part[tid] = kd_thread_terms<T, VEC>(s, t, seg, tid, kSplitThreads, c.p, res);
        }
        terms[row * splits + split] = block_reduce(part, MergeTerms());
      }
    }
  }
  for (int64_t row = rows - 1; row >= 0; --row) {  // kd_split_grads_kernel (reverse block order)
    const T* s = a.s.data + row * cols;
    const T* t = a.t.data + row * cols;
    T* gs = a.gs.data + row * cols;
    T* gt = a.grad_teacher ? a.gt.data + row * cols : nullptr;
    for (int split = splits - 1; split >= 0; --split) {
      const KdSegment seg = seg_of(s, split);
      if (!counts(row)) {
        fill_lanes<T, VEC>(gs, gt, seg, kSplitThreads, 0.f);
        if (split == 0) a.loss[row] = 0.f;
        continue;
      }
      const KdStats st = row_stats_of(row);
      KdRow r;
      const int label = kd_label_of(a.labels, row, kIgnoreIndex, cols);
      if (!kd_row_begin<KIND>(st, c.p, c.coefs, label, r)) {
        fill_lanes<T, VEC>(gs, gt, seg, kSplitThreads, NAN);
        if (split == 0) {
          a.loss[row] = NAN;
          kd_note_label_fault(&a.fault, a.labels, row, label, kIgnoreIndex, cols);
        }
        continue;
      }
      if constexpr (KIND == kMixture) {
        r.terms = warp_merge_partials(terms.data() + row * splits, splits, MergeTerms());
      }
      for (int tid = 0; tid < kSplitThreads; ++tid) {
        kd_thread_grads<KIND, T, VEC>(s, t, gs, gt, seg, tid, kSplitThreads, c.p, r);
      }
      if (split == 0) a.loss[row] = kd_row_loss(r, s);
    }
  }
}

template <typename T, int KIND>
int run_kind(const Problem& pr, const KdPlan& plan, FILE* out) {
  constexpr int VEC = 16 / sizeof(T);
  const size_t n = static_cast<size_t>(pr.rows * pr.cols);
  Arrays<T> a{Guarded<T>(n, pr.base), Guarded<T>(n, pr.base), Guarded<T>(n, pr.base),
              Guarded<T>(n, pr.base), nullptr, nullptr, nullptr, (pr.flags & 4) != 0,
              KdFaultRecord{kFaultNone, 0, 0, 0, 0, 0}};
  for (size_t i = 0; i < n; ++i) {
    a.s.data[i] = KdElem<T>::from_float(pr.s[i]);
    a.t.data[i] = KdElem<T>::from_float(pr.t[i]);
    a.gs.data[i] = KdElem<T>::from_float(NAN);  // unwritten elements stay NaN
    a.gt.data[i] = KdElem<T>::from_float(NAN);
  }
  std::vector<float> loss(pr.rows, NAN);
  a.loss = loss.data();
  if (pr.flags & 1) a.labels = pr.labels.data();
  if (pr.flags & 2) a.mask = pr.mask.data();

  // kd_launch_typed's parameters; the scales of reduction='none' are (1, 1).
  RowContext<KIND> c;
  c.p.inv_t = static_cast<float>(1.0 / pr.temperature);
  c.p.beta = static_cast<float>(pr.beta);
  c.p.divergence = pr.divergence;
  c.p.ce_separate = a.labels != nullptr && pr.temperature != 1.0;
  const double alpha = a.labels != nullptr ? pr.alpha : 1.0;
  const float scale = 1.f;
  c.coefs = term_coefs<float>(pr.temperature, alpha, scale, scale);

  const int cols = static_cast<int>(pr.cols);
  switch (plan.path) {
    case KdPath::kGroup: {
      const int g = plan.group;
      for (int64_t row = 0; row < pr.rows; ++row) {
        run_row<T, VEC, KIND>(a, row, cols, g, c, [g](auto& v, auto merge) {
          group_allreduce(v, g, merge);
          return v[0];
        });
      }
      break;
    }
    case KdPath::kBlock: {
      for (int64_t row = 0; row < pr.rows; ++row) {
        // kd_block_allreduce: thread 0's block_reduce, broadcast through shared memory.
        run_row<T, VEC, KIND>(a, row, cols, plan.threads, c,
                              [](auto& v, auto merge) { return block_reduce(v, merge); });
      }
      break;
    }
    case KdPath::kSplit:
      if (plan.splits != kd_ceil_div(pr.cols, plan.chunk)) return 2;
      run_split<T, VEC, KIND>(a, pr.rows, cols, static_cast<int>(plan.splits),
                              static_cast<int>(plan.chunk), c);
      break;
    default:
      return 2;
  }
  if (!a.s.guards_intact() || !a.t.guards_intact() || !a.gs.guards_intact() ||
      !a.gt.guards_intact()) {
    return 3;
  }
  if (!g_segments_ok) return 4;
  const int64_t header[5] = {static_cast<int64_t>(plan.path), plan.threads, plan.group, plan.splits,
                             plan.chunk};
  fwrite(header, sizeof(header), 1, out);
  fwrite(loss.data(), sizeof(float), loss.size(), out);
  std::vector<float> g(n);
  for (size_t i = 0; i < n; ++i) g[i] = KdElem<T>::to_float(a.gs.data[i]);
  fwrite(g.data(), sizeof(float), n, out);
  for (size_t i = 0; i < n; ++i) g[i] = KdElem<T>::to_float(a.gt.data[i]);
  fwrite(g.data(), sizeof(float), n, out);
  const int64_t fault[kFaultRecordFields] = {a.fault.code, a.fault.op, a.fault.row,
                                             a.fault.value, a.fault.cols, a.fault.ignore_index};
  fwrite(fault, sizeof(fault), 1, out);
  return 0;
}

template <typename T>
int run_typed(const Problem& pr, const KdPlan& plan, FILE* out) {
  switch (divergence_kind(pr.divergence)) {
    case kKL: return run_kind<T, kKL>(pr, plan, out);
    case kReverseKL: return run_kind<T, kReverseKL>(pr, plan, out);
    default: return run_kind<T, kMixture>(pr, plan, out);
  }
}

bool read_all(FILE* f, void* dst, size_t bytes) { return fread(dst, 1, bytes, f) == bytes; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 15) {
    fprintf(stderr,
            "usage: %s DTYPE ROWS COLS BASE DIV T BETA ALPHA PATH SPLITS SMS FLAGS IN OUT\n",
            argv[0]);
    return 2;
  }
  Problem pr;
  const int dtype = atoi(argv[1]);
  pr.rows = atoll(argv[2]);
  pr.cols = atoll(argv[3]);
  pr.base = atoi(argv[4]);
  pr.divergence = atoi(argv[5]);
  pr.temperature = atof(argv[6]);
  pr.beta = atof(argv[7]);
  pr.alpha = atof(argv[8]);
  pr.path = atoi(argv[9]);
  pr.splits = atoi(argv[10]);
  pr.sms = atoi(argv[11]);
  pr.flags = atoi(argv[12]);
  const KdDType kd_dtype = static_cast<KdDType>(dtype);
  if (dtype < 0 || dtype > 2 || pr.rows < 1 || pr.cols < 1 || pr.base < 0 ||
      pr.base >= 16 / kd_dtype_bytes(kd_dtype) || pr.divergence < 0 ||
      pr.divergence >= kNumDivergences || pr.path < 0 || pr.path > 3) {
    fprintf(stderr, "bad arguments\n");
    return 2;
  }
  const size_t n = static_cast<size_t>(pr.rows * pr.cols);
  pr.s.resize(n);
  pr.t.resize(n);
  pr.labels.resize(pr.rows);
  pr.mask.resize(pr.rows);
  FILE* in = fopen(argv[13], "rb");
  if (in == nullptr || !read_all(in, pr.s.data(), n * 4) || !read_all(in, pr.t.data(), n * 4) ||
      !read_all(in, pr.labels.data(), pr.rows * 8) || !read_all(in, pr.mask.data(), pr.rows)) {
    fprintf(stderr, "cannot read %s\n", argv[13]);
    return 2;
  }
  fclose(in);
  const bool mixture = divergence_kind(pr.divergence) == kMixture;
  const KdPlan plan = plan_kd_loss_fwd(kd_dtype, pr.rows, pr.cols, pr.sms, mixture,
                                       static_cast<KdPath>(pr.path), pr.splits);
  FILE* out = fopen(argv[14], "wb");
  if (out == nullptr) return 2;
  int rc = 2;
  switch (kd_dtype) {
    case KdDType::kFloat32: rc = run_typed<float>(pr, plan, out); break;
    case KdDType::kFloat16: rc = run_typed<__half>(pr, plan, out); break;
    case KdDType::kBFloat16: rc = run_typed<__nv_bfloat16>(pr, plan, out); break;
  }
  fclose(out);
  return rc;
}
