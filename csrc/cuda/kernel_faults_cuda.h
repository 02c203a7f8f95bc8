// The device side of kernel_faults.h: one fault record per GPU that the kd_loss kernels write
// (kd_faults.h), copied back without making the host wait. See README.md here, "Fault record".
#pragma once

#include <cuda_runtime_api.h>

#include "kd_faults.h"

namespace kdplug {
namespace kernel_faults {

// Before a launch on `stream` of `device` (the device current): raises a fault an earlier launch
// recorded if its copy has already reached the host (never waits), then returns the device's
// record for the kernel to write. While `stream` is being captured into a CUDA graph nothing is
// read, copied or allocated: the record of an earlier launch is returned, or nullptr when there
// is none yet (that captured launch then records nothing; its bad rows are still NaN).
KdFaultRecord* record_for_launch(int device, cudaStream_t stream);

// After a launch on `stream`: queues a copy of the record to pinned host memory and an event
// behind it, unless a copy is still on its way (or the stream is capturing).
void after_launch(int device, cudaStream_t stream);

}  // namespace kernel_faults
}  // namespace kdplug
