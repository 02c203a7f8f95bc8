// CUDA kernels of kdplug::kd_loss_fwd: thread layouts and cross-thread reductions of the row
// statistics. The arithmetic is kd_math.h's; the per-thread loops are kd_loss_thread.cuh's.
// Only the CUDA runtime is included here (no ATen).
//
// Paths (chosen by plan_kd_loss_fwd in kd_loss_cuda.h; README.md explains them):
//   kd_group_kernel        8 or 32 lanes per row, 256 threads per block, grid-stride over rows
//   kd_block_kernel        a block (256 or 512 threads) per row, grid-stride over rows
//   kd_split_stats_kernel  block (row, split): statistics of its chunk -> workspace
//   kd_split_terms_kernel  (mixture divergences) block (row, split): merge the row's statistics,
//                          its chunk's Σφ, Gq, Gp -> workspace
//   kd_split_grads_kernel  block (row, split): merge the row's partials -> loss and its chunk's
//                          gradients
// Every kernel is a template over the divergence's kind (kd_math.h: kl, reverse_kl, or the
// mixture divergences, which take one more pass over the row for their terms).
#include <stdint.h>
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kd_math.h"
#include "cuda/kd_loss_cuda.h"
#include "cuda/kd_loss_thread.cuh"

namespace kdplug {
namespace kd_cuda {
namespace {

static_assert(sizeof(KdStats) == kStatsFloats * sizeof(float), "KdStats is 7 floats");
static_assert(sizeof(RowTermsT<float>) == kTermsFloats * sizeof(float), "RowTerms is 3 floats");

// kd_group_kernel: at least 4 blocks of 256 threads per SM (caps registers at 64 per thread).
constexpr int kGroupMinBlocksPerSm = 4;

template <typename T>
struct KdArgs {
  const T* student;
  const T* teacher;
  const bool* mask;       // nullptr: every row counts
  const int64_t* labels;  // nullptr: no hard-label term
  T* grad_student;        // nullptr: not wanted
  T* grad_teacher;        // nullptr: not wanted
  const float* scales;    // device [2]: the reduction's factors (kd, ce)
  float* loss_rows;
  int64_t rows;
  int64_t ignore_index;
  int cols;
  double temperature, alpha;
  KdParams p;
  KdFaultRecord* fault;   // where the first bad label is recorded (or nullptr)
};

// The launch's coefficients (kd_math.h's term_coefs, from the device scales).
template <typename T>
__device__ __forceinline__ TermCoefsT<float> kd_coefs(const KdArgs<T>& a) {
  return term_coefs<float>(a.temperature, a.alpha, a.scales[0], a.scales[1]);
}

// ---- cross-thread reductions of structs of floats --------------------------------------------

template <typename S>
__device__ __forceinline__ S kd_shfl_xor(const S& v, int lane_mask, unsigned mask, int width) {
  constexpr int kN = sizeof(S) / sizeof(float);
  float in[kN];
  float out[kN];
  memcpy(in, &v, sizeof(S));
#pragma unroll
  for (int i = 0; i < kN; ++i) out[i] = __shfl_xor_sync(mask, in[i], lane_mask, width);
  S o;
  memcpy(&o, out, sizeof(S));
  return o;
}

template <typename S>
__device__ __forceinline__ S kd_shfl(const S& v, int src_lane, unsigned mask, int width) {
  constexpr int kN = sizeof(S) / sizeof(float);
  float in[kN];
  float out[kN];
  memcpy(in, &v, sizeof(S));
#pragma unroll
  for (int i = 0; i < kN; ++i) out[i] = __shfl_sync(mask, in[i], src_lane, width);
  S o;
  memcpy(&o, out, sizeof(S));
  return o;
}

// How partial results of a row merge: KdStats by the divergence's kind, RowTerms by a sum.
template <int KIND>
struct KdMergeStats {
  __device__ __forceinline__ KdStats operator()(const KdStats& a, const KdStats& b) const {
    return kd_stats_merge<KIND>(a, b);
  }
  static __device__ __forceinline__ KdStats empty() { return kd_stats_empty(); }
};

struct KdMergeTerms {
  __device__ __forceinline__ RowTermsT<float> operator()(const RowTermsT<float>& a,
                                                         const RowTermsT<float>& b) const {
    return row_terms_merge(a, b);
  }
  static __device__ __forceinline__ RowTermsT<float> empty() { return row_terms_empty<float>(); }
};

// Butterfly over a group of G lanes (G a power of two, the group G-aligned within its warp, every
// lane named in `mask` taking part). Lane 0 of the group holds the merge of all G.
template <int G, typename S, typename M>
__device__ __forceinline__ S kd_group_reduce(S v, unsigned mask, M merge) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v = merge(v, kd_shfl_xor(v, off, mask, G));
  return v;
}

// As kd_group_reduce, then every lane takes lane 0's value: merge(a, b) and merge(b, a) may round
// differently (FMA contraction), and all lanes of a row must use the very same values.
template <int G, typename S, typename M>
__device__ __forceinline__ S kd_group_allreduce(S v, unsigned mask, M merge) {
  return kd_shfl(kd_group_reduce<G>(v, mask, merge), 0, mask, G);
}

// Block-wide merge; the result is valid in thread 0 only. All THREADS threads must call it.
// warp_sh: THREADS/32 entries, read by warp 0 after the __syncthreads here: a caller that calls
// again with the same warp_sh must put a __syncthreads between the calls (kd_block_allreduce has
// one).
template <int THREADS, typename S, typename M>
__device__ __forceinline__ S kd_block_reduce(S v, S* warp_sh, M merge) {
  constexpr int kWarps = THREADS / 32;
  static_assert(THREADS % 32 == 0 && kWarps <= 32, "block of 32..1024 threads, whole warps");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = kd_group_reduce<32>(v, 0xffffffffu, merge);
  if (lane == 0) warp_sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sh[lane] : M::empty();
    v = kd_group_reduce<32>(v, 0xffffffffu, merge);
  }
  return v;
}

// Block-wide merge, the same result in every thread.
template <int THREADS, typename S, typename M>
__device__ __forceinline__ S kd_block_allreduce(S v, S* warp_sh, S* row_sh, M merge) {
  v = kd_block_reduce<THREADS>(v, warp_sh, merge);
  if (threadIdx.x == 0) *row_sh = v;
  __syncthreads();
  // No race with the next call: it writes warp_sh after this __syncthreads, which warp 0 passed
  // after reading warp_sh, and row_sh after its own first __syncthreads, which every thread
  // reaches only after reading row_sh below.
  return *row_sh;
}

// Every warp merges `n` partials in the same order: all blocks of a row get bit-identical values
// without a __syncthreads.
template <typename S, typename M>
__device__ __forceinline__ S kd_warp_merge_partials(const S* partials, int n, M merge) {
  const int lane = threadIdx.x & 31;
  S v = M::empty();
  for (int i = lane; i < n; i += 32) v = merge(v, partials[i]);
  return kd_group_allreduce<32>(v, 0xffffffffu, merge);
}

// ---- kernels --------------------------------------------------------------------------------

// G lanes per row; kGroupBlockThreads/G rows per block; grid-stride over rows. Groups of one warp
// may work on different rows (or be done): every shuffle names only its group's lanes.
template <typename T, int VEC, int G, int KIND>
__global__ void __launch_bounds__(kGroupBlockThreads, kGroupMinBlocksPerSm)
    kd_group_kernel(const KdArgs<T> a) {
  static_assert(G == 8 || G == 16 || G == 32, "group of 8, 16 or 32 lanes");
  constexpr int kRowsPerBlock = kGroupBlockThreads / G;
  const int lane = threadIdx.x % G;
  const unsigned warp_lane = threadIdx.x & 31u;
  const unsigned mask =
      G == 32 ? 0xffffffffu : (((1u << (G % 32)) - 1u) << (warp_lane & ~unsigned(G - 1)));
  const TermCoefsT<float> coefs = kd_coefs(a);
  const int64_t stride = int64_t(gridDim.x) * kRowsPerBlock;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / G; row < a.rows;
       row += stride) {
    const int64_t off = row * a.cols;
    const T* s = a.student + off;
    const T* t = a.teacher + off;
    T* gs = a.grad_student != nullptr ? a.grad_student + off : nullptr;
    T* gt = a.grad_teacher != nullptr ? a.grad_teacher + off : nullptr;
    const KdSegment seg = kd_segment<T, VEC>(s, 0, a.cols);
    if (a.mask != nullptr && !a.mask[row]) {  // the same for the whole group
      kd_thread_fill<T, VEC>(gs, gt, seg, lane, G, 0.f);
      if (lane == 0) a.loss_rows[row] = 0.f;
      continue;
    }
    KdStats st = kd_thread_stats<KIND, T, VEC>(s, t, seg, lane, G, a.p);
    st = kd_group_allreduce<G>(st, mask, KdMergeStats<KIND>());
    KdRow r;
    const int label = kd_label_of(a.labels, row, a.ignore_index, a.cols);
    if (!kd_row_begin<KIND>(st, a.p, coefs, label, r)) {  // the same for the whole group
      kd_thread_fill<T, VEC>(gs, gt, seg, lane, G, NAN);
      if (lane == 0) {
        a.loss_rows[row] = NAN;
        kd_note_label_fault(a.fault, a.labels, row, label, a.ignore_index, a.cols);
      }
      continue;
    }
    if constexpr (KIND == kMixture) {
      r.terms = kd_group_allreduce<G>(kd_thread_terms<T, VEC>(s, t, seg, lane, G, a.p, r.res),
                                      mask, KdMergeTerms());
    }
    if (gs != nullptr || gt != nullptr) {
      kd_thread_grads<KIND, T, VEC>(s, t, gs, gt, seg, lane, G, a.p, r);
    }
    if (lane == 0) a.loss_rows[row] = kd_row_loss(r, s);
  }
}

// A block of THREADS per row; grid-stride over rows (every thread of the block runs the same
// rows, so the __syncthreads inside are reached by all).
template <typename T, int VEC, int THREADS, int KIND>
__global__ void __launch_bounds__(THREADS) kd_block_kernel(const KdArgs<T> a) {
  __shared__ KdStats stats_warp_sh[THREADS / 32];
  __shared__ KdStats stats_sh;
  __shared__ RowTermsT<float> terms_warp_sh[THREADS / 32];
  __shared__ RowTermsT<float> terms_sh;
  const TermCoefsT<float> coefs = kd_coefs(a);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t off = row * a.cols;
    const T* s = a.student + off;
    const T* t = a.teacher + off;
    T* gs = a.grad_student != nullptr ? a.grad_student + off : nullptr;
    T* gt = a.grad_teacher != nullptr ? a.grad_teacher + off : nullptr;
    const KdSegment seg = kd_segment<T, VEC>(s, 0, a.cols);
    if (a.mask != nullptr && !a.mask[row]) {  // the same for the whole block: no sync skipped
      kd_thread_fill<T, VEC>(gs, gt, seg, threadIdx.x, THREADS, 0.f);
      if (threadIdx.x == 0) a.loss_rows[row] = 0.f;
      continue;
    }
    KdStats st = kd_thread_stats<KIND, T, VEC>(s, t, seg, threadIdx.x, THREADS, a.p);
    st = kd_block_allreduce<THREADS>(st, stats_warp_sh, &stats_sh, KdMergeStats<KIND>());
    KdRow r;
    const int label = kd_label_of(a.labels, row, a.ignore_index, a.cols);
    if (!kd_row_begin<KIND>(st, a.p, coefs, label, r)) {  // the same for the whole block
      kd_thread_fill<T, VEC>(gs, gt, seg, threadIdx.x, THREADS, NAN);
      if (threadIdx.x == 0) {
        a.loss_rows[row] = NAN;
        kd_note_label_fault(a.fault, a.labels, row, label, a.ignore_index, a.cols);
      }
      continue;
    }
    if constexpr (KIND == kMixture) {
      r.terms = kd_block_allreduce<THREADS>(
          kd_thread_terms<T, VEC>(s, t, seg, threadIdx.x, THREADS, a.p, r.res), terms_warp_sh,
          &terms_sh, KdMergeTerms());
    }
    if (gs != nullptr || gt != nullptr) {
      kd_thread_grads<KIND, T, VEC>(s, t, gs, gt, seg, threadIdx.x, THREADS, a.p, r);
    }
    if (threadIdx.x == 0) a.loss_rows[row] = kd_row_loss(r, s);
  }
}

// Split path, first kernel: block (row = blockIdx.x, split = blockIdx.y) writes the KdStats of
// classes [split*chunk, min((split+1)*chunk, cols)) to stats[row*splits + split].
// Masked rows write nothing (the other kernels do not read their partials).
template <typename T, int VEC, int KIND>
__global__ void __launch_bounds__(kSplitThreads)
    kd_split_stats_kernel(const KdArgs<T> a, int splits, int chunk, KdStats* stats) {
  __shared__ KdStats warp_sh[kSplitThreads / 32];
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  if (a.mask != nullptr && !a.mask[row]) return;  // whole block
  const int begin = split * chunk;                // < cols: splits = ceil(cols / chunk)
  const int end = min(begin + chunk, a.cols);
  const int64_t off = row * a.cols;
  const KdSegment seg = kd_segment<T, VEC>(a.student + off, begin, end);
  KdStats st =
      kd_thread_stats<KIND, T, VEC>(a.student + off, a.teacher + off, seg, threadIdx.x,
                                    kSplitThreads, a.p);
  st = kd_block_reduce<kSplitThreads>(st, warp_sh, KdMergeStats<KIND>());
  if (threadIdx.x == 0) stats[row * splits + split] = st;
}

// Split path, mixture divergences: every warp merges the row's statistics (kd_warp_merge_partials),
// then the block writes its chunk's Σφ, Gq, Gp to terms[row*splits + split].
template <typename T, int VEC>
__global__ void __launch_bounds__(kSplitThreads)
    kd_split_terms_kernel(const KdArgs<T> a, int splits, int chunk, const KdStats* stats,
                          RowTermsT<float>* terms) {
  __shared__ RowTermsT<float> warp_sh[kSplitThreads / 32];
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  if (a.mask != nullptr && !a.mask[row]) return;
  const int begin = split * chunk;
  const int end = min(begin + chunk, a.cols);
  const int64_t off = row * a.cols;
  const KdStats st =
      kd_warp_merge_partials(stats + row * splits, splits, KdMergeStats<kMixture>());
  const RowResult res = row_result(st.st);
  const KdSegment seg = kd_segment<T, VEC>(a.student + off, begin, end);
  RowTermsT<float> part = kd_thread_terms<T, VEC>(a.student + off, a.teacher + off, seg,
                                                  threadIdx.x, kSplitThreads, a.p, res);
  part = kd_block_reduce<kSplitThreads>(part, warp_sh, KdMergeTerms());
  if (threadIdx.x == 0) terms[row * splits + split] = part;
}

// Split path, last kernel: every warp merges the row's partials in the same order, then the block
// writes its chunk's gradients; split 0 writes the row's loss. Blocks run in the reverse order
// of the first kernel, so the chunks read last there (most likely still in L2) are read first.
template <typename T, int VEC, int KIND>
__global__ void __launch_bounds__(kSplitThreads)
    kd_split_grads_kernel(const KdArgs<T> a, int splits, int chunk, const KdStats* stats,
                          const RowTermsT<float>* terms) {
  const int64_t row = a.rows - 1 - int64_t(blockIdx.x);
  const int split = splits - 1 - int(blockIdx.y);
  const int begin = split * chunk;
  const int end = min(begin + chunk, a.cols);
  const int64_t off = row * a.cols;
  const T* s = a.student + off;
  const T* t = a.teacher + off;
  T* gs = a.grad_student != nullptr ? a.grad_student + off : nullptr;
  T* gt = a.grad_teacher != nullptr ? a.grad_teacher + off : nullptr;
  const KdSegment seg = kd_segment<T, VEC>(s, begin, end);
  if (a.mask != nullptr && !a.mask[row]) {
    kd_thread_fill<T, VEC>(gs, gt, seg, threadIdx.x, kSplitThreads, 0.f);
    if (split == 0 && threadIdx.x == 0) a.loss_rows[row] = 0.f;
    return;
  }
  const KdStats st = kd_warp_merge_partials(stats + row * splits, splits, KdMergeStats<KIND>());
  KdRow r;
  const int label = kd_label_of(a.labels, row, a.ignore_index, a.cols);
  if (!kd_row_begin<KIND>(st, a.p, kd_coefs(a), label, r)) {
    kd_thread_fill<T, VEC>(gs, gt, seg, threadIdx.x, kSplitThreads, NAN);
    if (split == 0 && threadIdx.x == 0) {
      a.loss_rows[row] = NAN;
      kd_note_label_fault(a.fault, a.labels, row, label, a.ignore_index, a.cols);
    }
    return;
  }
  if constexpr (KIND == kMixture) {
    r.terms = kd_warp_merge_partials(terms + row * splits, splits, KdMergeTerms());
  }
  if (gs != nullptr || gt != nullptr) {
    kd_thread_grads<KIND, T, VEC>(s, t, gs, gt, seg, threadIdx.x, kSplitThreads, a.p, r);
  }
  if (split == 0 && threadIdx.x == 0) a.loss_rows[row] = kd_row_loss(r, s);
}

// ---- launch ---------------------------------------------------------------------------------

constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridY = 65535;

const char* kd_last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <typename T, int VEC, int KIND>
const char* kd_launch(const KdPlan& plan, const KdArgs<T>& a, float* workspace,
                      int64_t workspace_floats, cudaStream_t stream) {
  switch (plan.path) {
    case KdPath::kGroup: {
      const int rows_per_block = kGroupBlockThreads / plan.group;
      const int64_t blocks = kd_ceil_div(a.rows, rows_per_block);
      const dim3 grid(static_cast<unsigned>(blocks < kMaxGridX ? blocks : kMaxGridX));
      if (plan.group == 8) {
        kd_group_kernel<T, VEC, 8, KIND><<<grid, kGroupBlockThreads, 0, stream>>>(a);
      } else if (plan.group == 32) {
        kd_group_kernel<T, VEC, 32, KIND><<<grid, kGroupBlockThreads, 0, stream>>>(a);
      } else {
        return "kd_loss_fwd: bad plan (group must be 8 or 32 lanes)";
      }
      return kd_last_error();
    }
    case KdPath::kBlock: {
      const dim3 grid(static_cast<unsigned>(a.rows < kMaxGridX ? a.rows : kMaxGridX));
      if (plan.threads == kBlockThreadsSmall) {
        kd_block_kernel<T, VEC, kBlockThreadsSmall, KIND>
            <<<grid, kBlockThreadsSmall, 0, stream>>>(a);
      } else if (plan.threads == kBlockThreadsLarge) {
        kd_block_kernel<T, VEC, kBlockThreadsLarge, KIND>
            <<<grid, kBlockThreadsLarge, 0, stream>>>(a);
      } else {
        return "kd_loss_fwd: bad plan (block size)";
      }
      return kd_last_error();
    }
    case KdPath::kSplit: {
      if (plan.chunk < 1 || plan.splits < 1 || plan.splits > kMaxGridY ||
          plan.splits != kd_ceil_div(a.cols, plan.chunk)) {
        return "kd_loss_fwd: bad plan (splits and chunk do not cover the row)";
      }
      if (a.rows > kMaxGridX) return "kd_loss_fwd: too many rows for the split layout";
      const int64_t partials = a.rows * plan.splits;
      const int64_t needed =
          partials * (kStatsFloats + (KIND == kMixture ? kTermsFloats : 0));
      if (workspace == nullptr || workspace_floats < needed) {
        return "kd_loss_fwd: the split layout needs a workspace of plan.workspace_floats floats";
      }
      const dim3 grid(static_cast<unsigned>(a.rows), static_cast<unsigned>(plan.splits));
      const int splits = static_cast<int>(plan.splits);
      const int chunk = static_cast<int>(plan.chunk);
      KdStats* stats = reinterpret_cast<KdStats*>(workspace);
      RowTermsT<float>* terms =
          reinterpret_cast<RowTermsT<float>*>(workspace + partials * kStatsFloats);
      kd_split_stats_kernel<T, VEC, KIND>
          <<<grid, kSplitThreads, 0, stream>>>(a, splits, chunk, stats);
      if (const char* err = kd_last_error()) return err;
      if constexpr (KIND == kMixture) {
        kd_split_terms_kernel<T, VEC>
            <<<grid, kSplitThreads, 0, stream>>>(a, splits, chunk, stats, terms);
        if (const char* err = kd_last_error()) return err;
      }
      kd_split_grads_kernel<T, VEC, KIND>
          <<<grid, kSplitThreads, 0, stream>>>(a, splits, chunk, stats, terms);
      return kd_last_error();
    }
    default:
      return "kd_loss_fwd: bad plan (unknown path)";
  }
}

template <typename T, int VEC>
const char* kd_launch_kind(const KdPlan& plan, const KdArgs<T>& a, const KdLaunch& l,
                           cudaStream_t stream) {
  switch (divergence_kind(l.divergence)) {
    case kKL:
      return kd_launch<T, VEC, kKL>(plan, a, l.workspace, l.workspace_floats, stream);
    case kReverseKL:
      return kd_launch<T, VEC, kReverseKL>(plan, a, l.workspace, l.workspace_floats, stream);
    default:
      return kd_launch<T, VEC, kMixture>(plan, a, l.workspace, l.workspace_floats, stream);
  }
}

template <typename T>
const char* kd_launch_typed(const KdPlan& plan, const KdLaunch& l, cudaStream_t stream) {
  KdArgs<T> a;
  a.student = static_cast<const T*>(l.student);
  a.teacher = static_cast<const T*>(l.teacher);
  a.mask = l.mask;
  a.labels = l.labels;
  a.grad_student = static_cast<T*>(l.grad_student);
  a.grad_teacher = static_cast<T*>(l.grad_teacher);
  a.scales = l.scales;
  a.loss_rows = l.loss_rows;
  a.rows = l.rows;
  a.ignore_index = l.ignore_index;
  a.cols = static_cast<int>(l.cols);
  a.temperature = l.temperature;
  a.alpha = l.labels != nullptr ? l.alpha : 1.0;
  // 1/T in double, rounded once, as on the CPU: 1/0.05 is exactly 20, 1/float(0.05) is not.
  a.p.inv_t = static_cast<float>(1.0 / l.temperature);
  a.p.beta = static_cast<float>(l.beta);
  a.p.divergence = l.divergence;
  a.p.ce_separate = l.labels != nullptr && l.temperature != 1.0;
  a.fault = l.fault;

  // 16-byte vectors need the four arrays to share their address modulo 16 (then the same scalar
  // head aligns them all, row after row). Only that layout is compiled: the glue copies an input
  // that is a view at an odd offset (torch's allocations are 256-byte aligned).
  constexpr int kVec = 16 / sizeof(T);
  const uintptr_t m = reinterpret_cast<uintptr_t>(l.student) & 15u;
  auto aligned = [m](const void* ptr) {
    return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) & 15u) == m;
  };
  if (m % sizeof(T) != 0 || !aligned(l.teacher) || !aligned(l.grad_student) ||
      !aligned(l.grad_teacher)) {
    return "kd_loss_fwd: inputs and gradients must share their address modulo 16";
  }
  return kd_launch_kind<T, kVec>(plan, a, l, stream);
}

}  // namespace

const char* launch_kd_loss_fwd(const KdPlan& plan, KdDType dtype, const KdLaunch& l,
                               cudaStream_t stream) {
  if (l.rows < 1 || l.cols < 1) return "kd_loss_fwd: empty input";
  if (l.cols > kMaxCols) return "kd_loss_fwd: the CUDA kernel takes at most 2^30 classes per row";
  if (l.student == nullptr || l.teacher == nullptr || l.scales == nullptr ||
      l.loss_rows == nullptr) {
    return "kd_loss_fwd: null input or output pointer";
  }
  if (!(l.temperature > 0.0) || !(l.temperature < INFINITY)) {
    return "kd_loss_fwd: temperature must be finite and > 0";
  }
  if (l.divergence < 0 || l.divergence >= kNumDivergences) return "kd_loss_fwd: bad divergence";
  switch (dtype) {
    case KdDType::kFloat32:
      return kd_launch_typed<float>(plan, l, stream);
    case KdDType::kFloat16:
      return kd_launch_typed<__half>(plan, l, stream);
    case KdDType::kBFloat16:
      return kd_launch_typed<__nv_bfloat16>(plan, l, stream);
  }
  return "kd_loss_fwd: unsupported dtype";
}

}  // namespace kd_cuda
}  // namespace kdplug
