"""A published method as one loss: the ``base`` logit loss plus the method's own term."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from ..errors import KdplugError
from ..feature_losses import create_base_loss, hold_base_loss

__all__ = ["MethodLoss", "check_weight"]


def check_weight(name: str, value: Any) -> float:
    """A loss weight as a float; a clear error unless it is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
            or value == float("inf"):
        raise KdplugError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class MethodLoss(nn.Module):
    """``base(student_out, teacher_out, batch) + term(student_out, teacher_out, batch)``.

    base: a registered logit loss built with the same temperature and alpha (``"ce"``, the
        published recipes' cross-entropy on the labels; ``"kd+ce"``; ``"none"``); options this
        loss does not know go to it.
    term: the method's own loss (it carries its weights), an ``nn.Module`` with ``requires``.

    ``set_epoch(epoch)`` (0-based; the engine calls it at the start of every epoch) reaches the
    parts that change with the epoch, such as DKD's warm-up. After each call ``last_terms`` holds
    every part's value (a detached tensor), for logging.
    """

    def __init__(self, method: str, term: nn.Module, *, base: Optional[str] = "ce",
                 temperature: float = 4.0, alpha: float = 0.9, **base_options: Any) -> None:
        super().__init__()
        try:
            base_loss = create_base_loss(base, temperature, alpha, base_options)
        except KdplugError as exc:
            raise KdplugError(
                f"loss {method!r}: {exc} (options {method!r} does not know go to its base loss "
                f"{base!r}; its own options: {', '.join(term.option_names)}, base, temperature, "
                f"alpha)") from None
        self.method = method
        self.base_name = None if base_loss is None else base
        hold_base_loss(self, base_loss)
        self.term = term
        self.requires = frozenset(set(getattr(base_loss, "requires", ()) or ())
                                  | set(getattr(term, "requires", ())))
        self.uses_teacher = True
        self.last_terms: Dict[str, torch.Tensor] = {}

    @property
    def base_loss(self):
        return self.base if self.base is not None else getattr(self, "_base_fn", None)

    def set_epoch(self, epoch: int) -> None:
        """Tell the parts of this loss that follow the epoch (0-based) which one begins."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise KdplugError(f"set_epoch takes the 0-based epoch, an int >= 0; got "
                                     f"{epoch!r}")
        for part in (self.base_loss, self.term):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def forward(self, student_out: Any, teacher_out: Any, batch: Any) -> torch.Tensor:
        terms: Dict[str, torch.Tensor] = {}
        if self.base_loss is not None:
            terms[self.base_name] = self.base_loss(student_out, teacher_out, batch)
        terms[self.method] = self.term(student_out, teacher_out, batch)
        total = None
        for value in terms.values():
            total = value if total is None else total + value
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return total

    def extra_repr(self) -> str:
        return f"method={self.method!r}, base={self.base_name!r}"
