"""Transfer-set augmentation: what the distillation phase does to a batch before both models see it.

Beyer et al. (2022, "Knowledge distillation: A good teacher is patient and consistent") match
the teacher's function on aggressively augmented inputs that teacher and student see alike;
mixup between training images is their strongest transfer-set augmentation. Here:

- ``none``: the batch as the data set gives it.
- ``mixup``: each input becomes λ·x + (1 − λ)·x', x' another input of the batch, λ ~ Beta(a, a)
  per sample and folded to λ ≥ ½, so a mixed input stays closer to its own image and its label
  still names the larger part (for a loss with a hard-label term). Teacher and student get the
  very same mixed batch; the labels are left as they are.

The draws are a function of (seed, epoch, step, process) only, so a resumed run mixes as the
uninterrupted one. Under torchrun each process mixes within its share of the global batch, so K
processes do not reproduce one process's mixed batches exactly (the unmixed data order they do).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from .errors import KdplugError

if TYPE_CHECKING:  # torch loads when a batch is mixed: the config imports this module
    import torch

__all__ = ["KD_AUGMENTS", "check_kd_augment", "mixup_inputs", "augment_batch"]

KD_AUGMENTS = ("none", "mixup")


def check_kd_augment(kind: Any, mixup_alpha: Any = 1.0) -> str:
    """The augmentation's name; a clear error for an unknown one or a bad mixup_alpha."""
    if kind not in KD_AUGMENTS:
        raise KdplugError(f"kd_augment must be one of {', '.join(KD_AUGMENTS)}, got {kind!r} "
                          "(mixup: teacher and student see the same mixed inputs)")
    if isinstance(mixup_alpha, bool) or not isinstance(mixup_alpha, (int, float)) \
            or not 0 < mixup_alpha < float("inf"):
        raise KdplugError(f"kd_mixup_alpha must be a number > 0, got {mixup_alpha!r} (λ ~ "
                          "Beta(a, a): 1 draws λ uniformly, small values mix little)")
    return kind


def mixup_inputs(inputs: torch.Tensor, alpha: float, seed: int) -> torch.Tensor:
    """Mix each input with another input of the batch (see the module docstring)."""
    import numpy as np
    import torch

    if not torch.is_floating_point(inputs):
        raise KdplugError(f"mixup mixes float inputs (images, features); got {inputs.dtype} "
                          "inputs (token ids cannot be mixed): use kd_augment='none'")
    n = inputs.shape[0]
    rng = np.random.default_rng(seed)
    lam = rng.beta(alpha, alpha, size=n)
    lam = np.maximum(lam, 1.0 - lam)
    partner = torch.as_tensor(rng.permutation(n), device=inputs.device)
    shape = (n,) + (1,) * (inputs.dim() - 1)
    lam_t = torch.as_tensor(lam, dtype=inputs.dtype, device=inputs.device).reshape(shape)
    return lam_t * inputs + (1 - lam_t) * inputs[partner]


def augment_batch(batch: Dict[str, Any], kind: str, *, seed: int,
                  mixup_alpha: float = 1.0) -> Dict[str, Any]:
    """The batch both models see in a distillation step (a new dict; the input is unchanged)."""
    if kind == "none":
        return batch
    return {**batch, "inputs": mixup_inputs(batch["inputs"], mixup_alpha, seed)}
