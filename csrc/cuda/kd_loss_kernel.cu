// CUDA kernels of kdplug::kd_kl_fwd: thread layouts and cross-thread reductions of the row
// statistics. The arithmetic is kd_math.h's; the per-thread loops are kd_loss_thread.cuh's.
// Only the CUDA runtime is included here (no ATen), so this file compiles in about a minute.
//
// Paths (chosen by plan_kd_kl_fwd in kd_loss_cuda.h; README.md explains them):
//   kd_group_kernel        8 or 32 lanes per row, 256 threads per block, grid-stride over rows
//   kd_block_kernel        a block (256 or 512 threads) per row, grid-stride over rows
//   kd_split_stats_kernel  block (row, split): statistics of its chunk -> workspace
//   kd_split_grads_kernel  block (row, split): merge the row's partials -> loss and its chunk's grads
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kd_math.h"
#include "cuda/kd_loss_cuda.h"
#include "cuda/kd_loss_thread.cuh"

namespace kdplug {
namespace kd_cuda {
namespace {

static_assert(sizeof(RowStats) == kStatsFloats * sizeof(float), "RowStats is 5 floats");

// kd_group_kernel: at least 4 blocks of 256 threads per SM (caps registers at 64 per thread).
constexpr int kGroupMinBlocksPerSm = 4;

template <typename T>
struct KdArgs {
  const T* student;
  const T* teacher;
  const bool* mask;       // nullptr: every row counts
  T* grad_student;
  T* grad_teacher;        // nullptr unless HAS_GT
  const float* row_scale; // device scalar
  float* loss_rows;
  int64_t rows;
  int cols;
  float temperature;
  float inv_t;
};

// ---- cross-thread reductions of RowStats -------------------------------------------------------

__device__ __forceinline__ RowStats kd_shfl_xor(const RowStats& v, int lane_mask, unsigned mask,
                                                int width) {
  RowStats o;
  o.max_x = __shfl_xor_sync(mask, v.max_x, lane_mask, width);
  o.sum_x = __shfl_xor_sync(mask, v.sum_x, lane_mask, width);
  o.max_y = __shfl_xor_sync(mask, v.max_y, lane_mask, width);
  o.sum_y = __shfl_xor_sync(mask, v.sum_y, lane_mask, width);
  o.cross = __shfl_xor_sync(mask, v.cross, lane_mask, width);
  return o;
}

__device__ __forceinline__ RowStats kd_shfl(const RowStats& v, int src_lane, unsigned mask,
                                            int width) {
  RowStats o;
  o.max_x = __shfl_sync(mask, v.max_x, src_lane, width);
  o.sum_x = __shfl_sync(mask, v.sum_x, src_lane, width);
  o.max_y = __shfl_sync(mask, v.max_y, src_lane, width);
  o.sum_y = __shfl_sync(mask, v.sum_y, src_lane, width);
  o.cross = __shfl_sync(mask, v.cross, src_lane, width);
  return o;
}

// Butterfly over a group of G lanes (G a power of two, the group G-aligned within its warp, every
// lane named in `mask` taking part). Lane 0 of the group holds the merge of all G.
template <int G>
__device__ __forceinline__ RowStats kd_group_reduce(RowStats v, unsigned mask) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v = row_stats_merge(v, kd_shfl_xor(v, off, mask, G));
  return v;
}

// As kd_group_reduce, then every lane takes lane 0's value: merge(a, b) and merge(b, a) may round
// differently (FMA contraction), and all lanes of a row must use the very same statistics.
template <int G>
__device__ __forceinline__ RowStats kd_group_allreduce(RowStats v, unsigned mask) {
  return kd_shfl(kd_group_reduce<G>(v, mask), 0, mask, G);
}

// Block-wide merge; the result is valid in thread 0 only. All THREADS threads must call it.
// warp_sh: THREADS/32 entries, read by warp 0 after the __syncthreads here: a caller that calls
// again with the same warp_sh must put a __syncthreads between the calls (kd_block_allreduce has
// one; kd_split_stats_kernel calls once).
template <int THREADS>
__device__ __forceinline__ RowStats kd_block_reduce(RowStats v, RowStats* warp_sh) {
  constexpr int kWarps = THREADS / 32;
  static_assert(THREADS % 32 == 0 && kWarps <= 32, "block of 32..1024 threads, whole warps");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = kd_group_reduce<32>(v, 0xffffffffu);
  if (lane == 0) warp_sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sh[lane] : row_stats_empty();
    v = kd_group_reduce<32>(v, 0xffffffffu);
  }
  return v;
}

// Block-wide merge, the same result in every thread.
template <int THREADS>
__device__ __forceinline__ RowStats kd_block_allreduce(RowStats v, RowStats* warp_sh,
                                                       RowStats* row_sh) {
  v = kd_block_reduce<THREADS>(v, warp_sh);
  if (threadIdx.x == 0) *row_sh = v;
  __syncthreads();
  // No race with the next call: it writes warp_sh after this __syncthreads, which warp 0 passed
  // after reading warp_sh, and row_sh after its own first __syncthreads, which every thread
  // reaches only after reading row_sh below.
  return *row_sh;
}

// ---- kernels --------------------------------------------------------------------------------

// G lanes per row; kGroupBlockThreads/G rows per block; grid-stride over rows. Groups of one warp
// may work on different rows (or be done): every shuffle names only its group's lanes.
template <typename T, int VEC, int G, bool HAS_GT>
__global__ void __launch_bounds__(kGroupBlockThreads, kGroupMinBlocksPerSm)
    kd_group_kernel(const KdArgs<T> a) {
  static_assert(G == 8 || G == 16 || G == 32, "group of 8, 16 or 32 lanes");
  constexpr int kRowsPerBlock = kGroupBlockThreads / G;
  const int lane = threadIdx.x % G;
  const unsigned warp_lane = threadIdx.x & 31u;
  const unsigned mask =
      G == 32 ? 0xffffffffu : (((1u << (G % 32)) - 1u) << (warp_lane & ~unsigned(G - 1)));
  const float ts = a.temperature * *a.row_scale;
  const int64_t stride = int64_t(gridDim.x) * kRowsPerBlock;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / G; row < a.rows;
       row += stride) {
    const int64_t off = row * a.cols;
    const T* s = a.student + off;
    const T* t = a.teacher + off;
    T* gs = a.grad_student + off;
    T* gt = HAS_GT ? a.grad_teacher + off : nullptr;
    const KdSegment seg = kd_segment<T, VEC>(s, 0, a.cols);
    if (a.mask != nullptr && !a.mask[row]) {  // the same for the whole group
      kd_thread_zero<T, VEC, HAS_GT>(gs, gt, seg, lane, G);
      if (lane == 0) a.loss_rows[row] = 0.f;
      continue;
    }
    RowStats st = kd_thread_stats<T, VEC>(s, t, seg, lane, G, a.inv_t);
    st = kd_group_allreduce<G>(st, mask);
    const RowResult res = row_result(st);
    kd_thread_grads<T, VEC, HAS_GT>(s, t, gs, gt, seg, lane, G, a.inv_t, res, ts);
    if (lane == 0) a.loss_rows[row] = a.temperature * a.temperature * res.loss_over_t2;
  }
}

// A block of THREADS per row; grid-stride over rows (every thread of the block runs the same
// rows, so the __syncthreads inside are reached by all).
template <typename T, int VEC, int THREADS, bool HAS_GT>
__global__ void __launch_bounds__(THREADS) kd_block_kernel(const KdArgs<T> a) {
  __shared__ RowStats warp_sh[THREADS / 32];
  __shared__ RowStats row_sh;
  const float ts = a.temperature * *a.row_scale;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t off = row * a.cols;
    const T* s = a.student + off;
    const T* t = a.teacher + off;
    T* gs = a.grad_student + off;
    T* gt = HAS_GT ? a.grad_teacher + off : nullptr;
    const KdSegment seg = kd_segment<T, VEC>(s, 0, a.cols);
    if (a.mask != nullptr && !a.mask[row]) {  // the same for the whole block: no sync skipped
      kd_thread_zero<T, VEC, HAS_GT>(gs, gt, seg, threadIdx.x, THREADS);
      if (threadIdx.x == 0) a.loss_rows[row] = 0.f;
      continue;
    }
    RowStats st = kd_thread_stats<T, VEC>(s, t, seg, threadIdx.x, THREADS, a.inv_t);
    st = kd_block_allreduce<THREADS>(st, warp_sh, &row_sh);
    const RowResult res = row_result(st);
    kd_thread_grads<T, VEC, HAS_GT>(s, t, gs, gt, seg, threadIdx.x, THREADS, a.inv_t, res, ts);
    if (threadIdx.x == 0) a.loss_rows[row] = a.temperature * a.temperature * res.loss_over_t2;
  }
}

// Split path, first kernel: block (row = blockIdx.x, split = blockIdx.y) writes the RowStats of
// classes [split*chunk, min((split+1)*chunk, cols)) to partials[row*splits + split].
// Masked rows write nothing (the second kernel does not read their partials).
template <typename T, int VEC>
__global__ void __launch_bounds__(kSplitThreads)
    kd_split_stats_kernel(const KdArgs<T> a, int splits, int chunk, RowStats* partials) {
  __shared__ RowStats warp_sh[kSplitThreads / 32];
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  if (a.mask != nullptr && !a.mask[row]) return;  // whole block
  const int begin = split * chunk;                // < cols: splits = ceil(cols / chunk)
  const int end = min(begin + chunk, a.cols);
  const int64_t off = row * a.cols;
  const T* s = a.student + off;
  const T* t = a.teacher + off;
  const KdSegment seg = kd_segment<T, VEC>(s, begin, end);
  RowStats st = kd_thread_stats<T, VEC>(s, t, seg, threadIdx.x, kSplitThreads, a.inv_t);
  st = kd_block_reduce<kSplitThreads>(st, warp_sh);
  if (threadIdx.x == 0) partials[row * splits + split] = st;
}

// Split path, second kernel: every warp merges the row's `splits` partials in the same order (so
// every block of the row gets bit-identical statistics without a __syncthreads), then the block
// writes its chunk's gradients; split 0 writes the row's loss. Blocks run in the reverse order
// of the first kernel, so the chunks read last there (most likely still in L2) are read first.
template <typename T, int VEC, bool HAS_GT>
__global__ void __launch_bounds__(kSplitThreads)
    kd_split_grads_kernel(const KdArgs<T> a, int splits, int chunk, const RowStats* partials) {
  const int64_t row = a.rows - 1 - int64_t(blockIdx.x);
  const int split = splits - 1 - int(blockIdx.y);
  const int begin = split * chunk;
  const int end = min(begin + chunk, a.cols);
  const int64_t off = row * a.cols;
  const T* s = a.student + off;
  const T* t = a.teacher + off;
  T* gs = a.grad_student + off;
  T* gt = HAS_GT ? a.grad_teacher + off : nullptr;
  const KdSegment seg = kd_segment<T, VEC>(s, begin, end);
  if (a.mask != nullptr && !a.mask[row]) {
    kd_thread_zero<T, VEC, HAS_GT>(gs, gt, seg, threadIdx.x, kSplitThreads);
    if (split == 0 && threadIdx.x == 0) a.loss_rows[row] = 0.f;
    return;
  }
  const int lane = threadIdx.x & 31;
  const RowStats* p = partials + row * splits;
  RowStats st = row_stats_empty();
  for (int i = lane; i < splits; i += 32) st = row_stats_merge(st, p[i]);
  st = kd_group_allreduce<32>(st, 0xffffffffu);
  const RowResult res = row_result(st);
  const float ts = a.temperature * *a.row_scale;
  kd_thread_grads<T, VEC, HAS_GT>(s, t, gs, gt, seg, threadIdx.x, kSplitThreads, a.inv_t, res,
                                  ts);
  if (split == 0 && threadIdx.x == 0) {
    a.loss_rows[row] = a.temperature * a.temperature * res.loss_over_t2;
  }
}

// ---- launch ---------------------------------------------------------------------------------

constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridY = 65535;

const char* kd_last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <typename T, int VEC, bool HAS_GT>
const char* kd_launch(const KdPlan& plan, const KdArgs<T>& a, float* workspace,
                      int64_t workspace_floats, cudaStream_t stream) {
  switch (plan.path) {
    case KdPath::kGroup: {
      const int rows_per_block = kGroupBlockThreads / plan.group;
      const int64_t blocks = kd_ceil_div(a.rows, rows_per_block);
      const dim3 grid(static_cast<unsigned>(blocks < kMaxGridX ? blocks : kMaxGridX));
      if (plan.group == 8) {
        kd_group_kernel<T, VEC, 8, HAS_GT><<<grid, kGroupBlockThreads, 0, stream>>>(a);
      } else if (plan.group == 32) {
        kd_group_kernel<T, VEC, 32, HAS_GT><<<grid, kGroupBlockThreads, 0, stream>>>(a);
      } else {
        return "kd_kl_fwd: bad plan (group must be 8 or 32 lanes)";
      }
      return kd_last_error();
    }
    case KdPath::kBlock: {
      const dim3 grid(static_cast<unsigned>(a.rows < kMaxGridX ? a.rows : kMaxGridX));
      if (plan.threads == kBlockThreadsSmall) {
        kd_block_kernel<T, VEC, kBlockThreadsSmall, HAS_GT>
            <<<grid, kBlockThreadsSmall, 0, stream>>>(a);
      } else if (plan.threads == kBlockThreadsLarge) {
        kd_block_kernel<T, VEC, kBlockThreadsLarge, HAS_GT>
            <<<grid, kBlockThreadsLarge, 0, stream>>>(a);
      } else {
        return "kd_kl_fwd: bad plan (block size)";
      }
      return kd_last_error();
    }
    case KdPath::kSplit: {
      if (plan.chunk < 1 || plan.splits < 1 || plan.splits > kMaxGridY ||
          plan.splits != kd_ceil_div(a.cols, plan.chunk)) {
        return "kd_kl_fwd: bad plan (splits and chunk do not cover the row)";
      }
      if (a.rows > kMaxGridX) return "kd_kl_fwd: too many rows for the split layout";
      if (workspace == nullptr || workspace_floats < a.rows * plan.splits * kStatsFloats) {
        return "kd_kl_fwd: the split layout needs a workspace of rows*splits*5 floats";
      }
      const dim3 grid(static_cast<unsigned>(a.rows), static_cast<unsigned>(plan.splits));
      const int splits = static_cast<int>(plan.splits);
      const int chunk = static_cast<int>(plan.chunk);
      RowStats* partials = reinterpret_cast<RowStats*>(workspace);
      kd_split_stats_kernel<T, VEC><<<grid, kSplitThreads, 0, stream>>>(a, splits, chunk, partials);
      if (const char* err = kd_last_error()) return err;
      kd_split_grads_kernel<T, VEC, HAS_GT>
          <<<grid, kSplitThreads, 0, stream>>>(a, splits, chunk, partials);
      return kd_last_error();
    }
    default:
      return "kd_kl_fwd: bad plan (unknown path)";
  }
}

template <typename T>
const char* kd_launch_typed(const KdPlan& plan, const void* student, const void* teacher,
                            const bool* mask, int64_t rows, int64_t cols, double temperature,
                            const float* row_scale, float* loss_rows, void* grad_student,
                            void* grad_teacher, float* workspace, int64_t workspace_floats,
                            cudaStream_t stream) {
  KdArgs<T> a;
  a.student = static_cast<const T*>(student);
  a.teacher = static_cast<const T*>(teacher);
  a.mask = mask;
  a.grad_student = static_cast<T*>(grad_student);
  a.grad_teacher = static_cast<T*>(grad_teacher);
  a.row_scale = row_scale;
  a.loss_rows = loss_rows;
  a.rows = rows;
  a.cols = static_cast<int>(cols);
  // 1/T in double, rounded once, as on the CPU: 1/0.05 is exactly 20, 1/float(0.05) is not.
  a.temperature = static_cast<float>(temperature);
  a.inv_t = static_cast<float>(1.0 / temperature);

  // 16-byte vectors need the four arrays to share their address modulo 16 (then the same
  // scalar head aligns them all, row after row); torch's allocations are 256-byte aligned, so
  // this fails only for inputs that are views at odd offsets: then all scalar.
  constexpr int kVec = 16 / sizeof(T);
  const uintptr_t m = reinterpret_cast<uintptr_t>(student) & 15u;
  const bool vec_ok = m % sizeof(T) == 0 && (reinterpret_cast<uintptr_t>(teacher) & 15u) == m &&
                      (reinterpret_cast<uintptr_t>(grad_student) & 15u) == m &&
                      (grad_teacher == nullptr ||
                       (reinterpret_cast<uintptr_t>(grad_teacher) & 15u) == m);
  if (grad_teacher != nullptr) {
    return vec_ok ? kd_launch<T, kVec, true>(plan, a, workspace, workspace_floats, stream)
                  : kd_launch<T, 1, true>(plan, a, workspace, workspace_floats, stream);
  }
  return vec_ok ? kd_launch<T, kVec, false>(plan, a, workspace, workspace_floats, stream)
                : kd_launch<T, 1, false>(plan, a, workspace, workspace_floats, stream);
}

}  // namespace

const char* launch_kd_kl_fwd(const KdPlan& plan, KdDType dtype, const void* student,
                             const void* teacher, const bool* mask, int64_t rows, int64_t cols,
                             double temperature, const float* row_scale, float* loss_rows,
                             void* grad_student, void* grad_teacher, float* workspace,
                             int64_t workspace_floats, cudaStream_t stream) {
  if (rows < 1 || cols < 1) return "kd_kl_fwd: empty input";
  if (cols > kMaxCols) return "kd_kl_fwd: the CUDA kernel takes at most 2^30 classes per row";
  if (student == nullptr || teacher == nullptr || row_scale == nullptr || loss_rows == nullptr ||
      grad_student == nullptr) {
    return "kd_kl_fwd: null input or output pointer";
  }
  if (!(temperature > 0.0) || !(temperature < INFINITY)) {
    return "kd_kl_fwd: temperature must be finite and > 0";
  }
  switch (dtype) {
    case KdDType::kFloat32:
      return kd_launch_typed<float>(plan, student, teacher, mask, rows, cols, temperature,
                                    row_scale, loss_rows, grad_student, grad_teacher, workspace,
                                    workspace_floats, stream);
    case KdDType::kFloat16:
      return kd_launch_typed<__half>(plan, student, teacher, mask, rows, cols, temperature,
                                     row_scale, loss_rows, grad_student, grad_teacher, workspace,
                                     workspace_floats, stream);
    case KdDType::kBFloat16:
      return kd_launch_typed<__nv_bfloat16>(plan, student, teacher, mask, rows, cols,
                                            temperature, row_scale, loss_rows, grad_student,
                                            grad_teacher, workspace, workspace_floats, stream);
  }
  return "kd_kl_fwd: unsupported dtype";
}

}  // namespace kd_cuda
}  // namespace kdplug
