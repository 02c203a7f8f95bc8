"""What a run leaves in ``out``: metrics.jsonl, report.json, config files, curves.png; the table."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from .._atomic import atomic_write
from .._version import __version__
from ..errors import MissingExtraWarning
from .checkpoint import atomic_write_text
from .config import DistillConfig, to_toml

__all__ = ["write_metrics", "write_report", "write_config", "plot_curves", "build_report",
           "write_outputs", "format_table", "PHASE_LABELS"]

PHASE_LABELS = {"teacher": "teacher", "scratch": "student (scratch)",
                "student": "student (distilled)"}
PHASE_ORDER = ("teacher", "scratch", "student")


def write_metrics(path: Path, records: Iterable[Mapping[str, Any]], durable: bool = True) -> None:
    """metrics.jsonl: one JSON object per epoch and phase (rewritten whole: exact after resume).
    During a run it need not be durable (no fsync): a resumed run rewrites it from the
    checkpoints' histories."""
    text = "".join(json.dumps(_jsonable(r)) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text), mode="w", durable=durable)


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
    """curves.png: test accuracy and test loss per evaluated epoch, one line per phase; returns
    whether it was drawn. Without matplotlib (the `plots` extra) nothing is, and the first call
    says so.

    Drawn on a Figure of its own with the Agg canvas: pyplot and the global backend are left
    alone (a notebook keeps its backend), and the file is written atomically.
    """
    global _said_no_plots
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if not _said_no_plots:
            _said_no_plots = True
            warnings.warn(f"matplotlib is not installed, so no {path.name} is written: "
                          f"pip install 'kdplug[plots]'", MissingExtraWarning, stacklevel=2)
        return False

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    acc_ax, loss_ax = fig.subplots(1, 2)
    for phase in PHASE_ORDER:
        rows = [r for r in records if r["phase"] == phase and "test_accuracy" in r]
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
    # fixed margins that fit these labels: tight_layout measures every text first (about half
    # of the drawing time, which every run pays at its end)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.84 if title else 0.9,
                        wspace=0.25)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return True


def build_report(cfg: DistillConfig, *, task: str, num_classes: int, input_shape: Sequence[int],
                 device: str, world_size: int, inference_batch_size: Optional[int],
                 results: Sequence[Any], cache_summary: Optional[Mapping[str, Any]],
                 config: Mapping[str, Any], out: Path) -> Dict[str, Any]:
    """What report.json holds: the run's facts, then one entry per phase result."""
    report: Dict[str, Any] = {
        "kdplug_version": __version__, "task": task, "data": cfg.data, "num_classes": num_classes,
        "input_shape": list(input_shape), "loss": cfg.loss, "temperature": cfg.temperature,
        "alpha": cfg.alpha, "device": device, "world_size": world_size, "amp": cfg.amp,
        "inference_batch_size": inference_batch_size,
    }
    by_phase = {r.phase: r for r in results}
    for r in results:
        report[r.phase] = r.to_dict()
    scratch, student = by_phase.get("scratch"), by_phase["student"]
    report["distillation_gain"] = (None if scratch is None
                                   else student.accuracy - scratch.accuracy)
    if cache_summary is not None:
        report["teacher_cache"] = dict(cache_summary)
    report["config"] = dict(config)
    report["out"] = str(out)
    return report


def write_outputs(out: Path, report: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                  title: str) -> None:
    """report.json, metrics.jsonl and (with any epoch trained) curves.png."""
    write_report(out / "report.json", report)
    write_metrics(out / "metrics.jsonl", records)
    if records:
        plot_curves(out / "curves.png", records, title=title)


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
        label = PHASE_LABELS[phase] if report.get("teacher") or phase != "student" else "student"
        row = [label, str(entry["name"]), f"{entry['params']:,}",
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
