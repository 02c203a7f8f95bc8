"""What a run returns: a :class:`PhaseResult` per model, in a :class:`DistillResult`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from .config import DistillConfig
from .report import format_table

__all__ = ["PhaseResult", "DistillResult"]


@dataclass
class PhaseResult:
    """One model's outcome: the numbers of report.json plus its history and the trained module."""

    phase: str  # "teacher", "student" (distilled) or "scratch"
    name: str
    params: int
    accuracy: Optional[float]  # None: not available (a teacher cache without its evaluation)
    loss: Optional[float]
    metrics: Dict[str, Any]  # final test metrics (accuracy, loss; perplexity for "lm")
    inference_ms_per_batch: Optional[float]
    epochs: int  # epochs trained (0: loaded or used as built)
    source: str  # "trained", "checkpoint <path>", "as built", "cache <path>"
    train_time_s: float
    history: List[Dict[str, Any]] = field(default_factory=list)
    checkpoint: Optional[str] = None
    model: Optional[nn.Module] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        out = {k: getattr(self, k) for k in ("name", "params", "accuracy", "loss",
                                             "inference_ms_per_batch", "epochs", "source",
                                             "train_time_s", "checkpoint")}
        out.update({k: v for k, v in self.metrics.items() if k not in out})
        return out


@dataclass
class DistillResult:
    """What :func:`kdplug.distill` returns (the same numbers as ``out/report.json``)."""

    teacher: Optional[PhaseResult]  # None: a student trained alone (a loss that uses no teacher)
    student: PhaseResult
    scratch: Optional[PhaseResult]
    config: DistillConfig
    out: Path
    report: Dict[str, Any]

    @property
    def task(self) -> str:
        return self.report["task"]

    @property
    def gain(self) -> Optional[float]:
        """Distilled minus scratch accuracy (None without a baseline)."""
        return None if self.scratch is None else self.student.accuracy - self.scratch.accuracy

    def table(self) -> str:
        """The side-by-side summary the CLI prints."""
        return format_table(self.report)

    def __str__(self) -> str:
        return self.table()
