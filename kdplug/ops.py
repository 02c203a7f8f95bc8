"""kdplug's fused knowledge-distillation losses.

`kd_loss(student_logits, teacher_logits, T, divergence=...)` is, per row of logits shaped [..., C],
T²·D(p, q) with p = softmax(teacher/T), q = softmax(student/T) and D one of kl, reverse_kl, jsd,
tvd, skew_kl, skew_reverse_kl, optionally fused with the hard-label cross-entropy
(α·T²·D + (1 − α)·CE), reduced by `reduction`; `kd_kl_div` is its kl case. `kd_loss_topk` and
`kd_kl_div_topk` take a teacher known on its top-k classes (as a teacher cache stores large
vocabularies). `fused_linear_kd` is kd_loss on `hidden @ headᵀ`, chunk by chunk of tokens, never
holding the [tokens, vocabulary] logits (kdplug/fused_linear.py). The native kernels (csrc/) write the gradient while they compute the loss, so
forward and backward together read each input once and write the gradient once. The pure-PyTorch
paths have the same signatures and numerics, run wherever the compiled op is missing, and are the
test oracles.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from . import _cpu_capability, _ext
from ._dense_op import kd_kl_div, kd_kl_div_reference, kd_loss, kd_loss_reference
from ._op_support import BACKENDS, DIVERGENCES, REDUCTIONS, check_kernel_faults
from ._topk_op import (REST_MODES, kd_kl_div_topk, kd_kl_div_topk_reference, kd_loss_topk,
                       kd_loss_topk_reference)
from .fused_linear import fused_linear_kd, fused_linear_kd_reference

__all__ = ["kd_loss", "kd_loss_reference", "kd_loss_topk", "kd_loss_topk_reference",
           "kd_kl_div", "kd_kl_div_reference", "kd_kl_div_topk", "kd_kl_div_topk_reference",
           "fused_linear_kd", "fused_linear_kd_reference", "DIVERGENCES", "REDUCTIONS", "BACKENDS",
           "REST_MODES", "backend_status", "release_buffers", "check_kernel_faults"]


def release_buffers() -> int:
    """Frees the large CPU gradient buffer the native op keeps for reuse between training steps
    (gradients of 16 MiB up to KDPLUG_CPU_GRAD_CACHE_MAX_MB, default 1024; see docs/op.md,
    Memory) and returns its size in bytes, 0 when none is kept. Call it when training is over
    and the memory is wanted elsewhere; a later large gradient allocates afresh."""
    if _ext._status is None or not _ext._status.available:
        return 0  # the op was never loaded here, so it keeps nothing
    return int(torch.ops.kdplug.release_grad_buffers())


def backend_status() -> dict:
    """Which backend the ops use with backend="auto", and why; for `kdplug doctor`."""
    status = _ext.native_status()
    forced = _ext._env_flag(_ext.FORCE_TORCH_ENV)
    cpu = _cpu_capability.current() if status.available else None
    return {
        "backend": "native" if status.available and not forced else "torch",
        "native_available": status.available,
        "native_source": status.source,
        "native_devices": status.devices,
        "reason": status.reason,
        "force_torch_env": _ext.FORCE_TORCH_ENV,
        "torch_version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # ATen's own kernels
        # the copy of kdplug's CPU kernels in use, why, and what the build and the CPU offer
        "native_cpu_capability": dataclasses.asdict(cpu) if cpu else None,
        "env_overrides": {k: v for k, v in os.environ.items()
                          if k in (_ext.FORCE_TORCH_ENV, _ext.NO_JIT_ENV, _cpu_capability.ENV,
                                   "KDPLUG_CPU_GRAD_CACHE", "KDPLUG_CPU_GRAD_CACHE_MAX_MB")},
    }
