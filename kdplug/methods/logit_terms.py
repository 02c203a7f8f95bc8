"""Logit methods: DKD (Zhao et al., CVPR 2022) and DIST (Huang et al., NeurIPS 2022).

Both work on rows of logits: ``[B, C]``, or ``[B, L, V]`` token logits whose rows with label
-100 (or attention_mask False) count for nothing. Sums run in float32 (float64 for float64
inputs).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KdplugError
from ..feature_losses import check_logits_match
from ..hyperparameters import check_temperature
from ..losses import IGNORE_INDEX, token_mask
from ..outputs import as_model_output

from .composite import check_weight

__all__ = ["DKDTerm", "DISTTerm", "dkd_terms", "dist_terms", "counted_rows"]


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def counted_rows(student_out: Any, teacher_out: Any, batch: Dict[str, Any],
                 need_labels: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(student rows [N, C], teacher rows [N, C], labels [N] or None) of the counted positions."""
    check_logits_match(student_out, teacher_out)
    s = as_model_output(student_out).logits
    t = as_model_output(teacher_out).logits.detach()
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if need_labels and not isinstance(labels, torch.Tensor):
        raise KdplugError("this loss needs the batch's labels (batch['labels'])")
    mask = token_mask(s, batch)
    classes = s.shape[-1]
    s, t = s.reshape(-1, classes), t.reshape(-1, classes)
    if labels is not None:
        labels = labels.reshape(-1).to(s.device)
        if labels.numel() != s.shape[0]:
            raise KdplugError(f"{s.shape[0]} rows of logits but {labels.numel()} labels")
        keep = labels != IGNORE_INDEX
        mask = keep if mask is None else mask.reshape(-1) & keep
    if mask is not None:
        mask = mask.reshape(-1)
        s, t = s[mask], t[mask]
        labels = labels[mask] if labels is not None else None
    return s, t, labels


# ----------------------------------------------------------------------------- DKD

def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row: (TCKD, NCKD), both × T².

    With p = softmax(z/T) and g the label: TCKD = KL(b_t ‖ b_s) for the binary b = [p_g, 1 − p_g];
    NCKD = KL(p̂_t ‖ p̂_s) for p̂ = softmax over the other classes only. (Classical KD is
    TCKD + (1 − p_g of the teacher)·NCKD, the paper's Eq. 1.)
    """
    classes = student_logits.shape[-1]
    if classes < 2:
        raise KdplugError(f"DKD needs at least 2 classes, got logits with {classes}")
    acc = _acc(student_logits)
    target = F.one_hot(labels.long(), classes).bool()
    stats = []
    for z in (student_logits.to(acc) / temperature, teacher_logits.to(acc) / temperature):
        log_p = F.log_softmax(z, dim=-1)
        others = z.masked_fill(target, float("-inf"))
        log_p_target = log_p.gather(-1, labels.long()[:, None])[:, 0]
        log_p_rest = torch.logsumexp(others, -1) - torch.logsumexp(z, -1)
        stats.append((torch.stack([log_p_target, log_p_rest], -1), F.log_softmax(others, -1)))
    (log_b_s, log_q_s), (log_b_t, log_q_t) = stats
    scale = temperature * temperature
    tckd = _kl_rows(log_b_t, log_b_s) * scale
    nckd = _kl_rows(log_q_t.masked_fill(target, float("-inf")),
                    log_q_s.masked_fill(target, 0.0)) * scale
    return tckd, nckd


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) per row, with 0·log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


class DKDTerm(nn.Module):
    """warm-up(epoch) · (α·TCKD + β·NCKD), averaged over the counted rows.

    temperature: T (4). tckd_weight: the paper's α (1.0). nckd_weight: β (8.0 for most CIFAR-100
    pairs, 6.0 for wrn_40_2 → wrn_16_2; 0.5 on ImageNet). warmup_epochs: the term's weight grows
    linearly over the first epochs (20): ``min((epoch + 1) / warmup_epochs, 1)`` for the 0-based
    epoch given to ``set_epoch`` (the authors' code counts epochs from 1); 0 turns it off.
    """

    option_names = ("tckd_weight", "nckd_weight", "warmup_epochs")
    requires: frozenset = frozenset()

    def __init__(self, temperature: float = 4.0, tckd_weight: float = 1.0,
                 nckd_weight: float = 8.0, warmup_epochs: int = 20) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.tckd_weight = check_weight("tckd_weight", tckd_weight)
        self.nckd_weight = check_weight("nckd_weight", nckd_weight)
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) \
                or warmup_epochs < 0:
            raise KdplugError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        self.warmup_epochs = warmup_epochs
        self.epoch: Optional[int] = None
        self._warned = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def warmup_factor(self) -> float:
        if self.warmup_epochs == 0:
            return 1.0
        if self.epoch is None:
            if not self._warned:
                self._warned = True
                warnings.warn("DKD's warm-up needs the epoch (loss.set_epoch(epoch)); nothing "
                              "set it, so the term runs at full weight", stacklevel=4)
            return 1.0
        return min((self.epoch + 1) / self.warmup_epochs, 1.0)

    def forward(self, student_out: Any, teacher_out: Any, batch: Dict[str, Any]) -> torch.Tensor:
        s, t, labels = counted_rows(student_out, teacher_out, batch, need_labels=True)
        if s.shape[0] == 0:
            return s.sum() * 0.0
        tckd, nckd = dkd_terms(s, t, labels, self.temperature)
        loss = (self.tckd_weight * tckd + self.nckd_weight * nckd).mean()
        return self.warmup_factor() * loss

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature:g}, tckd_weight={self.tckd_weight:g}, "
                f"nckd_weight={self.nckd_weight:g}, warmup_epochs={self.warmup_epochs}")


# ----------------------------------------------------------------------------- DIST

def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra), both × T²: 1 − the mean Pearson correlation of softmax(z/T) between
    student and teacher, per sample over classes (inter-class) and per class over the batch
    (intra-class)."""
    acc = _acc(student_logits)
    y_s = F.softmax(student_logits.to(acc) / temperature, -1)
    y_t = F.softmax(teacher_logits.to(acc) / temperature, -1)
    scale = temperature * temperature
    inter = (1 - _pearson_rows(y_s, y_t).mean()) * scale
    intra = (1 - _pearson_rows(y_s.t(), y_t.t()).mean()) * scale
    return inter, intra


class DISTTerm(nn.Module):
    """β·inter + γ·intra (DIST: relations, not exact probabilities, from a stronger teacher).

    temperature: τ (the run's temperature, 4 by default; the paper's ImageNet setting is τ = 1).
    inter_weight: β (1.0); intra_weight: γ (1.0), the paper's ImageNet values. Needs at least 2 counted rows for the
    intra-class term to mean anything (it correlates over the batch).
    """

    option_names = ("inter_weight", "intra_weight")
    requires: frozenset = frozenset()

    def __init__(self, temperature: float = 4.0, inter_weight: float = 1.0,
                 intra_weight: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.inter_weight = check_weight("inter_weight", inter_weight)
        self.intra_weight = check_weight("intra_weight", intra_weight)

    def forward(self, student_out: Any, teacher_out: Any, batch: Dict[str, Any]) -> torch.Tensor:
        s, t, _ = counted_rows(student_out, teacher_out, batch, need_labels=False)
        if s.shape[0] == 0:
            return s.sum() * 0.0
        inter, intra = dist_terms(s, t, self.temperature)
        return self.inter_weight * inter + self.intra_weight * intra

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature:g}, inter_weight={self.inter_weight:g}, "
                f"intra_weight={self.intra_weight:g}")
