"""What can be wrong with a teacher cache (no torch, no NumPy: the CLI reads these at start)."""
from __future__ import annotations

from typing import Any, Mapping, Tuple

from ..errors import KdplugError

__all__ = ["CacheError", "CacheMismatchError", "CacheCorruptError", "CacheIncompleteError"]


class CacheError(KdplugError):
    """Something is wrong with a teacher cache; the message says what and how to fix it."""


class CacheMismatchError(CacheError):
    """The cache was written for another teacher, data, order, transform or format.

    ``fields`` maps each differing field (dotted, e.g. ``teacher.weights_hash``) to
    ``(value in the cache, value in this run)``.
    """

    def __init__(self, message: str, fields: Mapping[str, Tuple[Any, Any]]) -> None:
        super().__init__(message)
        self.fields = dict(fields)


class CacheCorruptError(CacheError):
    """A chunk file is missing, truncated, or fails its checksum."""


class CacheIncompleteError(CacheError):
    """The cache has no manifest: a cache-teacher run stopped (or is still running) mid-write."""
