"""Built-in loss providers: ``ce``, ``kd`` and ``kd+ce`` (the default).

A loss is a callable ``loss(student_out, teacher_out, batch) -> scalar tensor``:

- ``student_out``/``teacher_out`` are :class:`kdplug.outputs.ModelOutput` (plain logits tensors are
  accepted too); logits are ``[B, C]`` for classification or ``[B, L, V]`` for language models.
- ``batch`` is the batch dict: ``"inputs"``, ``"labels"`` (``-100`` marks tokens that count for
  nothing) and optionally ``"attention_mask"`` (bool, True = real token).

The losses here are small ``nn.Module``\\ s without parameters. A loss *with* parameters (say a
learned projection for feature hints) is written the same way: the engine moves it to the device,
trains its parameters with the student's optimizer and keeps its ``state_dict`` in checkpoints. A
loss that needs intermediate outputs sets ``requires = {"hidden_states"}`` and/or
``{"attentions"}``; the engine then asks the models for them.

Every factory takes the engine's ``temperature=`` and ``alpha=`` (and ignores what it does not use).

``kd`` and ``kd+ce`` take ``divergence`` (``kl``, the default, ``reverse_kl``, ``jsd``, ``tvd``,
``skew_kl``, ``skew_reverse_kl``; see :func:`kdplug.ops.kd_loss`) and ``beta`` (jsd's and the
skews' mixing weight), e.g. ``--loss-option divergence=jsd --loss-option beta=0.5``. ``kd+ce``
computes both terms in one fused pass (:func:`kdplug.ops.kd_loss` with labels). Both also take a
top-k teacher (from a top-k teacher cache: ``teacher_out.extras["topk"] = (indices, logprobs)``)
through :func:`kdplug.ops.kd_loss_topk`; their option ``rest`` ("renormalize" or "bucket") says
how the teacher's mass outside its top k is treated there. Their option ``fused_linear``
("auto", the default, "on" or "off") computes them on the models' final hidden states and output
heads, chunk by chunk of tokens (:func:`kdplug.ops.fused_linear_kd`), so a language model's
[tokens, vocabulary] logits are never held; "auto" does so when both models can
(:mod:`kdplug.output_head`) and says once in the log when a language model cannot.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cache.targets import teacher_topk
from .errors import KdplugError
from .hookspecs import hookimpl
from .hyperparameters import check_alpha, check_temperature
from .output_head import REQUIREMENT as OUTPUT_HEAD
from .output_head import head_of, missing_output_head
from .outputs import as_model_output

IGNORE_INDEX = -100
FUSED_LINEAR = ("auto", "on", "off")

__all__ = ["CrossEntropyLoss", "KDLoss", "KDCrossEntropyLoss", "check_temperature", "check_alpha",
           "cross_entropy", "token_mask", "register_losses"]


def _logits(out: Any) -> torch.Tensor:
    return as_model_output(out).logits


def token_mask(logits: torch.Tensor, batch: Dict[str, Any]) -> Optional[torch.Tensor]:
    """For [B, L, V] logits: the bool [B, L] mask of counted tokens, or None (count every row).

    Tokens count where ``labels != -100`` (when labels are shaped like the tokens) and where
    ``attention_mask`` is True (when the batch has one).
    """
    if logits.dim() < 3:
        return None
    rows = logits.shape[:-1]
    mask = None
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.shape == rows:
        mask = labels != IGNORE_INDEX
    attention = batch.get("attention_mask")
    if isinstance(attention, torch.Tensor) and attention.shape == rows:
        attention = attention.to(device=logits.device, dtype=torch.bool)
        mask = attention if mask is None else mask & attention
    return mask


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over counted rows ([B, L, V] logits, [B, L] labels; -100 ignored)."""
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    if labels.numel() != logits.shape[0]:
        raise KdplugError(
            f"cross-entropy: {logits.shape[0]} rows of logits but {labels.numel()} labels")
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


class CrossEntropyLoss(nn.Module):
    """Hard labels only: CE(student, labels). The teacher output is not used."""

    requires: frozenset = frozenset()
    uses_teacher = False

    def __init__(self, temperature: float = 1.0, alpha: float = 0.0, **options: Any) -> None:
        super().__init__()
        _no_options("ce", options)

    def forward(self, student_out: Any, teacher_out: Any, batch: Dict[str, Any]) -> torch.Tensor:
        return cross_entropy(_logits(student_out), batch["labels"])


class KDLoss(nn.Module):
    """Soft targets only: T²·D(softmax(t/T), softmax(s/T)) through kdplug.ops.kd_loss (or
    kd_loss_topk for a top-k teacher, with ``rest`` "renormalize" or "bucket"); D is KL(p ‖ q)
    unless ``divergence`` names another."""

    requires: frozenset = frozenset()
    uses_teacher = True
    supports_topk_teacher = True

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, *, backend: str = "auto",
                 rest: str = "renormalize", divergence: str = "kl", beta: float = 0.5,
                 fused_linear: Any = "auto", **options: Any) -> None:
        super().__init__()
        _no_options("kd", options)
        self.temperature = check_temperature(temperature)
        self.backend = backend
        self.rest = _check_rest(rest)
        self.divergence, self.beta = _check_divergence(divergence, beta)
        if isinstance(fused_linear, bool):  # fused_linear=true in a TOML config
            fused_linear = "on" if fused_linear else "off"
        if fused_linear not in FUSED_LINEAR:
            raise KdplugError(f"fused_linear must be one of {', '.join(FUSED_LINEAR)}, got "
                              f"{fused_linear!r}")
        self.fused_linear = fused_linear

    def configure_models(self, student: nn.Module, teacher: Optional[nn.Module] = None,
                         cached_teacher: bool = False, sharded: bool = False) -> Optional[str]:
        """The engine's hook, once the models are known: with fused_linear on (or auto and both
        models able) the loss requires the models' output heads instead of their logits.
        ``sharded``: the models' parameters are sharded across processes (``--strategy fsdp``).
        Returns what was chosen when it is worth a log line."""
        self.requires = frozenset()
        if self.fused_linear == "off" or getattr(self, "alpha", 1.0) == 0.0:
            return None
        # FSDP2 gathers a unit's parameters in that unit's forward hooks: reading the final
        # hidden states and the head's weight outside the model's forward would see shards.
        why = "the models are sharded (--strategy fsdp)" if sharded else None
        why = why or missing_output_head(student)
        if why is None and not cached_teacher:  # a cached teacher comes as logits or top-k
            why = missing_output_head(teacher)
        if why is None:
            self.requires = frozenset({OUTPUT_HEAD})
            return "fused linear head: logits computed chunk by chunk of tokens"
        if self.fused_linear == "on":
            raise KdplugError(f"fused_linear=on, but {why}; use fused_linear=auto or off")
        if callable(getattr(student, "get_output_embeddings", None)):  # a language model
            return f"fused linear head off: {why}; the loss takes full logits"
        return None

    def soft_target(self, student_logits: torch.Tensor, teacher_out: Any, batch: Dict[str, Any],
                    alpha: float = 1.0) -> torch.Tensor:
        """The soft term against a teacher output (dense logits, or a top-k teacher), fused with
        the hard-label term α·soft + (1 − α)·CE when α < 1, in one pass."""
        labels = None if alpha == 1.0 else _labels_for(student_logits, batch)
        options = dict(divergence=self.divergence, beta=self.beta, labels=labels, alpha=alpha,
                       mask=token_mask(student_logits, batch), backend=self.backend)
        topk = teacher_topk(teacher_out)
        if topk is None:
            # here, not at the top: listing plugins need not load the compiled op
            from .ops import kd_loss

            teacher_logits = _logits(teacher_out)
            if teacher_logits.dtype != student_logits.dtype:  # e.g. one model outside autocast
                teacher_logits = teacher_logits.to(student_logits.dtype)
            return kd_loss(student_logits, teacher_logits.detach(), self.temperature, **options)
        from .ops import kd_loss_topk

        indices, logprobs = topk
        return kd_loss_topk(student_logits, indices, logprobs.detach(), self.temperature,
                            rest=self.rest, **options)

    def fused_target(self, student_head, teacher_out: Any, batch: Dict[str, Any],
                     alpha: float = 1.0) -> torch.Tensor:
        """soft_target computed from the student's final hidden states and head, chunk by chunk
        (the teacher as hidden states and head too, or as a cache's logits or top-k)."""
        from .ops import fused_linear_kd

        hidden = student_head.hidden
        labels = None if alpha == 1.0 else _labels_for(hidden, batch)
        teacher_head, topk = head_of(teacher_out), teacher_topk(teacher_out)
        if teacher_head is not None:
            teacher = dict(teacher_hidden=teacher_head.hidden, teacher_weight=teacher_head.weight,
                           teacher_bias=teacher_head.bias)
        elif topk is not None:
            teacher = dict(teacher_topk=topk, rest=self.rest)
        else:
            teacher = dict(teacher_logits=_logits(teacher_out))
        return fused_linear_kd(hidden, student_head.weight, student_bias=student_head.bias,
                               labels=labels, temperature=self.temperature, alpha=alpha,
                               divergence=self.divergence, beta=self.beta,
                               mask=token_mask(hidden, batch), backend=self.backend, **teacher)

    def forward(self, student_out: Any, teacher_out: Any, batch: Dict[str, Any]) -> torch.Tensor:
        student_head = head_of(student_out)
        if student_head is not None:
            return self.fused_target(student_head, teacher_out, batch)
        return self.soft_target(_logits(student_out), teacher_out, batch)

    def extra_repr(self) -> str:
        from ._op_support import BETA_DIVERGENCES

        beta = f", beta={self.beta:g}" if self.divergence in BETA_DIVERGENCES else ""
        return f"temperature={self.temperature:g}, divergence={self.divergence}{beta}"


class KDCrossEntropyLoss(KDLoss):
    """α·T²·D(softmax(t/T), softmax(s/T)) + (1−α)·CE(s, y), both terms in one fused pass:
    Hinton et al. (2015) with D = KL(p ‖ q)."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, *, backend: str = "auto",
                 rest: str = "renormalize", divergence: str = "kl", beta: float = 0.5,
                 fused_linear: str = "auto", **options: Any) -> None:
        _no_options("kd+ce", options)
        super().__init__(temperature, backend=backend, rest=rest, divergence=divergence,
                         beta=beta, fused_linear=fused_linear)
        self.alpha = check_alpha(alpha)

    def forward(self, student_out: Any, teacher_out: Any, batch: Dict[str, Any]) -> torch.Tensor:
        student_head = head_of(student_out)
        if student_head is not None:
            return self.fused_target(student_head, teacher_out, batch, alpha=self.alpha)
        student_logits = _logits(student_out)
        if self.alpha == 0.0:  # hard labels only: the teacher's output is not read
            return cross_entropy(student_logits, batch["labels"])
        return self.soft_target(student_logits, teacher_out, batch, alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha:g}"


def _labels_for(logits: torch.Tensor, batch: Dict[str, Any]) -> torch.Tensor:
    """The batch's labels shaped like the logits' rows."""
    labels = batch["labels"]
    rows = logits.shape[:-1]
    if labels.shape != rows:
        if labels.numel() != math.prod(rows):
            raise KdplugError(f"cross-entropy: {math.prod(rows)} rows of logits but "
                                     f"{labels.numel()} labels")
        labels = labels.reshape(rows)
    return labels


def _check_divergence(divergence: Any, beta: Any):
    """The op's own check (one rule for the op and the losses), as a configuration error."""
    from ._op_support import check_divergence

    try:
        return divergence, check_divergence("loss option", divergence, beta)
    except (TypeError, ValueError) as exc:
        raise KdplugError(str(exc)) from None


def _no_options(name: str, options: Dict[str, Any]) -> None:
    if options:
        raise KdplugError(
            f"loss {name!r} takes no option(s) {', '.join(map(repr, sorted(options)))}; "
            f"its options are temperature, alpha, backend, rest, divergence, beta and "
            f"fused_linear")


def _check_rest(rest: Any) -> str:
    if rest not in ("renormalize", "bucket"):
        raise KdplugError(
            f"rest must be 'renormalize' or 'bucket', got {rest!r} (how a top-k teacher's mass "
            "outside its k classes is treated; see kdplug.ops.kd_loss_topk)")
    return rest


@hookimpl
def register_losses(register):
    register("ce", CrossEntropyLoss,
             description="cross-entropy on the hard labels only (a student trained alone)")
    register("kd", KDLoss,
             description="T²·KL(softmax(t/T) ‖ softmax(s/T)) on the teacher's soft targets "
                         "(option divergence: reverse_kl, jsd, tvd, skew_kl, skew_reverse_kl)")
    register("kd+ce", KDCrossEntropyLoss,
             description="α·kd + (1−α)·ce in one fused pass, Hinton et al. 2015 (the default)")
