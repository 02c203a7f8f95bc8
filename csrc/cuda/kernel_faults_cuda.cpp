// One fault record per GPU (kd_faults.h), its asynchronous copies to the host, and the check that
// turns a recorded fault into kernel_faults::raise's error. Timing rule: a fault surfaces at the
// first op call (or check_kernel_faults(wait=False)) that finds the copy made after the faulting
// launch arrived, at the latest at check_kernel_faults() (wait=True), which waits for the GPU.
#include "cuda/kernel_faults_cuda.h"

#include <memory>
#include <mutex>
#include <vector>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernel_faults.h"

namespace kdplug {
namespace kernel_faults {
namespace {

// Allocated at a device's first launch and kept for the life of the process (48 bytes each).
struct DeviceRecord {
  KdFaultRecord* device = nullptr;  // what the kernels write (atomicCAS on code)
  KdFaultRecord* host = nullptr;    // pinned: where the copies land
  cudaEvent_t copied = nullptr;     // recorded behind the last copy
  bool copy_in_flight = false;      // a copy is queued and not yet seen complete
};

std::mutex g_mutex;  // guards records() and every DeviceRecord

std::vector<DeviceRecord>& records() {
  static std::vector<DeviceRecord> r(static_cast<size_t>(c10::cuda::device_count()));
  return r;
}

DeviceRecord& record_of(int device) {
  std::vector<DeviceRecord>& r = records();
  TORCH_CHECK(device >= 0 && static_cast<size_t>(device) < r.size(),
              "kdplug kernel faults: bad CUDA device index ", device);
  return r[static_cast<size_t>(device)];
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

void allocate(DeviceRecord& r, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaMalloc(&r.device, sizeof(KdFaultRecord)));
  // On the launch's stream: ordered before the kernel about to use it.
  C10_CUDA_CHECK(cudaMemsetAsync(r.device, 0, sizeof(KdFaultRecord), stream));
  C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&r.host), sizeof(KdFaultRecord),
                               cudaHostAllocDefault));
  *r.host = KdFaultRecord{kFaultNone, 0, 0, 0, 0, 0};
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&r.copied, cudaEventDisableTiming));
}

// Clears the record on both sides; the device's clear is ordered on `stream`.
void clear(DeviceRecord& r, cudaStream_t stream) {
  r.host->code = kFaultNone;
  C10_CUDA_CHECK(cudaMemsetAsync(r.device, 0, sizeof(KdFaultRecord), stream));
}

// The fault in a copy that has arrived (and clears it); false when none, or the copy is still on
// its way. Never waits.
bool take_arrived_fault(DeviceRecord& r, cudaStream_t stream, KdFaultRecord* fault) {
  if (!r.copy_in_flight) return false;
  const cudaError_t e = cudaEventQuery(r.copied);
  if (e == cudaErrorNotReady) {
    (void)cudaGetLastError();  // not an error: drop it, as c10's event query does
    return false;
  }
  C10_CUDA_CHECK(e);
  r.copy_in_flight = false;
  if (r.host->code == kFaultNone) return false;
  *fault = *r.host;
  clear(r, stream);
  return true;
}

// Waits for every kernel on the device (captured graphs' replays on any stream included), then
// reads the record itself.
bool take_fault_after_sync(DeviceRecord& r, cudaStream_t stream, KdFaultRecord* fault) {
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  r.copy_in_flight = false;
  C10_CUDA_CHECK(cudaMemcpy(r.host, r.device, sizeof(KdFaultRecord), cudaMemcpyDeviceToHost));
  if (r.host->code == kFaultNone) return false;
  *fault = *r.host;
  clear(r, stream);
  return true;
}

void check_devices(bool wait) {
  KdFaultRecord fault{};
  bool found = false;
  {
    const std::lock_guard<std::mutex> lock(g_mutex);
    std::vector<DeviceRecord>& all = records();
    for (size_t d = 0; d < all.size() && !found; ++d) {
      DeviceRecord& r = all[d];
      if (r.device == nullptr) continue;  // no kernel ever ran there
      const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(d));
      const cudaStream_t stream =
          c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(d)).stream();
      if (is_capturing(stream)) continue;  // no reads (nor waits) inside a capture
      found = wait ? take_fault_after_sync(r, stream, &fault)
                   : take_arrived_fault(r, stream, &fault);
    }
  }
  if (found) raise(fault);
}

[[maybe_unused]] const bool g_registered = (set_cuda_checker(&check_devices), true);

}  // namespace

KdFaultRecord* record_for_launch(int device, cudaStream_t stream) {
  KdFaultRecord fault{};
  {
    const std::lock_guard<std::mutex> lock(g_mutex);
    DeviceRecord& r = record_of(device);
    if (is_capturing(stream)) return r.device;
    if (r.device == nullptr) {
      allocate(r, stream);
      return r.device;
    }
    if (!take_arrived_fault(r, stream, &fault)) return r.device;
  }
  raise(fault);
}

void after_launch(int device, cudaStream_t stream) {
  const std::lock_guard<std::mutex> lock(g_mutex);
  DeviceRecord& r = record_of(device);
  if (r.device == nullptr || r.copy_in_flight || is_capturing(stream)) return;
  C10_CUDA_CHECK(cudaMemcpyAsync(r.host, r.device, sizeof(KdFaultRecord), cudaMemcpyDeviceToHost,
                                 stream));
  C10_CUDA_CHECK(cudaEventRecord(r.copied, stream));
  r.copy_in_flight = true;
}

}  // namespace kernel_faults
}  // namespace kdplug
