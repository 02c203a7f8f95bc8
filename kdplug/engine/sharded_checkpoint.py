"""Sharded checkpoints (torch.distributed.checkpoint), complete or absent as a folder.

Next to the one-file checkpoints of one process and of DDP, a sharded checkpoint is::

    checkpoints/student.pt                        the run status: epoch, step, RNG, history, the
                                                  settings, the LR schedule, and the name of the
                                                  shard folder that is complete
    checkpoints/student.shards/e0001-s000004/     .metadata + __<rank>_0.distcp from each process

Every process writes its own shards of the model, of the loss's parameters and of the optimizer
state; then rank 0 replaces the status file atomically, naming the new folder, and removes the
older folders. A run killed at any instant leaves a status that names a complete folder (a folder
it does not name is a leftover, removed by the next save). DCP reshards on load: a run resumes on
any number of processes, sharded or not (one process or DDP read the shards as whole tensors),
and :func:`read_model_state` consolidates a model without any process group (``kdplug export``).
"""
from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .._atomic import atomic_write
from ..errors import KdplugError
from .distributed import DistEnv

__all__ = ["SHARDS_KEY", "is_sharded", "shards_folder", "save_sharded", "load_sharded",
           "read_model_state", "remove_shards"]

#: The status file's key naming its complete shard folder (relative to the status file).
SHARDS_KEY = "shards"
_METADATA = ".metadata"


def is_sharded(ckpt: Mapping[str, Any]) -> bool:
    return bool(ckpt.get(SHARDS_KEY))


def shards_folder(status_path: Path, ckpt: Mapping[str, Any]) -> Path:
    """The complete shard folder the status file at ``status_path`` names; a clear error if it is
    gone (a run folder copied without it, say)."""
    folder = Path(status_path).parent / str(ckpt[SHARDS_KEY])
    if not (folder / _METADATA).is_file():
        raise KdplugError(f"checkpoint {str(status_path)!r} keeps its tensors in the shard folder "
                          f"{str(folder)!r}, which is missing or incomplete (no {_METADATA}); "
                          "copy a run folder whole, checkpoints/*.shards included")
    return folder


def save_sharded(content: Dict[str, Any], status: Dict[str, Any], path: Path,
                 env: DistEnv) -> None:
    """Every process writes its shards of ``content`` (state dicts, DTensors or whole tensors);
    then rank 0 writes ``status`` to ``path`` naming them, and removes older shard folders."""
    path = Path(path)
    root = path.with_suffix(".shards")
    folder = _agreed_folder(root, path, status, env)
    dcp.save(content, checkpoint_id=folder)  # returns on rank 0 once every rank's shards are in
    if not env.is_main:
        return
    relative = f"{root.name}/{Path(folder).name}"
    atomic_write(path, lambda f: torch.save({**status, SHARDS_KEY: relative}, f))
    for old in root.iterdir():
        if old.name != Path(folder).name:
            shutil.rmtree(old, ignore_errors=True)


def remove_shards(path: Path) -> None:
    """Removes the shard folders of the checkpoint at ``path`` (now written as one file)."""
    shutil.rmtree(Path(path).with_suffix(".shards"), ignore_errors=True)


def _agreed_folder(root: Path, path: Path, status: Mapping[str, Any], env: DistEnv) -> str:
    """Rank 0 makes the save's folder and tells every process; when it cannot, every process
    raises (the others would otherwise wait in the broadcast until the group's timeout)."""
    choice, failure = None, None
    if env.is_main:
        try:
            choice = (_new_folder(root, path, status), None)
        except Exception as exc:  # any failure must reach the other processes
            failure = exc
            choice = (None, f"could not prepare the shard folder under {str(root)!r}: {exc}")
    folder, error = env.broadcast(choice)
    if failure is not None:
        raise failure
    if error is not None:
        raise KdplugError(f"rank 0 {error}")
    return folder


def _new_folder(root: Path, path: Path, status: Mapping[str, Any]) -> str:
    """A fresh folder name for this save: never the one the current status names."""
    named = None
    if path.is_file():
        named = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(SHARDS_KEY)
    base = f"e{int(status['epoch']):04d}-s{int(status['step']):06d}"
    name, n = base, 0
    while named is not None and f"{root.name}/{name}" == named:
        n += 1
        name = f"{base}-{n}"
    folder = root / name
    if folder.exists():  # a leftover of a save that was cut short
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return str(folder)


def load_sharded(content: Dict[str, Any], folder: Path) -> Dict[str, Any]:
    """Fills ``content`` (state dicts shaped as this process holds them) from ``folder``, in
    place, whatever the number of processes that wrote it; returns it."""
    with _alone():
        dcp.load(content, checkpoint_id=str(folder))
    return content


@contextlib.contextmanager
def _alone() -> Iterator[None]:
    """DCP warns when it reads without a process group; one process resuming, or an export,
    reads alone by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single")
        yield


def read_model_state(folder: Path, key: str = "model") -> Dict[str, torch.Tensor]:
    """The whole tensors saved under ``key`` (the model) in a shard folder, as a plain
    state_dict, read by this process alone (no process group needed)."""
    reader = FileSystemReader(str(folder))
    metadata = reader.read_metadata()
    prefix = f"{key}."
    target = {name: torch.empty(meta.size, dtype=meta.properties.dtype)
              for name, meta in metadata.state_dict_metadata.items()
              if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    if not target:
        raise KdplugError(f"the shard folder {str(folder)!r} holds no {key!r} tensors")
    with _alone():
        dcp.load(target, storage_reader=reader, no_dist=True)
    return {name[len(prefix):]: tensor for name, tensor in target.items()}
