"""Offline distillation: a versioned, checksummed cache of a teacher's outputs.

- :mod:`.format`      folder layout, file names, storage dtypes, atomic writes, errors
- :mod:`.hashing`     fingerprints: teacher weights, sample order, input transform
- :mod:`.writer`      :func:`cache_teacher` (``kdplug cache-teacher``): chunked, resumable, sharded
- :mod:`.reader`      :class:`TeacherCache`: open, verify, compare with a run, look rows up
- :mod:`.targets`     cached targets in a batch and the teacher ModelOutput built from them
- :mod:`.integration` what ``distill(..., teacher_cache=DIR)`` uses: identity, loader, checks

The submodules load on first use (the engine imports :mod:`.targets` only).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "cache_teacher": "writer", "CacheResult": "writer",
    "TeacherCache": "reader", "open_cache": "reader",
    "CacheError": "format", "CacheMismatchError": "format", "CacheCorruptError": "format",
    "CacheIncompleteError": "format", "FORMAT_VERSION": "format",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # PEP 562
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'kdplug.cache' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
