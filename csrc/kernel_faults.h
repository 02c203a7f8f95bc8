// Faults the CUDA kernels record on the device (kd_faults.h), raised on the host. Compiled once,
// in every build: the schema's ops call into it, and the CUDA part (cuda/kernel_faults_cuda.cpp),
// when built, registers the check that reads the devices' records.
#pragma once

#include <cstdint>
#include <string>

#include <c10/util/ArrayRef.h>

#include "kd_faults.h"

namespace kdplug {
namespace kernel_faults {

// The error text of a fault, the same whichever device found it.
std::string message(const KdFaultRecord& fault);

// Raises the fault's error, message(fault) (a RuntimeError in Python): the CPU kernels call it at
// the faulting row, the CUDA check with a kernel's record.
[[noreturn]] void raise(const KdFaultRecord& fault);

// kdplug::check_kernel_faults: raises the first fault a kernel recorded on any device, and clears
// it. wait: first wait for every kernel queued on the devices; else only look at records whose
// copy to the host has already arrived. Does nothing in a build without CUDA.
void check(bool wait);

// kdplug::raise_kernel_fault (for tests): raise(record) from its kFaultRecordFields fields.
void raise_fields(c10::ArrayRef<int64_t> fields);

// Called once, when the CUDA part is loaded.
using Checker = void (*)(bool wait);
void set_cuda_checker(Checker checker);

}  // namespace kernel_faults
}  // namespace kdplug
