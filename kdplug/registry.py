"""What the plugins registered: per kind, name -> factory, each remembering the plugin that gave it."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional

from .errors import (DuplicateNameError, InvalidFactoryError, KdplugError, PluginError,
                     UnknownNameError, UnknownOptionError, did_you_mean)


@dataclass(frozen=True)
class Kind:
    """One kind of thing plugins provide, and the hook that collects it."""

    name: str  # "teacher"
    plural: str  # "teachers"
    hook: str  # "register_teachers"
    product: str  # what the factory must return, for error messages


KINDS: Dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("teacher", "teachers", "register_teachers", "a torch.nn.Module"),
        Kind("student", "students", "register_students", "a torch.nn.Module"),
        Kind("loss", "losses", "register_losses",
             "a callable (student_out, teacher_out, batch) -> scalar tensor"),
        Kind("dataset", "datasets", "register_datasets", "a kdplug.data.DataSplits"),
    )
}


@dataclass(frozen=True)
class Registration:
    """One ``register(name, factory, **info)`` call, and the plugin that made it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: Optional[str] = None  # None for plugins registered in-process
    version: Optional[str] = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def create(self, **options: Any) -> Any:
        """Call the factory with ``options`` and check it built what the contract promises; an
        option the factory does not take is an UnknownOptionError naming the closest one."""
        self.check_options(options)
        product = self.factory(**options)
        _check_product(self, product)
        return product

    @property
    def options(self) -> Optional[List[str]]:
        """The keyword options the factory takes, from its signature; None when it takes any
        (``**options``) or its signature cannot be read."""
        try:
            params = inspect.signature(self.factory).parameters.values()
        except (TypeError, ValueError):
            return None
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        return [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     inspect.Parameter.KEYWORD_ONLY)]

    def check_options(self, options: Mapping[str, Any]) -> None:
        accepted = self.options
        unknown = [key for key in options if accepted is not None and key not in accepted]
        if unknown:
            hint = did_you_mean(unknown[0], accepted) if len(unknown) == 1 else ""
            raise UnknownOptionError(
                f"the {self.kind} {self.name!r} (from plugin {self.origin()}) has no option"
                f"{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
                f"{hint or '.'} Its options: "
                f"{', '.join(accepted) or 'none'}")

    @property
    def description(self) -> Optional[str]:
        """The ``description=`` given to ``register``, if any."""
        value = self.info.get("description")
        return None if value is None else str(value)

    def origin(self) -> str:
        """'plugin' or 'plugin' (distribution version), for error messages."""
        if self.distribution is None:
            return repr(self.plugin)
        return f"{self.plugin!r} ({self.distribution} {self.version})"


def _check_product(entry: Registration, product: Any) -> None:
    if entry.kind in ("teacher", "student"):
        import torch  # only here: listing plugins must not need torch

        ok = isinstance(product, torch.nn.Module)
    elif entry.kind == "loss":
        ok = callable(product)
    else:  # data sets: kdplug.data belongs to the engine; its own checks apply there
        ok = product is not None
    if not ok:
        raise InvalidFactoryError(
            f"the {entry.kind} factory {entry.name!r} from plugin {entry.origin()} returned "
            f"{product!r} ({type(product).__name__}); expected {KINDS[entry.kind].product}"
        )


class Registry:
    """Registrations of every kind. Built by :func:`build_registry`; read-only afterwards."""

    def __init__(self) -> None:
        self._entries: Dict[str, Dict[str, Registration]] = {kind: {} for kind in KINDS}

    def add(self, entry: Registration) -> None:
        kind = _kind(entry.kind)
        if not isinstance(entry.name, str) or not entry.name.strip():
            raise PluginError(
                f"plugin {entry.origin()} registered a {kind.name} named {entry.name!r}; "
                "expected a non-empty string name"
            )
        if not callable(entry.factory):
            raise InvalidFactoryError(
                f"plugin {entry.origin()} registered {kind.name} {entry.name!r} with factory "
                f"{entry.factory!r} ({type(entry.factory).__name__}); expected a callable "
                f"factory(**options) returning {kind.product}"
            )
        previous = self._entries[kind.name].get(entry.name)
        if previous is not None:
            if previous.plugin == entry.plugin:
                where = f"twice by plugin {entry.origin()}"
            else:
                first, second = sorted((previous, entry), key=lambda e: e.plugin)
                where = f"by two plugins: {first.origin()} and {second.origin()}"
            raise DuplicateNameError(
                f"{kind.name} {entry.name!r} is registered {where}; names must be unique per "
                "kind. Rename one, or leave a plugin out with KDPLUG_DISABLE_PLUGINS=<plugin>"
            )
        self._entries[kind.name][entry.name] = entry

    def entries(self, kind: str) -> Dict[str, Registration]:
        """name -> Registration for one kind, sorted by name (a copy)."""
        entries = self._entries[_kind(kind).name]
        return {name: entries[name] for name in sorted(entries)}

    def get(self, kind: str, name: str) -> Registration:
        """The registration of ``name``; ``NAME:ARGUMENT`` resolves through a prefix provider.

        A provider registered with ``info`` ``argument="OPTION"`` (say ``register("text", f,
        argument="path")``) also answers ``text:ARG`` names: the result is a Registration named
        ``text:ARG`` whose factory gets ``OPTION=ARG`` (e.g. ``--data text:corpus.txt``,
        ``--teacher hf:./checkpoint``). An exact name always wins.
        """
        entries = self.entries(kind)
        if name in entries:
            return entries[name]
        prefix, colon, argument = str(name).partition(":")
        provider = entries.get(prefix) if colon else None
        if provider is not None and provider.info.get("argument"):
            return replace(provider, name=name, factory=_bind_argument(
                provider, str(provider.info["argument"]), argument))
        raise UnknownNameError(_unknown_name_message(KINDS[kind], name, list(entries)))

    def names_by_plugin(self, plugin: str) -> Dict[str, List[str]]:
        """kind -> sorted names that ``plugin`` registered (every kind present, maybe empty)."""
        return {
            kind: [name for name, entry in self.entries(kind).items() if entry.plugin == plugin]
            for kind in KINDS
        }

    def descriptions_by_plugin(self, plugin: str) -> Dict[str, Dict[str, Optional[str]]]:
        """kind -> {name: the ``description`` it was registered with, or None} for ``plugin``."""
        return {
            kind: {name: entry.description for name, entry in self.entries(kind).items()
                   if entry.plugin == plugin}
            for kind in KINDS
        }


def _bind_argument(provider: Registration, option: str, argument: str) -> Callable[..., Any]:
    """provider.factory with ``option=argument``; giving the option again is an error."""

    @functools.wraps(provider.factory)  # its signature too: the options are checked by it
    def factory(**options: Any) -> Any:
        if option in options:
            raise KdplugError(
                f"{provider.kind} '{provider.name}:{argument}' already sets {option}={argument!r}; "
                f"do not also pass the option {option}={options[option]!r}")
        return provider.factory(**{option: argument}, **options)

    return factory


def _kind(kind: str) -> Kind:
    try:
        return KINDS[kind]
    except (KeyError, TypeError):
        raise UnknownNameError(
            f"unknown kind {kind!r}; expected one of {', '.join(map(repr, KINDS))}"
        ) from None


def _unknown_name_message(kind: Kind, name: str, known: List[str]) -> str:
    if not known:
        return (f"unknown {kind.name} {name!r}: no {kind.plural} are registered "
                "(is the plugin that provides it installed? `kdplug plugins` lists what loaded)")
    hint = did_you_mean(name, known) or "."
    return (f"unknown {kind.name} {name!r}{hint} Known {kind.plural}: "
            f"{', '.join(map(repr, known))}")


def build_registry(pm: Any) -> Registry:
    """Ask every plugin of ``pm`` (a kdplug PluginManager) to register what it provides.

    Each implementation is called directly, in pluggy's call order, with a ``register`` bound to
    its own plugin: a pooled ``pm.hook.register_x(...)`` call could not tell who registered what.
    """
    registry = Registry()
    for kind in KINDS.values():
        caller = getattr(pm.hook, kind.hook)
        for impl in reversed(caller.get_hookimpls()):  # pluggy calls the last-added first
            if impl.hookwrapper or impl.wrapper:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} implements {kind.hook} as a wrapper; "
                    "register hooks only collect, so drop wrapper=/hookwrapper="
                )
            distribution = pm.distribution_of(impl.plugin_name)
            register = _register_for(registry, kind, impl.plugin_name, distribution)
            try:
                returned = impl.function(**{arg: register for arg in impl.argnames})
            except Exception as exc:
                if isinstance(exc, PluginError):
                    raise
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed in {kind.hook}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if returned is not None:
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: {kind.hook} returned {returned!r}; hooks "
                    "register through the callback, register(name, factory, **info), and return None"
                )
    return registry


def _register_for(registry: Registry, kind: Kind, plugin: str, distribution: Any) -> Callable:
    def register(name: str, factory: Callable[..., Any], **info: Any) -> None:
        registry.add(Registration(
            kind=kind.name, name=name, factory=factory, plugin=plugin,
            distribution=distribution.name if distribution else None,
            version=distribution.version if distribution else None,
            info=dict(info),
        ))

    register.__doc__ = (f"register(name, factory, **info): add a {kind.name}; "
                        f"factory(**options) returns {kind.product}.")
    return register
