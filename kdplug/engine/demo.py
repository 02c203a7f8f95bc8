"""`kdplug demo`: the CNN pair on scikit-learn's digits, teacher + scratch + distilled student.

The settings below were chosen by measurement (benchmarks/bench_digits.py runs them over several
seeds): digits at their native 8×8, a "patient" schedule of 40 epochs per phase, T=8, α=0.9.
Short schedules let the student trained alone catch up with a distilled one on a task this easy;
long ones let the teacher's soft targets pay off.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

DEMO_CONFIG: Dict[str, Any] = {
    "teacher": "cnn-teacher",
    "student": "cnn-student",
    "data": "digits",
    "loss": "kd+ce",
    "temperature": 8.0,
    "alpha": 0.9,
    "epochs": 40,
    "teacher_epochs": 40,
    "batch_size": 64,
    "lr": 1e-3,
    "baseline": True,
    "seed": 0,
    # One CPU thread: these models are small enough that a second thread buys little, and a
    # single thread stays fast on a busy machine, where OpenMP threads waiting on each other
    # can slow small steps down by an order of magnitude.
    "threads": 1,
}

DEMO_SUMMARY = ("kdplug demo: scikit-learn's handwritten digits (1x8x8, 10 classes), the CNN "
                "teacher and student of the CIFAR-10 plugin;\nteacher 40 epochs on labels, then "
                "the student 40 epochs distilled (kd+ce, T=8, alpha=0.9) and 40 epochs alone "
                "(scratch).")


def run_demo(out: Optional[str] = None, seed: Optional[int] = None, device: Optional[str] = None,
             quiet: Optional[bool] = None, **overrides: Any):
    """Runs the demo into ``out`` (default ``runs/demo``, replacing an earlier demo there)."""
    from .run import distill

    options = {**DEMO_CONFIG, **{k: v for k, v in overrides.items() if v is not None}}
    if seed is not None:
        options["seed"] = seed
    return distill(out=out or "runs/demo", overwrite=True, device=device, quiet=quiet, **options)
