"""Which submodules of a model FSDP shards as units of their own ("wrap units").

A unit's parameters are gathered whole just before its forward and freed after it, so a process
holds at most one unit whole at a time besides its shards; the model itself is the last unit and
keeps what no other unit holds (embeddings, output head, final norm). The units of a model, the
first rule that applies:

1. the model's own declaration: an attribute ``kdplug_shard_units``, a sequence of module paths;
2. its plugin's declaration: ``register(name, factory, shard_units=[...])``;
3. Hugging Face's ``_no_split_modules``: every module of those classes (the outermost ones);
4. the default: the entries (with parameters) of the outermost ``nn.ModuleList`` and
   ``nn.Sequential`` containers — Transformer layers, the blocks of a ResNet stage, the layers of a
   Sequential; for a model without such containers, its direct children with parameters.

A path names a module as ``model.named_modules()`` does; ``*`` stands for one path segment:
``blocks.*`` is every block, ``encoder.layer.*.attention`` the attention of every layer.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from ..errors import KdplugError, did_you_mean

__all__ = ["ATTRIBUTE", "shard_units", "default_units"]

#: The attribute through which a model declares its units.
ATTRIBUTE = "kdplug_shard_units"
_CONTAINERS = (nn.ModuleList, nn.Sequential)

Unit = Tuple[str, nn.Module]


def shard_units(model: nn.Module, declared: Optional[Sequence[str]] = None,
                what: str = "the model") -> List[Unit]:
    """The (path, module) units of ``model``, innermost first (the order FSDP shards them in);
    the model itself is not among them. Raises for a model with no parameters, a path that names
    no module, or tied parameters that two units would hold."""
    if next(model.parameters(), None) is None:
        raise KdplugError(f"{what} ({type(model).__name__}) has no parameters to shard: strategy "
                          "'fsdp' shards parameters across processes; use --strategy ddp")
    own = getattr(model, ATTRIBUTE, None)
    if own is not None:
        units = _by_paths(model, own, f"{what}'s {ATTRIBUTE}")
    elif declared is not None:
        units = _by_paths(model, declared, f"the shard_units its plugin registered for {what}")
    elif getattr(model, "_no_split_modules", None):
        units = _by_class(model, set(model._no_split_modules))
    else:
        units = default_units(model)
    _check_no_tied_parameters_across(model, units, what)
    return sorted(units, key=lambda unit: -unit[0].count("."))


def default_units(model: nn.Module) -> List[Unit]:
    """Rule 4 of the module docstring."""
    found: List[Unit] = []

    def visit(prefix: str, module: nn.Module) -> None:
        inside_container = isinstance(module, _CONTAINERS)
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if inside_container:
                if _has_parameters(child):
                    found.append((path, child))
            else:
                visit(f"{path}.", child)

    visit("", model)
    if not found:
        found = [(name, child) for name, child in model.named_children() if _has_parameters(child)]
    return found


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _by_paths(model: nn.Module, patterns: Iterable[str], source: str) -> List[Unit]:
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    paths = [name for name, _ in model.named_modules() if name]
    modules = dict(model.named_modules())
    chosen: Dict[str, nn.Module] = {}
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise KdplugError(f"{source}: {pattern!r} is not a module path (expected e.g. "
                              "'blocks.*' or 'encoder.layer.*')")
        pattern = pattern.strip()
        matched = [path for path in paths if _matches(pattern, path)]
        if not matched:
            shown = ", ".join(paths[:12]) + (", …" if len(paths) > 12 else "")
            raise KdplugError(f"{source}: {pattern!r} names no module"
                              f"{did_you_mean(pattern, paths)} (its modules: {shown})")
        for path in matched:
            chosen[path] = modules[path]
    return list(chosen.items())


def _matches(pattern: str, path: str) -> bool:
    wanted, parts = pattern.split("."), path.split(".")
    return len(wanted) == len(parts) and all(fnmatchcase(p, w) for p, w in zip(parts, wanted))


def _by_class(model: nn.Module, names: set) -> List[Unit]:
    found: List[Unit] = []
    for path, module in model.named_modules():
        if path and type(module).__name__ in names and not any(
                path.startswith(f"{outer}.") for outer, _ in found):
            found.append((path, module))
    return found


def _owner(path: str, unit_paths: Sequence[str]) -> str:
    """The innermost unit holding the module at ``path`` ("" = the model itself)."""
    best = ""
    for unit in unit_paths:
        if (path == unit or path.startswith(f"{unit}.")) and len(unit) > len(best):
            best = unit
    return best


def _check_no_tied_parameters_across(model: nn.Module, units: List[Unit], what: str) -> None:
    """FSDP gathers each unit's parameters on its own: a parameter used in two units (tied
    embedding and output head, say) would be gathered in one and missing in the other."""
    unit_paths = [path for path, _ in units]
    owners: Dict[int, Tuple[str, str]] = {}  # id -> (owner unit, parameter name)
    for path, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False):
            full = f"{path}.{name}" if path else name
            owner = _owner(path, unit_paths)
            seen = owners.setdefault(id(param), (owner, full))
            if seen[0] != owner:
                first, other = (repr(u) if u else "the model itself" for u in (seen[0], owner))
                raise KdplugError(
                    f"{what}: the parameter {seen[1]} is tied to {full}, but they would be "
                    f"sharded in different units ({first} and {other}); FSDP gathers each "
                    "unit's parameters on its own. Declare units that keep tied parameters "
                    f"together (model attribute {ATTRIBUTE}, or the plugin's shard_units)")
