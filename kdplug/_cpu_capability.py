"""Which copy of kdplug's native CPU kernels runs: the best this CPU supports, or the one
KDPLUG_CPU_CAPABILITY names.

The kernel files (csrc/cpu/*.cpp) are compiled once per capability into the same extension
(flags in kdplug/_build_flags.py, C++ side in csrc/cpu_dispatch.h); the choice is made once the
extension is loaded, and can be changed at run time (tests and benchmarks run each capability).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import torch

from ._build_flags import CAPABILITIES
from .errors import KdplugError

ENV = "KDPLUG_CPU_CAPABILITY"


def host_capability() -> str:
    """The best capability of this CPU as ATen sees it: what a JIT build compiles by default."""
    aten = torch.backends.cpu.get_cpu_capability().lower()
    return aten if aten in CAPABILITIES else "default"


class CpuCapabilityError(KdplugError):
    """KDPLUG_CPU_CAPABILITY names a capability that is unknown, unsupported or not compiled."""


@dataclass(frozen=True)
class CpuCapabilities:
    compiled: Tuple[str, ...]  # built into the loaded extension
    supported: Tuple[str, ...]  # runnable on this CPU
    selected: str  # what the kernels run with now
    reason: str  # why that one


def choose(requested: str, compiled: Sequence[str], supported: Sequence[str]) -> Tuple[str, str]:
    """(capability, reason) for KDPLUG_CPU_CAPABILITY's value ("" when unset)."""
    if not requested:
        usable = [c for c in CAPABILITIES if c in compiled and c in supported]
        if not usable:
            raise CpuCapabilityError(f"no CPU capability is both built ({', '.join(compiled)}) "
                                     f"and supported by this CPU ({', '.join(supported)})")
        return usable[-1], "the best this CPU supports among those built"
    where = f"{ENV}={requested}"
    if requested not in CAPABILITIES:
        raise CpuCapabilityError(f"{where}: expected one of {', '.join(CAPABILITIES)}")
    if requested not in supported:
        raise CpuCapabilityError(f"{where}: this CPU does not support {requested}; it supports: "
                                 f"{', '.join(supported)}")
    if requested not in compiled:
        raise CpuCapabilityError(f"{where}: kdplug's native op was built without {requested} "
                                 f"kernels; it has: {', '.join(compiled)} (a JIT build makes "
                                 f"only the capability it was started with)")
    return requested, f"set by {where}"


_reason = ""


def _native_state() -> Tuple[List[str], List[str], str]:
    return torch.ops.kdplug._cpu_capabilities()


def select(name: str, reason: str = "selected in-process") -> None:
    """Runs the CPU kernels with `name` from now on (tests and benchmarks); ValueError if the CPU
    or the build lacks it."""
    global _reason
    torch.ops.kdplug._select_cpu_capability(name)
    _reason = reason


def select_from_env() -> str:
    """Selects the capability KDPLUG_CPU_CAPABILITY asks for, else the best; called once the
    extension is loaded. Raises CpuCapabilityError naming what the CPU and the build have."""
    compiled, supported, _ = _native_state()
    name, reason = choose(os.environ.get(ENV, "").strip().lower(), compiled, supported)
    select(name, reason)
    return name


def current() -> CpuCapabilities:
    """The loaded extension's capabilities; call only once the native op is available."""
    compiled, supported, selected = _native_state()
    return CpuCapabilities(tuple(compiled), tuple(supported), selected, _reason)


def usable() -> List[str]:
    """Capabilities this process can run the kernels with (built and supported), worst first."""
    state = current()
    return [c for c in CAPABILITIES if c in state.compiled and c in state.supported]


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Runs the CPU kernels with `name` inside the block (tests and benchmarks)."""
    before = current()
    select(name, f"selected by {__name__}.use()")
    try:
        yield
    finally:
        select(before.selected, before.reason)
