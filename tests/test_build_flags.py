"""What setup.py and the JIT build compile for (kdplug/_build_flags.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from kdplug import _build_flags as flags

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("machine, expected", [
    ("x86_64", ["default", "avx2", "avx512"]), ("AMD64", ["default", "avx2", "avx512"]),
    ("aarch64", ["default"]), ("ppc64le", ["default"]),
])
def test_every_capability_on_x86_64_and_the_baseline_elsewhere(machine, expected):
    assert flags.cpu_capabilities_to_build(machine) == expected


def test_each_capability_defines_the_namespace_macro_csrc_expects():
    header = (ROOT / "csrc" / "kd_namespace.h").read_text()
    for name, capability_flags in flags.CPU_CAPABILITY_FLAGS.items():
        macro = f"KD_CPU_CAPABILITY_{name.upper()}"
        assert f"-D{macro}" in capability_flags and f"defined({macro})" in header
    assert not any(f.startswith("-m") for f in flags.CPU_CAPABILITY_FLAGS["default"])
    assert not any(f.startswith("-march") for f in flags.CXX_FLAGS)


@pytest.mark.parametrize("visible, nvcc, expected", [
    ([], [], "8.0;9.0+PTX"),
    (["7.5", "8.6"], ["compute_75", "compute_80", "compute_86", "compute_90"], "7.5;8.0;8.6;9.0+PTX"),
    (["12.0"], ["compute_80", "compute_90"], "8.0;9.0+PTX"),  # too new for this nvcc: the PTX
    (["10.0"], [], "8.0;9.0;10.0+PTX"),  # nvcc's list unknown: trust the GPU
])
def test_cuda_architectures_are_portable_and_end_with_ptx(visible, nvcc, expected):
    assert flags.cuda_arch_list(visible, nvcc) == expected
