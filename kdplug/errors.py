"""kdplug's exceptions: one base class, so callers can catch everything kdplug raises on purpose."""
from __future__ import annotations


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
