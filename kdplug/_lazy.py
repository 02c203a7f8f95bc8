"""PEP 562 lazy exports: a package lists the names it exports and the module each comes from; a
module is imported when one of its names is first read, so that ``import kdplug`` (and the CLI's
start) does not import torch.

Each package keeps its table in a dict named ``_LAZY_EXPORTS`` (name -> relative module):
tests/test_imports.py reads those tables as import edges when it looks for cycles.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Mapping, Tuple


def lazy_exports(package: str, table: Mapping[str, str], namespace: Dict[str, Any]
                 ) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` (its ``__name__``, ``_LAZY_EXPORTS``
    and ``globals()``)."""
    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        return sorted(list(namespace) + list(table))

    return __getattr__, __dir__
