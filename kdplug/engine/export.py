"""``kdplug export``: a run's distilled student as one plain state_dict file, for deployment.

Whatever wrote the checkpoint — one process, DDP, or FSDP with its shards spread over processes —
the export is one ``torch.save`` file of whole tensors named as the model names them, read back
with ``model.load_state_dict(torch.load(FILE))`` into the plain model. Shards are consolidated by
this one process, without a process group.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import torch

from ..errors import KdplugError
from .checkpoint import FORMAT, atomic_save, load_checkpoint, model_state
from .run_folder import PHASES
from .sharded_checkpoint import is_sharded

__all__ = ["export_model", "ExportResult"]


@dataclass(frozen=True)
class ExportResult:
    out: Path
    phase: str
    epoch: int
    epochs: int
    done: bool  # the phase had finished when the checkpoint was written
    tensors: int
    parameters: int  # elements of all exported tensors (buffers included)
    sharded: bool  # read from shard folders

    def summary(self) -> str:
        state = ("finished" if self.done else
                 f"NOT finished: epoch {self.epoch} of {self.epochs}, the latest checkpoint")
        source = "consolidated from shards" if self.sharded else "from one checkpoint file"
        return (f"{self.phase}: {self.tensors} tensors, {self.parameters:,} values, {source} "
                f"({state}) -> {self.out}")


def export_model(run: Any, out: Any, *, phase: str = "student") -> ExportResult:
    """Writes the model of ``phase`` from ``run`` (a run folder, or one of its checkpoint files)
    to ``out`` as a plain state_dict; returns what was written."""
    if phase not in PHASES:
        raise KdplugError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    run = Path(run)
    path = run / "checkpoints" / f"{phase}.pt" if run.is_dir() else run
    if not path.is_file():
        raise KdplugError(f"{str(run)!r} holds no checkpoint of the {phase} phase ({path} does "
                          "not exist); give a kdplug run folder (--out of kdplug distill) or a "
                          "checkpoint file")
    ckpt = load_checkpoint(path, mmap=True)
    if ckpt.get("format") != FORMAT:
        raise KdplugError(f"{str(path)!r} is not a checkpoint of a kdplug run: it is already a "
                          "plain state_dict, or another file")
    state: Dict[str, torch.Tensor] = dict(model_state(ckpt, path))
    out = Path(out)
    if out.is_dir():
        raise KdplugError(f"--out {str(out)!r} is a folder; give the file to write")
    atomic_save(state, out)
    return ExportResult(out=out, phase=phase, epoch=int(ckpt["epoch"]),
                        epochs=int(ckpt["epochs"]), done=bool(ckpt.get("done")),
                        tensors=len(state), parameters=sum(t.numel() for t in state.values()),
                        sharded=is_sharded(ckpt))
