"""acc += aᵀ @ b for bfloat16/float16 a and b into a float32 acc, in one GEMM, on the CPU.

The fused linear head sums the head's gradient over chunks of tokens in float32. torch's CPU
matmul has no mixed-dtype output, so each chunk's half-precision product had to be written out and
then added into the float32 sum: at V = 128,256, H = 1,024 and 256 tokens per chunk, 134 ms for the
bf16 GEMM and 265 ms for the add (a full read and write of the [V, H] float32 sum). MKL, linked
into torch's x86-64 builds, exports `cblas_gemm_bf16bf16f32` and `cblas_gemm_f16f16f32`, which
accumulate into the float32 output inside the GEMM (145 ms for the same chunk). They are looked up
by name in the loaded libtorch_cpu; where they are absent (aarch64, builds without MKL, other
platforms) `addmm_t_` returns False and the caller keeps its two-step path.

Integer arguments go as 64-bit values: on x86-64 each takes a whole register or stack slot and a
32-bit MKL_INT reads the low half, so one call suits MKL's LP64 and ILP64 interfaces alike. A small
product is checked against torch's once before the first real call.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Callable, Optional

import torch

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_SYMBOLS = {torch.bfloat16: "cblas_gemm_bf16bf16f32", torch.float16: "cblas_gemm_f16f16f32"}


def _library() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        return ctypes.CDLL(path)  # already loaded by `import torch`: the same handle
    except OSError:
        return None


def _raw_gemm(dtype: torch.dtype) -> Optional[Callable]:
    library = _library()
    fn = getattr(library, _SYMBOLS[dtype], None) if library is not None else None
    if fn is None:
        return None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    fn.argtypes = [i64, i64, i64, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64]
    fn.restype = None
    return fn


def _call(fn: Callable, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    # acc[M, N] += a[K, M]ᵀ @ b[K, N], all row-major with unit column stride
    k, m = a.shape
    n = b.shape[1]
    fn(_ROW_MAJOR, _TRANS, _NO_TRANS, m, n, k, 1.0, a.data_ptr(), a.stride(0), b.data_ptr(),
       b.stride(0), 1.0, acc.data_ptr(), acc.stride(0))


@functools.lru_cache(maxsize=None)
def _checked_gemm(dtype: torch.dtype) -> Optional[Callable]:
    fn = _raw_gemm(dtype)
    if fn is None:
        return None
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=generator).to(dtype)
    b = torch.randn(7, 3, generator=generator).to(dtype)
    acc = torch.randn(5, 3, generator=generator)
    expected = acc + a.double().t().mm(b.double()).float()
    _call(fn, acc, a, b)
    return fn if torch.allclose(acc, expected, rtol=1e-5, atol=1e-5) else None


def _fits(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    return (acc.device.type == a.device.type == b.device.type == "cpu"
            and acc.dtype == torch.float32 and a.dtype == b.dtype and a.dtype in _SYMBOLS
            and a.dim() == b.dim() == acc.dim() == 2
            and a.shape[0] == b.shape[0] and acc.shape == (a.shape[1], b.shape[1])
            and a.shape[0] > 0
            and a.stride(1) == b.stride(1) == acc.stride(1) == 1
            and a.stride(0) >= max(1, a.shape[1]) and b.stride(0) >= max(1, b.shape[1])
            and acc.stride(0) >= max(1, acc.shape[1]))


def available(dtype: torch.dtype) -> bool:
    """Whether addmm_t_ can run a dtype's GEMM in one call on this build."""
    return dtype in _SYMBOLS and _checked_gemm(dtype) is not None


def addmm_t_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """acc += aᵀ @ b in one call when this build can (float32 acc; a [K, M] and b [K, N] of one
    half dtype, CPU, rows contiguous); False, with acc untouched, when it cannot."""
    if not _fits(acc, a, b):
        return False
    fn = _checked_gemm(a.dtype)
    if fn is None:
        return False
    _call(fn, acc, a, b)
    return True
