"""How kdplug's native op is compiled: shared by setup.py and the JIT build (kdplug/_ext.py).

setup.py loads this file by path, without importing kdplug: it must import nothing but the
standard library.
"""
from __future__ import annotations

from typing import Dict, List

CAPABILITIES = ("default", "avx2", "avx512")  # worst to best; the indices of csrc/cpu_dispatch.h

# The kernel files (csrc/cpu/*.cpp) are compiled once per capability. KD_CPU_CAPABILITY_* puts
# kdplug's code in the capability's namespace and kernel-table slot (csrc/kd_namespace.h);
# CPU_CAPABILITY* picks ATen's matching at::vec implementation. The -m flags stay within the CPU
# features csrc/cpu_dispatch.cpp checks before it selects a capability.
CPU_CAPABILITY_FLAGS: Dict[str, List[str]] = {
    "default": ["-DKD_CPU_CAPABILITY_DEFAULT", "-DCPU_CAPABILITY=DEFAULT",
                "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DKD_CPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2",
             "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DKD_CPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512"],
}

CXX_FLAGS = ["-O3", "-fopenmp"]  # no -march: the capability flags above are the only ISA flags
LINK_FLAGS = ["-fopenmp"]

# GPU architectures when TORCH_CUDA_ARCH_LIST is unset: SASS for these (8.0 also runs on 8.6 and
# 8.9) and PTX of the last, which the driver compiles for newer GPUs at first load.
PORTABLE_CUDA_ARCHS = ("8.0", "9.0")


def cpu_capabilities_to_build(machine: str) -> List[str]:
    """Every capability on x86-64; the baseline alone elsewhere (aarch64, ...)."""
    return list(CAPABILITIES) if machine.lower() in ("x86_64", "amd64") else ["default"]


def cuda_arch_list(visible: List[str], nvcc_archs: List[str]) -> str:
    """TORCH_CUDA_ARCH_LIST for a build: the portable list plus the visible GPUs' architectures
    that nvcc can compile for ("8.6"; nvcc_archs like "compute_86", empty if unknown), with PTX."""
    archs = set(PORTABLE_CUDA_ARCHS)
    for arch in visible:
        if not nvcc_archs or "compute_" + arch.replace(".", "") in nvcc_archs:
            archs.add(arch)
    ordered = sorted(archs, key=lambda a: tuple(int(p) for p in a.split(".")))
    return ";".join(ordered) + "+PTX"
