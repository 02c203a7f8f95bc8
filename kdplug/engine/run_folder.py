"""A run's output folder: where it is, whether it already holds a run (--resume, --overwrite),
its checkpoints and the epoch records written as they come. Only rank 0 writes; every process
knows the folder."""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from ..errors import KdplugError
from . import report as reporting
from .config import DistillConfig
from .distributed import DistEnv

__all__ = ["RunFolder", "OUTPUT_FILES"]

#: What a run writes besides checkpoints/ (removed by --overwrite).
OUTPUT_FILES = ("report.json", "metrics.jsonl", "curves.png", "config.json", "config.toml")


@dataclass
class RunFolder:
    """The folder ``out`` of one run, prepared by :meth:`prepare`."""

    path: Path
    env: DistEnv
    records: List[Dict[str, Any]] = field(default_factory=list)  # every epoch of every phase

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, phase: str) -> Path:
        return self.checkpoints / f"{phase}.pt"

    @classmethod
    def prepare(cls, cfg: DistillConfig, env: DistEnv, log: Callable[[str], None]) -> "RunFolder":
        """``cfg.out`` (default ``runs/distill-<time>``, the same on every process), checked: a
        folder that holds a run needs --resume or --overwrite; --overwrite removes its files."""
        if cfg.out:
            out = Path(cfg.out)
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"distill-{stamp}"
            n = 1
            while out.exists():
                out = Path("runs") / f"distill-{stamp}-{n}"
                n += 1
            out = Path(env.broadcast(str(out)))
        folder = cls(out, env)
        ckpt_dir = folder.checkpoints
        existing = sorted(p.name for p in ckpt_dir.glob("*.pt")) if ckpt_dir.is_dir() else []
        env.barrier()  # every process has looked before rank 0 changes anything
        if existing and not (cfg.resume or cfg.overwrite):
            raise KdplugError(
                f"{out} already holds a run (checkpoints/{', checkpoints/'.join(existing)}); "
                "pass --resume to continue it, --overwrite to start over, or choose another --out")
        if cfg.resume and not existing:
            log(f"resume: no checkpoint in {ckpt_dir} yet; starting the run")
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if cfg.overwrite:
                for name in existing:
                    (ckpt_dir / name).unlink()
                for name in OUTPUT_FILES:
                    (out / name).unlink(missing_ok=True)
        env.barrier()
        return folder

    def write_config(self, cfg: DistillConfig) -> None:
        if self.env.is_main:
            reporting.write_config(self.path, self.resolved_config(cfg))

    def resolved_config(self, cfg: DistillConfig) -> Dict[str, Any]:
        return cfg.to_dict() | {"out": str(self.path)}

    def add_records(self, records: Sequence[Dict[str, Any]]) -> None:
        """Epoch records (a resumed phase's earlier ones too); metrics.jsonl is rewritten whole."""
        self.records.extend(records)
        if self.env.is_main:
            reporting.write_metrics(self.path / "metrics.jsonl", self.records)

    def add_record(self, record: Dict[str, Any]) -> None:
        self.add_records([record])
