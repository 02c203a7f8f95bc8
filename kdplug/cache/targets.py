"""Cached teacher targets inside a batch, and the teacher ModelOutput a loss receives from them.

With ``--teacher-cache`` the training loader adds the teacher's targets to each batch dict:

- dense: ``batch["teacher_logits"]``: float32 ``[B, C]`` (or ``[B, L, C]``, zero at padding);
- top-k: ``batch["teacher_topk_indices"]`` int64 and ``batch["teacher_topk_logprobs"]`` float32,
  ``[B, k]`` (or ``[B, L, k]``; padding rows hold classes 0..k-1 at uniform log-probability).

:func:`cached_teacher_output` turns them into the ``teacher_out`` the loss gets: for a dense cache
``ModelOutput(logits=...)``, for a top-k cache ``ModelOutput.extras["topk"] = (indices,
logprobs)`` with an empty ``logits`` ``[..., 0]`` (a loss that reads dense logits fails loudly,
and the engine refuses such a loss with a top-k cache before the first step). ``kd`` and ``kd+ce``
route the top-k form to :func:`kdplug.ops.kd_kl_div_topk`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..outputs import ModelOutput

__all__ = ["DENSE_KEY", "TOPK_KEYS", "TARGET_KEYS", "cached_teacher_output", "teacher_topk"]

DENSE_KEY = "teacher_logits"
TOPK_KEYS = ("teacher_topk_indices", "teacher_topk_logprobs")
TARGET_KEYS = (DENSE_KEY,) + TOPK_KEYS


def cached_teacher_output(batch: Dict[str, Any]) -> Optional[ModelOutput]:
    """The teacher output held by a batch from a cached loader, or None if it holds none."""
    logits = batch.get(DENSE_KEY)
    if isinstance(logits, torch.Tensor):
        return ModelOutput(logits=logits)
    indices, logprobs = batch.get(TOPK_KEYS[0]), batch.get(TOPK_KEYS[1])
    if isinstance(indices, torch.Tensor) and isinstance(logprobs, torch.Tensor):
        empty = logprobs.new_empty((*logprobs.shape[:-1], 0))
        return ModelOutput(logits=empty, extras={"topk": (indices, logprobs)})
    return None


def teacher_topk(teacher_out: Any) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(indices, logprobs) when ``teacher_out`` is a top-k teacher (from a top-k cache)."""
    if isinstance(teacher_out, ModelOutput):
        topk = teacher_out.extras.get("topk")
        if topk is not None:
            return topk
    return None
