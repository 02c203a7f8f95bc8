"""A run's output folder: where it is, whether it already holds a run (--resume, --overwrite),
its checkpoints and the epoch records written as they come.

Looking and writing are two steps: :meth:`RunFolder.prepare` checks everything about the folder
and writes nothing (a refused --resume, a folder that cannot be written); :meth:`RunFolder.open`
creates it, clears an overwritten run and writes the config, once every other check of the run
has passed. A failed start therefore changes nothing in ``out``. Only rank 0 writes; every
process knows the folder."""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from .._writable import check_writable, creating_folder
from ..errors import KdplugError
from . import report as reporting
from .checkpoint import checkpoint_identity
from .config import ConfigError, DistillConfig
from .distributed import DistEnv

__all__ = ["RunFolder", "OUTPUT_FILES"]

#: The phases in the order they run (their checkpoints are checked in it).
PHASES = ("teacher", "student", "scratch")
#: What a run writes besides checkpoints/ (removed by --overwrite).
OUTPUT_FILES = ("report.json", "metrics.jsonl", "curves.png", "config.json", "config.toml")


@dataclass
class RunFolder:
    """The folder ``out`` of one run, checked by :meth:`prepare`, written from :meth:`open` on."""

    path: Path
    env: DistEnv
    overwritten: List[str] = field(default_factory=list)  # checkpoints --overwrite removes
    records: List[Dict[str, Any]] = field(default_factory=list)  # every epoch of every phase

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, phase: str) -> Path:
        return self.checkpoints / f"{phase}.pt"

    @classmethod
    def prepare(cls, cfg: DistillConfig, env: DistEnv, log: Callable[[str], None]) -> "RunFolder":
        """``cfg.out`` (default ``runs/distill-<time>``, the same on every process), checked
        without writing: a folder that holds a run needs --resume (and then every checkpoint in
        it must have been written with this run's settings) or --overwrite; the folder must be
        one this process can create or write in."""
        out = Path(cfg.out) if cfg.out else _new_default_folder(env)
        folder = cls(out, env)
        ckpt_dir = folder.checkpoints
        existing = sorted(p.name for p in ckpt_dir.glob("*.pt")) if ckpt_dir.is_dir() else []
        if existing and not (cfg.resume or cfg.overwrite):
            raise KdplugError(
                f"{out} already holds a run (checkpoints/{', checkpoints/'.join(existing)}); "
                "pass --resume to continue it, --overwrite to start over, or choose another --out")
        if cfg.resume:
            for name in sorted(existing, key=_phase_order):
                check_resumable(ckpt_dir / name, cfg)
            if not existing:
                log(f"resume: no checkpoint in {ckpt_dir} yet; starting the run")
        if cfg.overwrite:
            folder.overwritten = existing
        env.on_main(lambda: check_writable(out))
        return folder

    def open(self, cfg: DistillConfig) -> None:
        """The run starts writing: the folder is created, config.json/.toml written, and only
        then (--overwrite) the previous run's other files removed."""
        self.env.barrier()  # every process has looked before rank 0 changes anything

        def start() -> None:
            with creating_folder(self.path):
                reporting.write_config(self.path, self.resolved_config(cfg))
                if cfg.overwrite:
                    for name in self.overwritten:
                        (self.checkpoints / name).unlink(missing_ok=True)
                    for name in OUTPUT_FILES:
                        if not name.startswith("config."):  # just written
                            (self.path / name).unlink(missing_ok=True)

        self.env.on_main(start)

    def resolved_config(self, cfg: DistillConfig) -> Dict[str, Any]:
        return cfg.to_dict() | {"out": str(self.path)}

    def add_records(self, records: Sequence[Dict[str, Any]]) -> None:
        """Epoch records (a resumed phase's earlier ones too); metrics.jsonl is rewritten whole."""
        self.records.extend(records)
        if self.env.is_main:
            reporting.write_metrics(self.path / "metrics.jsonl", self.records, durable=False)

    def add_record(self, record: Dict[str, Any]) -> None:
        self.add_records([record])


def check_resumable(path: Path, cfg: DistillConfig) -> None:
    """A ConfigError naming every setting in which ``cfg`` differs from the run that wrote the
    checkpoint ``path``."""
    saved, now = checkpoint_identity(path), cfg.identity()
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in differ)
        raise ConfigError(f"--resume: {path} was written with other settings ({shown}). "
                          "Resume with the same settings, or --overwrite to start over")


def _phase_order(name: str) -> tuple:
    phase = name[:-len(".pt")]
    return (PHASES.index(phase) if phase in PHASES else len(PHASES), name)


def _new_default_folder(env: DistEnv) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"distill-{stamp}"
    n = 1
    while out.exists():
        out = Path("runs") / f"distill-{stamp}-{n}"
        n += 1
    return Path(env.broadcast(str(out)))
