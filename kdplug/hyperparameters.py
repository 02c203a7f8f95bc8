"""The checks of the distillation hyperparameters T and α, in one place for the op, the losses
and the run's config: each caller says who is asking and where the value came from, and gets the
same rule and the same message."""
from __future__ import annotations

import math
from typing import Any

from .errors import KdplugError

__all__ = ["check_temperature", "check_alpha", "HyperparameterTypeError"]


class HyperparameterTypeError(KdplugError, TypeError):
    """T or α is not a number at all (a string, a bool, None)."""


def _number(name: str, value: Any, expected: str, prefix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HyperparameterTypeError(f"{prefix}{name} must be {expected}, got "
                                      f"{type(value).__name__} {value!r}")
    return float(value)


def check_temperature(value: Any, *, prefix: str = "", source: str = "") -> float:
    """T as a float; raises unless it is a finite number > 0.

    ``prefix`` names the caller (``"kd_kl_div: "``), ``source`` where the value came from
    (``" (in run.toml)"``). A non-number is a :class:`HyperparameterTypeError` (a TypeError),
    a bad number a KdplugError (a ValueError).
    """
    temperature = _number("temperature", value, "a number", prefix)
    if not math.isfinite(temperature) or temperature <= 0:
        raise KdplugError(f"{prefix}temperature must be finite and > 0, got {temperature}{source} "
                          "(T softens the logits as softmax(logits/T); T=1 is the plain softmax, "
                          "2..8 is usual for distillation)")
    return temperature


def check_alpha(value: Any, *, prefix: str = "", source: str = "") -> float:
    """α as a float; raises unless 0 <= α <= 1 (NaN included)."""
    alpha = _number("alpha", value, "a number in [0, 1]", prefix)
    if not 0.0 <= alpha <= 1.0:
        raise KdplugError(f"{prefix}alpha must be in [0, 1], got {alpha}{source} "
                          "(loss = alpha*kd + (1-alpha)*ce: alpha=1 is soft targets only, "
                          "alpha=0 is hard labels only)")
    return alpha
