"""What a run leaves in ``out``: metrics.jsonl, report.json, config files, curves.png; the table."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence

from ..errors import MissingExtraWarning
from .checkpoint import atomic_write_text
from .config import to_toml

__all__ = ["write_metrics", "write_report", "write_config", "plot_curves", "format_table",
           "PHASE_LABELS"]

PHASE_LABELS = {"teacher": "teacher", "scratch": "student (scratch)",
                "student": "student (distilled)"}
PHASE_ORDER = ("teacher", "scratch", "student")


def write_metrics(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """metrics.jsonl: one JSON object per epoch and phase (rewritten whole: exact after resume)."""
    atomic_write_text("".join(json.dumps(_jsonable(r)) + "\n" for r in records), path)


def write_report(path: Path, report: Mapping[str, Any]) -> None:
    atomic_write_text(json.dumps(_jsonable(report), indent=2) + "\n", path)


def write_config(out: Path, config: Mapping[str, Any]) -> None:
    """config.json and config.toml (the latter usable as ``--config`` to rerun)."""
    atomic_write_text(json.dumps(_jsonable(config), indent=2) + "\n", out / "config.json")
    rerun = {k: v for k, v in config.items() if k not in ("resume", "overwrite")}
    atomic_write_text("# the resolved config of this run; rerun with --config\n" + to_toml(rerun),
                      out / "config.toml")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


_said_no_plots = False


def plot_curves(path: Path, records: Sequence[Mapping[str, Any]], title: str = "") -> bool:
    """curves.png: test accuracy and test loss per epoch, one line per phase. Without matplotlib
    (the `plots` extra) nothing is drawn, and the first call says so; returns whether it drew."""
    global _said_no_plots
    try:
        import matplotlib
    except ImportError:
        if not _said_no_plots:
            _said_no_plots = True
            warnings.warn(f"matplotlib is not installed, so no {path.name} is written: "
                          f"pip install 'kdplug[plots]'", MissingExtraWarning, stacklevel=2)
        return False

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for phase in PHASE_ORDER:
        rows = [r for r in records if r["phase"] == phase]
        if not rows:
            continue
        epochs = [r["epoch"] for r in rows]
        label = PHASE_LABELS[phase]
        acc_ax.plot(epochs, [100 * r["test_accuracy"] for r in rows], marker="o", label=label)
        loss_ax.plot(epochs, [r["test_loss"] for r in rows], marker="o", label=label)
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    loss_ax.set(xlabel="epoch", ylabel="test loss (cross-entropy)", title="test loss",
                yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def format_table(report: Mapping[str, Any]) -> str:
    """The side-by-side summary: model, name, parameters, accuracy, test loss (mean cross-entropy),
    perplexity (lm), inference time per evaluation batch."""
    task = report.get("task", "classification")
    metric = "token acc" if task == "lm" else "accuracy"
    rows: List[List[str]] = []
    for phase in PHASE_ORDER:
        entry: Optional[Mapping[str, Any]] = report.get(phase)
        if not entry:
            continue
        accuracy, loss = entry.get("accuracy"), entry.get("loss")  # None: not available
        row = [PHASE_LABELS[phase], str(entry["name"]), f"{entry['params']:,}",
               "n/a" if accuracy is None else f"{100 * accuracy:.2f}%",
               "n/a" if loss is None else f"{loss:.4f}"]
        if task == "lm":
            ppl = entry.get("perplexity")
            row.append("n/a" if ppl is None else f"{ppl:.3f}")
        ms = entry.get("inference_ms_per_batch")
        row.append("-" if ms is None else f"{ms:.2f}")
        rows.append(row)
    header = (["model", "name", "params", metric, "test loss"] + (["ppl"] if task == "lm" else [])
              + [f"ms/batch ({report.get('inference_batch_size', '?')})"])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))
    gain = report.get("distillation_gain")
    if gain is not None:
        lines.append(f"distilled - scratch: {100 * gain:+.2f} points of {metric}")
    return "\n".join(lines)
