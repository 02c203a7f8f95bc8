"""``kdplug …``: a thin command-line layer over kdplug's Python API.

To add a command, define a function in this module (or import one here) decorated with
``@cli.command()``; it inherits ``--help`` and clean ``Error: …`` output for kdplug's errors.
"""
from __future__ import annotations

import json
import warnings
from typing import Any, Callable, Dict, List

import click

from . import __version__
from .api import plugin_report
from .errors import KdplugError, PluginLoadWarning


class KdplugGroup(click.Group):
    """Shows kdplug's errors as ``Error: …`` with exit status 1, not a traceback, in every command."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():  # restores showwarning afterwards
            warnings.showwarning = _plugin_warnings_as_messages(warnings.showwarning)
            try:
                return super().invoke(ctx)
            except KdplugError as exc:
                raise click.ClickException(str(exc)) from exc


def _plugin_warnings_as_messages(show: Callable[..., None]) -> Callable[..., None]:
    # A plugin that failed to load is news for the user, not a source location to debug.
    def show_warning(message, category, filename, lineno, file=None, line=None):  # type: ignore
        if issubclass(category, PluginLoadWarning):
            click.echo(f"Warning: {message}", err=True)
        else:
            show(message, category, filename, lineno, file, line)

    return show_warning


@click.group(cls=KdplugGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="kdplug")
def cli() -> None:
    """kdplug: knowledge distillation for PyTorch, extended by plugins."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def plugins(as_json: bool) -> None:
    """List plugins with their version, hooks and the names they registered."""
    show_plugins(as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def doctor(as_json: bool) -> None:
    """Show which backend the fused KD loss uses (native kernel or PyTorch fallback) and why."""
    from .ops import backend_status  # imports torch: only for this command

    status = backend_status()
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(f"kd_kl_div backend: {status['backend']}")
    click.echo(f"  native op: {'available' if status['native_available'] else 'missing'} "
               f"({status['native_source']}): {status['reason']}")
    click.echo(f"  native kernels for: {', '.join(status['native_devices']) or 'none'}")
    click.echo(f"  torch {status['torch_version']}, CPU capability {status['cpu_capability']}, "
               f"CUDA {'available' if status['cuda_available'] else 'not available'}")
    for name, value in status["env_overrides"].items():
        click.echo(f"  {name}={value}")
    click.echo(f"  ({status['force_torch_env']}=1 forces the PyTorch fallback)")


@cli.command()
def demo() -> None:
    """Run the demo. For now it lists the plugins, as `kdplug plugins` does."""
    show_plugins(as_json=False)


def show_plugins(as_json: bool) -> None:
    report = plugin_report()
    click.echo(json.dumps(report, indent=2) if as_json else format_plugin_report(report))


def format_plugin_report(report: Dict[str, Any]) -> str:
    lines: List[str] = []
    for plugin in report["plugins"]:
        origin = (f"{plugin['distribution']} {plugin['version']}" if plugin["distribution"]
                  else "registered in-process")
        lines.append(f"{plugin['name']}  ({origin})")
        lines.append(f"  hooks: {', '.join(plugin['hooks']) or '(none)'}")
        for kind, names in plugin["registered"].items():
            if names:
                lines.append(f"  {kind}: {', '.join(names)}")
    if not report["plugins"]:
        lines.append("no plugins loaded")
    if report["failed"]:
        lines.append("failed to load:")
        lines += [f"  {f['name']}  ({f['distribution']} {f['version']}): {f['error']}"
                  for f in report["failed"]]
    if report["skipped"]:
        lines.append("skipped:")
        lines += [f"  {s['name']}  ({s['distribution']} {s['version']}): {s['reason']}"
                  for s in report["skipped"]]
    return "\n".join(lines)


main = cli
