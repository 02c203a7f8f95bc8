"""Files that appear whole or not at all: checkpoints, reports, a cache's chunks and manifest."""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable


def tmp_path(path: Path) -> Path:
    """Where ``path`` is written before it is moved into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[IO], None], mode: str = "wb",
                 durable: bool = True) -> None:
    """Write ``path`` through ``write(file)`` to a temp file, fsync it, os.replace it into place
    and fsync the folder: a reader (or a resumed run) sees the old file or the new, never half.
    ``durable=False`` leaves out the fsyncs: still whole or absent after a killed process, but
    not after a power cut (for files a run rewrites from its checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (where folders can be opened at all)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; os.replace is atomic there anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
