"""kdplug's exceptions: one base class, so callers can catch everything kdplug raises on purpose."""
from __future__ import annotations

import difflib
from typing import Iterable, Optional


class KdplugError(ValueError):
    """Base of every error kdplug raises about a bad value: a name, a plugin, an option."""


class PluginError(KdplugError):
    """A plugin broke the contract in kdplug/hookspecs.py; the message names the plugin."""


class UnknownHookError(PluginError):
    """A plugin implements a hook that kdplug does not define (usually a misspelt name)."""


class DuplicateNameError(PluginError):
    """Two registrations of one kind share a name; the message names both plugins."""


class InvalidFactoryError(PluginError, TypeError):
    """A plugin registered a factory that is not callable, or one that built the wrong thing."""


class UnknownNameError(KdplugError, LookupError):
    """No teacher/student/loss/dataset has that name; the message lists the known ones."""


class PluginLoadWarning(UserWarning):
    """A plugin could not be imported and was skipped; the others still load."""


class MissingExtraWarning(UserWarning):
    """An optional part (e.g. the plots) is skipped because its extra is not installed."""


class UnknownOptionError(KdplugError, TypeError):
    """A factory was given an option it does not take; the message names the closest one and
    lists those it takes. (A TypeError too: Python raises one for an unexpected keyword.)"""


def closest(name: str, known: Iterable[str]) -> Optional[str]:
    """The one of ``known`` that a misspelt ``name`` most likely meant, or None."""
    found = difflib.get_close_matches(str(name), list(known), n=1)
    return found[0] if found else None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the one of ``known`` closest to ``name``, else ``""``."""
    match = closest(name, known)
    return f"; did you mean {match!r}?" if match else ""
