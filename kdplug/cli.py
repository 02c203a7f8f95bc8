"""``kdplug …``: a thin command-line layer over kdplug's Python API.

A built-in command is a function here decorated with ``@cli.command()``; a plugin adds its own
through the ``register_commands(cli)`` hook (kdplug/hookspecs.py). Either way it inherits
``--help`` and clean ``Error: …`` output for kdplug's errors. The options of ``distill`` and
``cache-teacher`` are made from the fields of DistillConfig and CacheConfig
(:mod:`kdplug.cli_options`): an option is added there, once.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable, Dict, List, Optional

import click

from ._version import __version__
from .api import plugin_report
from .cache.config import CacheConfig
from .cli_options import given_settings, settings_options
from .engine.config import DistillConfig
from .errors import KdplugError, MissingExtraWarning, PluginError, PluginLoadWarning


class KdplugGroup(click.Group):
    """Shows kdplug's errors as ``Error: …`` with exit status 1, not a traceback, in every command;
    adds the plugins' commands when a name is not a built-in one, or when all are listed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plugin_commands_added = False

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():  # restores showwarning afterwards
            warnings.showwarning = _plugin_warnings_as_messages(warnings.showwarning)
            try:
                return super().invoke(ctx)
            except KdplugError as exc:
                raise click.ClickException(str(exc)) from exc

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        command = super().get_command(ctx, name)
        if command is None and not self._plugin_commands_added:
            self.add_plugin_commands()  # built-in commands never wait for the plugins to load
            command = super().get_command(ctx, name)
        return command

    def list_commands(self, ctx: click.Context) -> List[str]:
        try:
            self.add_plugin_commands()
        except KdplugError as exc:  # --help still lists the built-in commands
            click.echo(f"Warning: {exc}", err=True)
        return super().list_commands(ctx)

    def add_plugin_commands(self) -> None:
        """The commands of every plugin's register_commands hook, once; a name that is taken is
        an error naming who has it."""
        if self._plugin_commands_added:
            return
        self._plugin_commands_added = True
        from .commands import plugin_commands

        owners: Dict[str, str] = {}
        for found in plugin_commands():
            if found.name in self.commands:
                owner = owners.get(found.name)
                held = f"plugin {owner!r}" if owner else "kdplug itself"
                raise PluginError(f"plugin {found.plugin!r} adds the command {found.name!r}, "
                                  f"which {held} already has; rename one, or leave a plugin out "
                                  f"with KDPLUG_DISABLE_PLUGINS=<plugin>")
            self.add_command(found.command, found.name)
            owners[found.name] = found.plugin


def _plugin_warnings_as_messages(show: Callable[..., None]) -> Callable[..., None]:
    # A plugin that failed to load, or a missing extra, is news for the user, not a source
    # location to debug.
    def show_warning(message, category, filename, lineno, file=None, line=None):  # type: ignore
        if issubclass(category, (PluginLoadWarning, MissingExtraWarning)):
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
    """List plugins: version, hooks, the names they registered (described), their commands."""
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
    cpu = status["native_cpu_capability"]
    if cpu:
        click.echo(f"  CPU kernels: {cpu['selected']} ({cpu['reason']}); built: "
                   f"{', '.join(cpu['compiled'])}; this CPU supports: {', '.join(cpu['supported'])}")
    click.echo(f"  torch {status['torch_version']}, ATen CPU capability {status['cpu_capability']}, "
               f"CUDA {'available' if status['cuda_available'] else 'not available'}")
    for name, value in status["env_overrides"].items():
        click.echo(f"  {name}={value}")
    click.echo(f"  ({status['force_torch_env']}=1 forces the PyTorch fallback)")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: runs/demo; a previous demo there is replaced).")
@click.option("--seed", type=int, default=None, help="Random seed (default 0).")
@click.option("--device", default=None, help="auto | cpu | cuda (default auto).")
@click.option("--threads", type=int, default=None,
              help="torch CPU threads (default 1: the showcase's models are small).")
@click.option("--quiet", is_flag=True, default=None, help="No per-epoch lines or progress bars.")
def demo(out: Any, seed: Any, device: Any, threads: Any, quiet: Any) -> None:
    """The showcase: few labelled digits, a 2.1M-parameter teacher, a 5.2k-parameter student."""
    from .engine.demo import demo_summary, run_demo

    click.echo(demo_summary())
    result = run_demo(out=out, seed=seed, device=device, threads=threads, quiet=quiet)
    click.echo(result.table())
    curves = result.out / "curves.png"
    click.echo(f"report: {result.out / 'report.json'}"
               + (f"  curves: {curves}" if curves.exists() else ""))


@cli.command()
@settings_options(DistillConfig)
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML file with the same keys (the options above override it).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
def distill(config_file: Any, as_json: bool, **options: Any) -> None:
    """Train the teacher, distil the student, (--baseline) train the student alone; compare.

    Writes report.json, metrics.jsonl, curves.png, config.json/.toml and checkpoints/ to --out.
    Runs under `torchrun --nproc_per_node=K` as it is (DistributedDataParallel).
    """
    from .engine.run import distill as run_distill

    result = run_distill(config=config_file, **given_settings(DistillConfig, options))
    if _is_rank_zero():
        if as_json:
            click.echo(json.dumps(result.report, indent=2))
        else:
            click.echo(result.table())
            click.echo(f"outputs: {result.out}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the recipes as JSON.")
def recipes(as_json: bool) -> None:
    """List the recipes: ready-made configs for `kdplug distill --config FILE`."""
    from .recipes import list_recipes

    found = list_recipes()
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in found], indent=2))
        return
    for recipe in found:
        click.echo(f"{recipe.name}: {recipe.summary}")
        for note in recipe.notes:
            click.echo(f"    {note}")
        click.echo(f"    kdplug distill --config {recipe.path}")


@cli.command("cache-teacher")
@settings_options(CacheConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest instead of a summary.")
def cache_teacher(as_json: bool, **options: Any) -> None:
    """Run a teacher once over a data set's training split and cache its outputs in --out.

    Dense logits or top-k (indices + log-probabilities), in chunks with checksums, finished by an
    atomic manifest; `kdplug distill --teacher-cache DIR` then trains students without running
    the teacher. Runs under `torchrun` as it is (each process writes its shard).
    """
    from .cache.writer import cache_teacher as run_cache_teacher

    result = run_cache_teacher(**given_settings(CacheConfig, options))
    if _is_rank_zero():
        click.echo(json.dumps(result.manifest, indent=2) if as_json else result.summary())


def _is_rank_zero() -> bool:
    """Under torchrun only rank 0 prints the result."""
    return int(os.environ.get("RANK", "0")) == 0


def show_plugins(as_json: bool) -> None:
    report = plugin_report()
    click.echo(json.dumps(report, indent=2) if as_json else format_plugin_report(report))


def format_plugin_report(report: Dict[str, Any]) -> str:
    """Each plugin: where it came from, its hooks, one line per name it registered (with its
    description) and the commands it adds; then the plugins that failed or were skipped."""
    lines: List[str] = []
    for plugin in report["plugins"]:
        origin = (f"{plugin['distribution']} {plugin['version']}" if plugin["distribution"]
                  else "registered in-process")
        lines.append(f"{plugin['name']}  ({origin})")
        lines.append(f"  hooks: {', '.join(plugin['hooks']) or '(none)'}")
        entries = [(f"{kind}: {name}", plugin["descriptions"][kind].get(name))
                   for kind, names in plugin["registered"].items() for name in names]
        width = max((len(label) for label, _ in entries), default=0)
        lines += [f"  {label.ljust(width)}  {about}" if about else f"  {label}"
                  for label, about in entries]
        if plugin["commands"]:
            lines.append(f"  commands: {', '.join(plugin['commands'])}")
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
