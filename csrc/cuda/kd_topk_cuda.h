// Host interface of kdplug's CUDA kernel for kd_loss_topk_fwd (kd_topk_kernel.cu).
//
// Free of torch headers, like kd_loss_cuda.h: the .cu compiles against the CUDA runtime alone and
// the torch glue (kd_topk_cuda.cpp) passes raw pointers, the plan and the stream. See README.md.
#pragma once

#include <stdint.h>

#include <cuda_runtime_api.h>

#include "cuda/kd_loss_cuda.h"  // KdDType, kd_ceil_div

namespace kdplug {
namespace kd_cuda {

// Where a block keeps the bitmap of its row's top-k classes (C bits; 1 = in the top-k).
//   kShared: dynamic shared memory, C <= kTopkMaxSharedCols (32 KiB of bits).
//   kGlobal: a slice of a global workspace per block (any C up to kMaxCols); grid capped.
enum class KdTopkBitmap : int { kAuto = 0, kShared = 1, kGlobal = 2 };

constexpr int kTopkThreadsSmall = 256;                  // C <= kTopkSmallCols
constexpr int kTopkThreadsLarge = 512;                  // longer rows
constexpr int64_t kTopkSmallCols = 16384;
constexpr int64_t kTopkMaxSharedCols = int64_t(1) << 18;  // 262144 classes = 32 KiB of bits
constexpr int64_t kTopkGlobalBlocksPerSm = 2;           // kGlobal: grid <= this * SMs
constexpr int64_t kTopkMaxGrid = 0x7fffffff;

struct KdTopkPlan {
  KdTopkBitmap bitmap = KdTopkBitmap::kShared;  // never kAuto
  int threads = 0;                 // threads per block
  int64_t grid = 0;                // blocks; each runs rows blockIdx.x, + grid, + 2*grid, ...
  int64_t bitmap_words = 0;        // 32-bit words of one row's bitmap: ceil(cols / 32)
  size_t shared_bytes = 0;         // dynamic shared memory per block (kShared: the bitmap)
  int64_t workspace_words = 0;     // kGlobal: grid * bitmap_words int32 of device memory, else 0
};

// The launch layout for rows x cols on a GPU with sm_count SMs; `force` picks the bitmap's place
// (tests reach the global path at small sizes). Pure arithmetic: no CUDA call.
inline KdTopkPlan plan_kd_loss_topk_fwd(int64_t rows, int64_t cols, int sm_count,
                                      KdTopkBitmap force = KdTopkBitmap::kAuto) {
  if (rows < 1) rows = 1;
  if (cols < 1) cols = 1;
  const int64_t sms = sm_count > 0 ? sm_count : 1;
  KdTopkPlan plan;
  plan.threads = cols <= kTopkSmallCols ? kTopkThreadsSmall : kTopkThreadsLarge;
  plan.bitmap_words = kd_ceil_div(cols, 32);
  plan.bitmap = force != KdTopkBitmap::kAuto
                    ? force
                    : (cols <= kTopkMaxSharedCols ? KdTopkBitmap::kShared : KdTopkBitmap::kGlobal);
  if (plan.bitmap == KdTopkBitmap::kShared) {
    plan.grid = rows < kTopkMaxGrid ? rows : kTopkMaxGrid;
    plan.shared_bytes = static_cast<size_t>(plan.bitmap_words) * 4u;
    plan.workspace_words = 0;
  } else {
    const int64_t cap = kTopkGlobalBlocksPerSm * sms;
    plan.grid = rows < cap ? rows : cap;
    plan.shared_bytes = 0;
    plan.workspace_words = plan.grid * plan.bitmap_words;
  }
  return plan;
}

// One call of kd_loss_topk_fwd for the launcher: device pointers and the op's arguments.
struct KdTopkLaunch {
  const void* student;      // [rows, cols] contiguous, of the launch's dtype
  const int64_t* indices;   // [rows, k]
  const float* values;      // [rows, k]: the teacher's log-probabilities at T = 1
  const bool* mask;         // [rows] or nullptr
  const int64_t* labels;    // [rows] or nullptr: no hard-label term
  const float* scales;      // device float32 [2]: the reduction's factors (kd, ce)
  float* loss_rows;         // [rows]: each row's loss with its factors (0 where masked)
  void* grad_student;       // [rows, cols] of dtype, or nullptr: not wanted
  int32_t* workspace;       // plan.workspace_words int32 (nullptr when 0)
  int64_t workspace_words;
  int64_t rows, cols, k, ignore_index;
  double temperature, beta, alpha;
  int divergence;           // kd_math.h's code
  bool rest_bucket;
  KdFaultRecord* fault;     // device record of the first bad index or label, or nullptr
};

// Launches kd_loss_topk_fwd on `stream` (asynchronous). A row whose indices leave [0, cols) or
// repeat a class, or whose hard label is outside [0, cols) and not ignore_index, gets a NaN loss
// and NaN gradients (never an out-of-bounds access), and the first such fault is recorded in
// *fault (kd_faults.h). Returns nullptr on success, else an error
// message (static).
const char* launch_kd_loss_topk_fwd(const KdTopkPlan& plan, KdDType dtype, const KdTopkLaunch& l,
                                    cudaStream_t stream);

}  // namespace kd_cuda
}  // namespace kdplug
