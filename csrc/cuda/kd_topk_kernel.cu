// CUDA kernel of kdplug::kd_loss_topk_fwd: the student's full row against a teacher known on k
// classes. The arithmetic is kd_math.h's "Top-k teacher" part (topk_teacher, topk_inside_sum,
// topk_row, topk_class_dd, topk_q), called as is, so the CPU tests cover it; this file adds the
// thread layout, a bitmap of the row's top-k classes and the block reductions.
// Only the CUDA runtime is included here (no ATen).
//
// One block per row (grid-stride over rows), 256 threads (C <= 16384) or 512. Per row:
//   1. clear the bitmap; thread 0: topk_teacher (k-sized, sequential); all: max of s (NaN wins)
//   2. set the bits of the k classes (atomicOr; an index outside [0, C) or a repeated one marks
//      the row bad, as does a hard label outside [0, C), and is recorded in the fault record of
//      kd_faults.h); __syncthreads_or
//   3. bad row, or max_x or the teacher's max not finite: loss NaN, gradients NaN
//   4. thread 0: topk_inside_sum; all: sum exp(x - max_x) over the classes whose bit is clear,
//      block sum (and, for a hard-label term at T != 1, the sum of exp(s - max s)) -> thread 0:
//      topk_row (the divergence picked at run time) -> loss, broadcast
//   5. every class: kd_grad*outside_factor*q_c + ce*sigma_c; __syncthreads; the k classes:
//      kd_grad*dD/dx_i + ce*sigma_i; __syncthreads; the hard label's class, minus ce
// Loads and stores are scalar and coalesced (no 16-byte vectors): simple first, see README.md.
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kd_math.h"
#include "cuda/kd_topk_cuda.h"

namespace kdplug {
namespace kd_cuda {
namespace {

// ---- element conversion (torch builds with __CUDA_NO_HALF_CONVERSIONS__: explicit calls) ------

template <typename T>
struct KdTopkConv;

template <>
struct KdTopkConv<float> {
  static __host__ __device__ __forceinline__ float to(float v) { return v; }
  static __host__ __device__ __forceinline__ float from(float v) { return v; }
};

template <>
struct KdTopkConv<__half> {
  static __host__ __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __host__ __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};

template <>
struct KdTopkConv<__nv_bfloat16> {
  static __host__ __device__ __forceinline__ float to(__nv_bfloat16 v) {
    return __bfloat162float(v);
  }
  static __host__ __device__ __forceinline__ __nv_bfloat16 from(float v) {
    return __float2bfloat16_rn(v);
  }
};

// kd_math.h's gathers write acc_t(s[idx[i]]): a 16-bit element must convert to float. This
// wrapper (same size and alignment as the element) gives it that conversion; float needs none.
template <typename T>
struct KdTopkIn {
  T raw;
  __host__ __device__ __forceinline__ operator float() const { return KdTopkConv<T>::to(raw); }
};

template <typename T>
struct KdTopkGather {
  using type = KdTopkIn<T>;
};
template <>
struct KdTopkGather<float> {
  using type = float;
};

static_assert(sizeof(KdTopkIn<__half>) == sizeof(__half) &&
                  alignof(KdTopkIn<__half>) == alignof(__half),
              "the wrapper must share the element's layout");
static_assert(sizeof(KdTopkIn<__nv_bfloat16>) == sizeof(__nv_bfloat16) &&
                  alignof(KdTopkIn<__nv_bfloat16>) == alignof(__nv_bfloat16),
              "the wrapper must share the element's layout");

template <typename T>
struct KdTopkArgs {
  const T* student;
  const int64_t* indices;
  const float* values;
  const bool* mask;        // nullptr: every row counts
  const int64_t* labels;   // nullptr: no hard-label term
  const float* scales;     // device [2]: the reduction's factors (kd, ce)
  float* loss_rows;
  T* grad;                 // nullptr: no gradient wanted
  uint32_t* bitmap_ws;     // kGlobal: grid * words; nullptr for the shared bitmap
  int64_t rows;
  int64_t k;
  int64_t ignore_index;
  int cols;
  int words;               // ceil(cols / 32)
  int divergence;
  double temperature, alpha;
  float inv_t;             // float(1 / T), 1/T in double
  float beta;
  bool bucket;
  bool ce_separate;        // a hard-label term at T != 1: the student's own softmax at T = 1
  KdFaultRecord* fault;    // where the first bad index or label is recorded (or nullptr)
};

// kd_math.h's k-sized parts with the divergence picked at run time (thread 0 runs them).
template <typename G>
__device__ TopkRowT<float> kd_topk_row(int div, const G* s, const int64_t* idx, const float* v,
                                       int64_t k, float inv_t, float max_x, float inside,
                                       float outside, const TopkTeacherT<float>& te, float beta) {
  return with_divergence(div, [&](auto d) {
    return topk_row<decltype(d)::value, float>(s, idx, v, k, inv_t, max_x, inside, outside, te,
                                               beta);
  });
}

__device__ __forceinline__ float kd_topk_class_dd(int div, float x, float v_over_t,
                                                  const TopkTeacherT<float>& te,
                                                  const TopkRowT<float>& r, float beta) {
  return with_divergence(div, [&](auto d) {
    return topk_class_dd<decltype(d)::value>(x, v_over_t, te, r, beta);
  });
}

// ---- block reductions -------------------------------------------------------------------------

// Block-wide max (NaN wins, as kd_max_nan) or sum of one float per thread; every thread gets
// thread 0's result. All THREADS threads must call it. Consecutive calls on the same warp_sh and
// out_sh do not race: a call's warp_sh writes come after the previous call's last __syncthreads,
// which warp 0 reached after reading warp_sh; its out_sh write comes after its own first
// __syncthreads, which every thread reaches only after reading the previous out_sh.
template <int THREADS, bool MAX>
__device__ __forceinline__ float kd_topk_block_reduce(float v, float* warp_sh, float* out_sh) {
  constexpr int kWarps = THREADS / 32;
  static_assert(THREADS % 32 == 0 && kWarps <= 32, "block of 32..1024 threads, whole warps");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_down_sync(0xffffffffu, v, off);
    v = MAX ? kd_max_nan(v, o) : v + o;
  }
  if (lane == 0) warp_sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sh[lane] : (MAX ? -INFINITY : 0.f);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float o = __shfl_down_sync(0xffffffffu, v, off);
      v = MAX ? kd_max_nan(v, o) : v + o;
    }
    if (lane == 0) *out_sh = v;
  }
  __syncthreads();
  return *out_sh;
}

// ---- the kernel -------------------------------------------------------------------------------

// A block of THREADS per row; grid-stride over rows, every thread of the block on the same rows,
// so every __syncthreads below is reached by all (the branches that skip the rest of a row —
// masked, bad or non-finite — are uniform over the block).
// SHARED_BITMAP: the bitmap is the dynamic shared memory (words * 4 bytes), else this block's
// slice of the global workspace.
template <typename T, int THREADS, bool SHARED_BITMAP>
__global__ void __launch_bounds__(THREADS) kd_topk_kernel(const KdTopkArgs<T> a) {
  extern __shared__ __align__(16) uint32_t kd_topk_bitmap_sh[];
  __shared__ float warp_sh[THREADS / 32];
  __shared__ float bcast_sh;
  __shared__ TopkTeacherT<float> te_sh;
  __shared__ TopkRowT<float> res_sh;
  using Conv = KdTopkConv<T>;
  using Gather = typename KdTopkGather<T>::type;

  uint32_t* const bits =
      SHARED_BITMAP ? kd_topk_bitmap_sh : a.bitmap_ws + int64_t(blockIdx.x) * a.words;
  const int tid = threadIdx.x;
  const int cols = a.cols;
  const float inv_t = a.inv_t;
  const TermCoefsT<float> coefs =
      term_coefs<float>(a.temperature, a.alpha, a.scales[0], a.scales[1]);

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    // The previous row's reads of bits, te_sh and res_sh are done before this row writes them.
    __syncthreads();
    const T* s = a.student + row * cols;
    T* g = a.grad != nullptr ? a.grad + row * cols : nullptr;
    const int64_t* idx = a.indices + row * a.k;
    const float* v = a.values + row * a.k;

    if (a.mask != nullptr && !a.mask[row]) {  // the same for the whole block; reads no input
      if (g != nullptr) {
        for (int c = tid; c < cols; c += THREADS) g[c] = Conv::from(0.f);
      }
      if (tid == 0) a.loss_rows[row] = 0.f;
      continue;
    }

    // 1. clear the bitmap; the teacher's side (thread 0); the student's max.
    for (int w = tid; w < a.words; w += THREADS) bits[w] = 0u;
    if (tid == 0) te_sh = topk_teacher<float>(v, a.k, inv_t, a.bucket);
    float m = -INFINITY;
    for (int c = tid; c < cols; c += THREADS) m = kd_max_nan(m, Conv::to(s[c]));
    // Its __syncthreads also order the clearing above before the atomicOr below and publish te_sh.
    m = kd_topk_block_reduce<THREADS, true>(m, warp_sh, &bcast_sh);

    // 2. mark the top-k classes; no index outside [0, cols) is ever dereferenced.
    bool bad = false;
    for (int64_t j = tid; j < a.k; j += THREADS) {
      const int64_t i = idx[j];
      if (i < 0 || i >= cols) {
        bad = true;
        kd_record_fault(a.fault, kFaultIndexOutOfRange, kFaultOpKdLossTopk, row, i, cols,
                        a.ignore_index);
      } else {
        const uint32_t bit = 1u << (static_cast<int>(i) & 31);
        if (atomicOr(&bits[static_cast<int>(i) >> 5], bit) & bit) {  // a repeat
          bad = true;
          kd_record_fault(a.fault, kFaultIndexRepeats, kFaultOpKdLossTopk, row, i, cols,
                          a.ignore_index);
        }
      }
    }
    int label = -1;  // the hard label's column; -2 when out of range
    if (a.labels != nullptr && a.labels[row] != a.ignore_index) {
      label = a.labels[row] >= 0 && a.labels[row] < cols ? static_cast<int>(a.labels[row]) : -2;
      if (label == -2 && tid == 0) {
        kd_record_fault(a.fault, kFaultLabelOutOfRange, kFaultOpKdLossTopk, row, a.labels[row],
                        cols, a.ignore_index);
      }
    }
    bad = __syncthreads_or(bad || label == -2) != 0;  // also: every bit is set before any is read

    // 3. rows that are NaN (as PyTorch's: a NaN or infinite student max or teacher max), or whose
    //    indices or label are invalid (recorded above, raised later by the host: the row must
    //    stay safe meanwhile).
    const TopkTeacherT<float> te = te_sh;
    const float max_x = m * inv_t;  // max(s) * (1/T), as the CPU kernel (= max of s * (1/T))
    if (bad || !isfinite(max_x) || !isfinite(te.max_v)) {
      if (g != nullptr) {
        for (int c = tid; c < cols; c += THREADS) g[c] = Conv::from(NAN);
      }
      if (tid == 0) a.loss_rows[row] = NAN;
      continue;
    }

    // 4. the student's sums: inside (gathered, thread 0) and outside (the clear bits), each on
    //    its own, never outside = total - inside; with a hard-label term at T != 1, also the
    //    student's own sum of exps at T = 1.
    const Gather* sg = reinterpret_cast<const Gather*>(s);
    float inside = 0.f;
    if (tid == 0) inside = topk_inside_sum<float>(sg, idx, a.k, inv_t, max_x);
    float acc = 0.f;
    for (int c = tid; c < cols; c += THREADS) {
      if (((bits[c >> 5] >> (c & 31)) & 1u) == 0u) {
        acc += kd_rescale(Conv::to(s[c]) * inv_t, max_x);
      }
    }
    const float outside = kd_topk_block_reduce<THREADS, false>(acc, warp_sh, &bcast_sh);
    float ce_log_sum = 0.f;
    if (a.ce_separate) {
      float acc_s = 0.f;
      for (int c = tid; c < cols; c += THREADS) acc_s += kd_rescale(Conv::to(s[c]), m);
      ce_log_sum = kd_log(kd_topk_block_reduce<THREADS, false>(acc_s, warp_sh, &bcast_sh));
    }
    if (tid == 0) {
      res_sh = kd_topk_row(a.divergence, sg, idx, v, a.k, inv_t, max_x, inside, outside, te,
                           a.beta);
    }
    __syncthreads();
    const TopkRowT<float> res = res_sh;
    const float ce_max = a.ce_separate ? m : res.max_x;
    if (!a.ce_separate) ce_log_sum = res.log_sum_x;
    const TermCoefsT<float> kc = row_coefs(coefs, label >= 0);
    if (tid == 0) {
      const float ce = label < 0 ? 0.f : (ce_max + ce_log_sum) - Conv::to(s[label]);
      a.loss_rows[row] = kc.kd_loss * res.terms.value + kc.ce * ce;
    }
    if (g == nullptr) continue;

    // 5. gradients: every class as outside the top-k, then (after every thread's writes) the k
    //    teacher classes overwritten, then (after those) the hard label's class.
    auto sigma_of = [&](float sv) {
      return a.ce_separate ? kd_exp((sv - ce_max) - ce_log_sum) : topk_q(sv * inv_t, res);
    };
    const float outside_scale = kc.kd_grad * res.outside_factor;
    for (int c = tid; c < cols; c += THREADS) {
      const float sv = Conv::to(s[c]);
      g[c] = Conv::from(outside_scale * topk_q(sv * inv_t, res) + kc.ce * sigma_of(sv));
    }
    __syncthreads();  // orders the block's writes above before the overwrites below
    for (int64_t j = tid; j < a.k; j += THREADS) {
      const int i = static_cast<int>(idx[j]);  // checked in 2.
      const float sv = Conv::to(s[i]);
      const float dd = kd_topk_class_dd(a.divergence, sv * inv_t, v[j] * inv_t, te, res, a.beta);
      g[i] = Conv::from(kc.kd_grad * dd + kc.ce * sigma_of(sv));
    }
    if (label >= 0) {
      __syncthreads();  // label is uniform over the block
      if (tid == 0) {
        const float sv = Conv::to(s[label]);
        float dd = topk_q(sv * inv_t, res) * res.outside_factor;
        for (int64_t j = 0; j < a.k; ++j) {
          if (idx[j] == label) {
            dd = kd_topk_class_dd(a.divergence, sv * inv_t, v[j] * inv_t, te, res, a.beta);
          }
        }
        g[label] = Conv::from(kc.kd_grad * dd + kc.ce * sigma_of(sv) - kc.ce);
      }
    }
  }
}

// ---- launch -----------------------------------------------------------------------------------

constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr size_t kMaxDefaultSharedBytes = 48 * 1024;  // dynamic shared memory without opt-in

const char* kd_topk_last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <typename T, int THREADS>
const char* kd_topk_launch_threads(const KdTopkPlan& plan, const KdTopkArgs<T>& a,
                                   cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.grid));
  if (plan.bitmap == KdTopkBitmap::kShared) {
    kd_topk_kernel<T, THREADS, true><<<grid, THREADS, plan.shared_bytes, stream>>>(a);
  } else {
    kd_topk_kernel<T, THREADS, false><<<grid, THREADS, 0, stream>>>(a);
  }
  return kd_topk_last_error();
}

template <typename T>
const char* kd_topk_launch_typed(const KdTopkPlan& plan, const KdTopkLaunch& l,
                                 cudaStream_t stream) {
  KdTopkArgs<T> a;
  a.student = static_cast<const T*>(l.student);
  a.indices = l.indices;
  a.values = l.values;
  a.mask = l.mask;
  a.labels = l.labels;
  a.scales = l.scales;
  a.loss_rows = l.loss_rows;
  a.grad = static_cast<T*>(l.grad_student);
  a.bitmap_ws = plan.bitmap == KdTopkBitmap::kGlobal ? reinterpret_cast<uint32_t*>(l.workspace)
                                                     : nullptr;
  a.rows = l.rows;
  a.k = l.k;
  a.ignore_index = l.ignore_index;
  a.cols = static_cast<int>(l.cols);
  a.words = static_cast<int>(plan.bitmap_words);
  a.divergence = l.divergence;
  a.temperature = l.temperature;
  a.alpha = l.labels != nullptr ? l.alpha : 1.0;
  // 1/T in double, rounded once, as on the CPU: 1/0.05 is exactly 20, 1/float(0.05) is not.
  a.inv_t = static_cast<float>(1.0 / l.temperature);
  a.beta = static_cast<float>(l.beta);
  a.bucket = l.rest_bucket;
  a.ce_separate = l.labels != nullptr && l.temperature != 1.0;
  a.fault = l.fault;
  if (plan.threads == kTopkThreadsSmall) {
    return kd_topk_launch_threads<T, kTopkThreadsSmall>(plan, a, stream);
  }
  if (plan.threads == kTopkThreadsLarge) {
    return kd_topk_launch_threads<T, kTopkThreadsLarge>(plan, a, stream);
  }
  return "kd_loss_topk_fwd: bad plan (block size)";
}

}  // namespace

const char* launch_kd_loss_topk_fwd(const KdTopkPlan& plan, KdDType dtype,
                                    const KdTopkLaunch& l, cudaStream_t stream) {
  if (l.rows < 1 || l.cols < 1) return "kd_loss_topk_fwd: empty input";
  if (l.k < 1 || l.k > l.cols) return "kd_loss_topk_fwd: expected 1 <= k <= classes";
  if (l.cols > kMaxCols) return "kd_loss_topk_fwd: the CUDA kernel takes at most 2^30 classes";
  if (l.student == nullptr || l.indices == nullptr || l.values == nullptr ||
      l.scales == nullptr || l.loss_rows == nullptr) {
    return "kd_loss_topk_fwd: null input or output pointer";
  }
  if (!(l.temperature > 0.0) || !(l.temperature < INFINITY)) {
    return "kd_loss_topk_fwd: temperature must be finite and > 0";
  }
  if (l.divergence < 0 || l.divergence >= kNumDivergences) {
    return "kd_loss_topk_fwd: bad divergence";
  }
  if (plan.grid < 1 || plan.grid > kMaxGridX || plan.bitmap_words != kd_ceil_div(l.cols, 32)) {
    return "kd_loss_topk_fwd: bad plan (grid or bitmap size)";
  }
  if (plan.bitmap == KdTopkBitmap::kShared) {
    if (plan.shared_bytes != static_cast<size_t>(plan.bitmap_words) * 4u ||
        plan.shared_bytes > kMaxDefaultSharedBytes) {
      return "kd_loss_topk_fwd: the shared-memory bitmap holds at most 262144 classes";
    }
  } else if (plan.bitmap == KdTopkBitmap::kGlobal) {
    if (l.workspace == nullptr || l.workspace_words < plan.grid * plan.bitmap_words) {
      return "kd_loss_topk_fwd: the global bitmap needs a workspace of grid*ceil(C/32) int32";
    }
  } else {
    return "kd_loss_topk_fwd: bad plan (bitmap place)";
  }
  switch (dtype) {
    case KdDType::kFloat32:
      return kd_topk_launch_typed<float>(plan, l, stream);
    case KdDType::kFloat16:
      return kd_topk_launch_typed<__half>(plan, l, stream);
    case KdDType::kBFloat16:
      return kd_topk_launch_typed<__nv_bfloat16>(plan, l, stream);
  }
  return "kd_loss_topk_fwd: unsupported dtype";
}

}  // namespace kd_cuda
}  // namespace kdplug
