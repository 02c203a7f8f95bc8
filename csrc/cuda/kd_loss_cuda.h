// Host interface of kdplug's CUDA kernel for kd_loss_fwd (kd_loss_kernel.cu).
//
// Free of torch headers: the .cu compiles against the CUDA runtime alone, and the torch glue
// (kd_loss_cuda.cpp) only passes raw pointers, the plan and the stream. See README.md here.
#pragma once

#include <stdint.h>

#include <cuda_runtime_api.h>

#include "kd_faults.h"

namespace kdplug {
namespace kd_cuda {

enum class KdDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How rows are spread over threads.
//   kGroup: a group of 8 or 32 lanes (a part of a warp, or a warp) per row; small rows.
//   kBlock: a thread block per row; large rows and enough rows to fill the GPU.
//   kSplit: several blocks per row, two kernels (per-chunk statistics to a workspace, then merge
//           and gradients); large rows but too few of them to fill the GPU.
enum class KdPath : int { kAuto = 0, kGroup = 1, kBlock = 2, kSplit = 3 };

inline int kd_dtype_bytes(KdDType d) { return d == KdDType::kFloat32 ? 4 : 2; }

// Tunables (to be confirmed by measurement on a GPU; see README.md).
constexpr int kGroupBlockThreads = 256;   // kGroup: threads per block (256/G rows per block)
constexpr int kGroupMaxVecsPerLane = 8;   // kGroup while cols <= 32 lanes * 8 vectors
constexpr int kSmallGroupLanes = 8;       // rows of at most 8 lanes * 2 vectors use 8 lanes
constexpr int kBlockThreadsSmall = 256;   // kBlock: rows of at most 256 threads * 8 vectors
constexpr int kBlockThreadsLarge = 512;   // kBlock: longer rows
constexpr int kSplitThreads = 256;        // kSplit: threads per block
constexpr int kSplitMinVecsPerThread = 4; // kSplit: a chunk holds at least this many vectors/thread
constexpr int kSplitBlocksPerSm = 4;      // kSplit: aim at this many blocks per SM in all
constexpr int kSplitRowsPerSm = 2;        // kSplit (auto) only while rows < this * SMs
constexpr int64_t kMaxCols = int64_t(1) << 30;  // in-row indices are 32-bit
constexpr int kStatsFloats = 7;           // floats of one KdStats (RowStats + LseT) in the workspace
constexpr int kTermsFloats = 3;           // floats of one RowTerms (mixture divergences' 2nd pass)

struct KdPlan {
  KdPath path = KdPath::kBlock;  // never kAuto
  int threads = 0;               // threads per block
  int group = 0;                 // kGroup: lanes per row (8 or 32)
  int64_t splits = 1;            // kSplit: blocks per row
  int64_t chunk = 0;             // kSplit: classes per block (the last block may get fewer)
  int64_t workspace_floats = 0;  // float32 scratch the launch needs (kSplit: rows*splits*7,
                                 // + rows*splits*3 for the mixture divergences)
};

inline int64_t kd_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The launch layout for rows x cols logits of dtype on a GPU with sm_count SMs. `force` and
// `force_splits` (> 0) override the choice, for tests that must reach every path at small sizes.
// Pure arithmetic: no CUDA call, usable on any host.
inline KdPlan plan_kd_loss_fwd(KdDType dtype, int64_t rows, int64_t cols, int sm_count,
                              bool mixture, KdPath force = KdPath::kAuto,
                              int64_t force_splits = 0) {
  const int64_t vec = 16 / kd_dtype_bytes(dtype);  // elements per 16-byte vector
  const int64_t sms = sm_count > 0 ? sm_count : 1;
  const int64_t min_chunk = int64_t(kSplitThreads) * vec * kSplitMinVecsPerThread;
  KdPlan plan;
  if (cols < 1) cols = 1;
  if (rows < 1) rows = 1;

  KdPath path = force;
  int64_t splits = force_splits;
  if (path == KdPath::kAuto) {
    if (cols <= 32 * vec * kGroupMaxVecsPerLane) {
      path = KdPath::kGroup;
    } else if (rows < kSplitRowsPerSm * sms && cols >= 2 * min_chunk) {
      splits = kd_ceil_div(kSplitBlocksPerSm * sms, rows);
      if (splits > cols / min_chunk) splits = cols / min_chunk;
      path = splits >= 2 ? KdPath::kSplit : KdPath::kBlock;
    } else {
      path = KdPath::kBlock;
    }
  }

  plan.path = path;
  switch (path) {
    case KdPath::kGroup:
      plan.threads = kGroupBlockThreads;
      plan.group = cols <= kSmallGroupLanes * vec * 2 ? kSmallGroupLanes : 32;
      break;
    case KdPath::kBlock:
      plan.threads = cols <= kBlockThreadsSmall * vec * 8 ? kBlockThreadsSmall : kBlockThreadsLarge;
      break;
    default: {  // kSplit
      plan.path = KdPath::kSplit;
      plan.threads = kSplitThreads;
      if (splits < 1) splits = 2;
      if (splits > cols) splits = cols;
      // Chunks of a whole number of vectors keep every chunk of an aligned row aligned.
      plan.chunk = kd_ceil_div(kd_ceil_div(cols, splits), vec) * vec;
      plan.splits = kd_ceil_div(cols, plan.chunk);
      plan.workspace_floats = rows * plan.splits * (kStatsFloats + (mixture ? kTermsFloats : 0));
      break;
    }
  }
  return plan;
}

// One call of kd_loss_fwd for the launcher: device pointers and the op's arguments.
struct KdLaunch {
  const void* student;        // [rows, cols] contiguous, of the launch's dtype
  const void* teacher;
  const bool* mask;           // [rows] or nullptr
  const int64_t* labels;      // [rows] or nullptr: no hard-label term
  const float* scales;        // device float32 [2]: the reduction's factors (kd, ce)
  float* loss_rows;           // [rows]: each row's loss with its factors (0 where masked)
  void* grad_student;         // [rows, cols] of dtype, or nullptr: not wanted
  void* grad_teacher;         // likewise (nullptr: no teacher gradient is computed)
  float* workspace;           // plan.workspace_floats floats of device memory (nullptr when 0)
  int64_t workspace_floats;
  int64_t rows, cols, ignore_index;
  double temperature, beta, alpha;
  int divergence;             // kd_math.h's code
  KdFaultRecord* fault;       // device record of the first bad label (kd_faults.h), or nullptr
};

// Launches kd_loss_fwd on `stream` (asynchronous): per row the loss of kd_math.h,
// alpha*kd_scale*T^2*D + (1-alpha)*ce_scale*CE, and its gradients, written in the same pass.
// A label outside [0, cols) that is not ignore_index makes its row NaN (never an out-of-bounds
// read) and is recorded in *fault. Returns nullptr on success, else an error message (static).
const char* launch_kd_loss_fwd(const KdPlan& plan, KdDType dtype, const KdLaunch& a,
                               cudaStream_t stream);

}  // namespace kd_cuda
}  // namespace kdplug
