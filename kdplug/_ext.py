"""Finds kdplug's compiled op: the prebuilt extension, else a JIT build with ninja, else nothing.

The outcome is decided once per process and remembered with the reason, so `kdplug doctor` can say
which backend runs and why, and the fallback warns a single time. Once the op is loaded, the copy
of the CPU kernels to run is selected (kdplug/_cpu_capability.py).
"""
from __future__ import annotations

import glob
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import _build_flags, _cpu_capability

FORCE_TORCH_ENV = "KDPLUG_FORCE_TORCH"
NO_JIT_ENV = "KDPLUG_NO_JIT"
OP_NAME = "kdplug::kd_loss_fwd"


@dataclass(frozen=True)
class NativeStatus:
    available: bool
    source: str  # "prebuilt", "jit", "forced-off" or "missing"
    reason: str

    @property
    def devices(self) -> list[str]:
        """Devices with a native kernel registered."""
        if not self.available:
            return []
        return [key.lower() for key in ("CPU", "CUDA")
                if torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key)]


_lock = threading.Lock()
_status: Optional[NativeStatus] = None
_warned = False


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _csrc_dir() -> Optional[Path]:
    """The C++ sources: shipped in the package (kdplug/_csrc), or a checkout's csrc/ beside it."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / "kd_loss.cpp").exists():
            return candidate
    return None


def _jit_build() -> None:
    """Builds the CPU kernels with torch.utils.cpp_extension.load (cached under
    TORCH_EXTENSIONS_DIR), for this host only: one capability, the one KDPLUG_CPU_CAPABILITY
    names or else the best this CPU has, and every file compiled with its flags."""
    from torch.utils import cpp_extension

    csrc = _csrc_dir()
    if csrc is None:
        raise RuntimeError("no C++ sources to build from (kdplug/_csrc, or csrc/ in a checkout)")
    order = _build_flags.CAPABILITIES
    host = _cpu_capability.host_capability()
    requested = os.environ.get(_cpu_capability.ENV, "").strip().lower()
    # Never compile for more than the host runs: every file of this build gets the flags, its
    # static initializers included. A request beyond it is refused with a clear error on load.
    capability = (requested if requested in order and order.index(requested) <= order.index(host)
                  else host)
    sources = sorted(glob.glob(str(csrc / "*.cpp"))) + sorted(glob.glob(str(csrc / "cpu" / "*.cpp")))
    cpp_extension.load(name=f"kdplug_jit_C_{capability}", sources=sources,
                       extra_include_paths=[str(csrc)],
                       extra_cflags=[*_build_flags.CXX_FLAGS,
                                     *_build_flags.CPU_CAPABILITY_FLAGS[capability]],
                       extra_ldflags=_build_flags.LINK_FLAGS, is_python_module=False,
                       verbose=False)


def _find() -> NativeStatus:
    if _env_flag(FORCE_TORCH_ENV):
        return NativeStatus(False, "forced-off", f"{FORCE_TORCH_ENV}=1 forces the PyTorch fallback")
    try:
        from kdplug import _C  # noqa: F401  (importing registers the ops)
        return NativeStatus(True, "prebuilt", "kdplug._C was built at install time")
    except ImportError as prebuilt_error:
        why = f"prebuilt kdplug._C not importable ({prebuilt_error})"
    if _env_flag(NO_JIT_ENV):
        return NativeStatus(False, "missing", f"{why}; JIT build disabled by {NO_JIT_ENV}=1")
    try:
        _jit_build()
        return NativeStatus(True, "jit", f"{why}; built at first use with ninja")
    except Exception as jit_error:  # any build failure means: fall back, and say why
        first_line = str(jit_error).strip().splitlines()[0] if str(jit_error).strip() else ""
        return NativeStatus(False, "missing",
                            f"{why}; JIT build failed ({type(jit_error).__name__}: {first_line})")


def native_status() -> NativeStatus:
    """Whether the compiled op is available, and why (decided once per process).

    Raises CpuCapabilityError when KDPLUG_CPU_CAPABILITY asks for a capability the CPU or the
    build lacks; that outcome is not remembered, so every use of the op says it."""
    global _status
    with _lock:
        if _status is None:
            status = _find()
            if status.available:
                _cpu_capability.select_from_env()
            _status = status
        return _status


def warn_fallback_once(status: NativeStatus) -> None:
    global _warned
    if not _warned and status.source != "forced-off":
        _warned = True
        warnings.warn(f"kdplug: using the PyTorch fallback for the fused KD ops: {status.reason}",
                      RuntimeWarning, stacklevel=3)


def _reset_for_tests() -> None:
    global _status, _warned
    with _lock:
        _status, _warned = None, False
