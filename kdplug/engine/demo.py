"""`kdplug demo`: the showcase recipe, where distillation clearly pays on real data.

``recipes/digits-showcase.toml``: scikit-learn's real 8×8 digits with 200 labelled training
images, cnn-teacher (2.1M parameters) → cnn-tiny-student (5.2k), the student learning from the
teacher alone (kd, T=1, α=1) on mixup'd inputs both models see, 400 patient epochs; the scratch
baseline trains the same student on the labels with the same budget. The settings were chosen by
measurement (benchmarks/bench_showcase.py runs them over seeds; docs/vision.md has the numbers
and what else was tried).
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["SHOWCASE_RECIPE", "demo_summary", "run_demo"]

SHOWCASE_RECIPE = "digits-showcase"


def demo_summary() -> str:
    """What the demo runs, from the recipe's notes."""
    from ..recipes import find_recipe

    recipe = find_recipe(SHOWCASE_RECIPE)
    return "kdplug demo: " + "\n".join(recipe.notes)


def run_demo(out: Optional[str] = None, seed: Optional[int] = None, device: Optional[str] = None,
             quiet: Optional[bool] = None, **overrides: Any):
    """Runs the showcase recipe into ``out`` (default ``runs/demo``, replacing an earlier demo)."""
    from ..recipes import find_recipe
    from .run import distill

    recipe = find_recipe(SHOWCASE_RECIPE)
    options = {k: v for k, v in overrides.items() if v is not None}
    return distill(config=str(recipe.path), out=out or "runs/demo", overwrite=True, seed=seed,
                   device=device, quiet=quiet, **options)
