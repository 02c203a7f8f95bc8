"""Output folders: checked before a command does any work, created only when it starts writing,
and an operating-system refusal (a file in the path, no permission, a read-only file system,
a full disk) turned into one line that names the folder instead of a traceback."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator, List, Tuple

from .errors import KdplugError

__all__ = ["check_writable", "creating_folder", "unwritable"]

_WHY = {errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
        errno.EPERM: "permission denied", errno.ENOSPC: "the disk is full",
        errno.ENOTDIR: "a file stands where a folder is needed"}


def check_writable(folder: Path, flag: str = "--out") -> None:
    """Raises a KdplugError unless ``folder`` is a folder this process can write in, or one it
    can create (its nearest existing parent is a writable folder). Writes nothing."""
    folder = Path(folder)
    existing, _ = _nearest_existing(folder)
    if not existing.is_dir():
        what = "it is" if existing == folder else f"{str(existing)!r} is"
        raise KdplugError(f"cannot use {str(folder)!r} as {flag}: {what} a file, not a folder; "
                          f"choose another {flag}")
    if not _can_write(existing):
        code = errno.EROFS if _read_only(existing) else errno.EACCES
        raise unwritable(folder, OSError(code, os.strerror(code), str(existing)), flag)


def unwritable(folder: Path, exc: OSError, flag: str = "--out") -> KdplugError:
    """The one-line error for an OSError met while creating or writing ``folder``."""
    why = _WHY.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    place = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(folder) else ""
    return KdplugError(f"cannot write the output folder {str(folder)!r}: {why}{place}; "
                       f"choose another {flag}")


@contextlib.contextmanager
def creating_folder(folder: Path, flag: str = "--out") -> Iterator[Path]:
    """Creates ``folder`` (and missing parents) for the block that writes its first files. An
    OSError becomes a KdplugError naming the folder, and if the block fails the folders this
    created are removed again (when still empty): a failed start leaves no empty folders."""
    folder = Path(folder)
    _, missing = _nearest_existing(folder)
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            yield folder
        except OSError as exc:
            raise unwritable(folder, exc, flag) from None
    except BaseException:
        for made in missing:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()
        raise


def _nearest_existing(folder: Path) -> Tuple[Path, List[Path]]:
    """The nearest path at or above ``folder`` that exists, and the missing ones below it
    (deepest first). ``exists()`` is False below a file, so a file in the path is found too."""
    missing: List[Path] = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return folder, missing


def _can_write(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)  # False on a read-only mount, even for root


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False
