"""Offline distillation: a versioned, checksummed cache of a teacher's outputs.

- :mod:`.config`      CacheConfig: cache-teacher's options, once (default, help)
- :mod:`.errors`      what can be wrong with a cache
- :mod:`.format`      folder layout, file names, storage dtypes, atomic writes
- :mod:`.hashing`     fingerprints: teacher weights, sample order, input transform
- :mod:`.writer`      :func:`cache_teacher` (``kdplug cache-teacher``): chunked, resumable, sharded
- :mod:`.reader`      :class:`TeacherCache`: open, verify, compare with a run, look rows up
- :mod:`.targets`     cached targets in a batch and the teacher ModelOutput built from them
- :mod:`.integration` what ``distill(..., teacher_cache=DIR)`` uses: identity, loader, checks

The submodules load on first use. The engine uses :mod:`.integration` (with :mod:`.reader` and
:mod:`.targets`); :mod:`.writer` and :mod:`.integration` build and run models through the engine's
public modules (components, batching, distributed, evaluate), and no engine module imports them
back.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_LAZY_EXPORTS = {
    "cache_teacher": ".writer", "CacheResult": ".writer",
    "TeacherCache": ".reader", "open_cache": ".reader",
    "CacheError": ".errors", "CacheMismatchError": ".errors", "CacheCorruptError": ".errors",
    "CacheIncompleteError": ".errors", "FORMAT_VERSION": ".format", "CacheConfig": ".config",
}

__all__ = sorted(_LAZY_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY_EXPORTS, globals())  # PEP 562
