"""The divergences of kdplug's fused ops in pure PyTorch, for the fallback paths (dense and top-k).
They follow csrc/kd_math.h: the same per-class terms, 0·log 0 = 0, and a teacher probability of 0
where the student has mass makes reverse_kl infinite."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _safe(log_prob: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """log_prob where weight > 0, else 0: keeps 0·(−inf) out of values and gradients."""
    return torch.where(weight > 0, log_prob, torch.zeros((), dtype=log_prob.dtype,
                                                         device=log_prob.device))


def _log_mixture(log_a, log_b, beta: float) -> torch.Tensor:
    """log(β·a + (1 − β)·b) from the logs, exact where either underflows."""
    return torch.logaddexp(log_a + math.log(beta), log_b + math.log1p(-beta))


def divergence_rows(p, q, log_p, log_q, divergence: str, beta: float) -> torch.Tensor:
    """Σ over the last dimension of the divergence's terms between teacher p and student q."""
    if divergence == "kl":
        terms = p * (_safe(log_p, p) - _safe(log_q, p))
    elif divergence == "reverse_kl":
        terms = q * (_safe(log_q, q) - _safe(log_p, q))
    elif divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        terms = (beta * p * (_safe(log_p, p) - _safe(log_m, p))
                 + (1 - beta) * q * (_safe(log_q, q) - _safe(log_m, q)))
    elif divergence == "tvd":
        terms = 0.5 * (p - q).abs()
    elif divergence == "skew_kl":
        log_m = _log_mixture(log_p, log_q, beta)
        terms = p * (_safe(log_p, p) - _safe(log_m, p))
    elif divergence == "skew_reverse_kl":
        log_m = _log_mixture(log_q, log_p, beta)
        terms = q * (_safe(log_q, q) - _safe(log_m, q))
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return terms.sum(-1)


def hard_label_rows(student, labels, ignore_index: int, acc: torch.dtype) -> torch.Tensor:
    """Per-row cross-entropy at T = 1 (0 where the label is ignore_index)."""
    classes = student.shape[-1]
    return F.cross_entropy(student.reshape(-1, classes).to(acc), labels.reshape(-1).long(),
                           ignore_index=ignore_index, reduction="none").reshape(labels.shape)


def combine_rows(kd_rows, ce_rows, labels, alpha: float, ignore_index: int, reduction: str,
                 mask) -> torch.Tensor:
    """α·kd + (1 − α)·ce with each term reduced over its own rows: the counted rows for kd, the
    counted rows with a label for ce (kd_rows, ce_rows, labels: the counted rows only)."""
    from ._op_support import reduce_rows

    if ce_rows is None:
        return reduce_rows(kd_rows, reduction, mask)
    if reduction == "none":
        return reduce_rows(alpha * kd_rows + (1 - alpha) * ce_rows, reduction, mask)
    if reduction == "sum":
        return alpha * kd_rows.sum() + (1 - alpha) * ce_rows.sum()
    labelled = (labels != ignore_index).sum().clamp_min(1)
    return alpha * reduce_rows(kd_rows, reduction, mask) + (1 - alpha) * ce_rows.sum() / labelled
