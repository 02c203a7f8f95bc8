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
from .errors import KdplugError, MissingExtraWarning, PluginLoadWarning


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
              help="torch CPU threads (default 1: the demo's models are small).")
@click.option("--quiet", is_flag=True, default=None, help="No per-epoch lines or progress bars.")
def demo(out: Any, seed: Any, device: Any, threads: Any, quiet: Any) -> None:
    """Distil on scikit-learn's digits: teacher, scratch student, distilled student side by side."""
    from .engine.demo import DEMO_SUMMARY, run_demo

    click.echo(DEMO_SUMMARY)
    result = run_demo(out=out, seed=seed, device=device, threads=threads, quiet=quiet)
    click.echo(result.table())
    curves = result.out / "curves.png"
    click.echo(f"report: {result.out / 'report.json'}"
               + (f"  curves: {curves}" if curves.exists() else ""))


_OPTION_TABLE_FLAGS = (("teacher_option", "teacher_options"), ("student_option", "student_options"),
                       ("data_option", "data_options"), ("loss_option", "loss_options"))


@cli.command()
@click.option("--teacher", help="Teacher name (`kdplug plugins` lists them).")
@click.option("--student", help="Student name.")
@click.option("--data", help="Data provider name.")
@click.option("--loss", help="Loss name (default kd+ce).")
@click.option("--temperature", "-T", type=float, help="Softmax temperature T > 0 (default 4).")
@click.option("--alpha", type=float, help="Weight of the soft-target term in [0, 1] (default 0.9).")
@click.option("--epochs", type=int, help="Student epochs (default 10).")
@click.option("--teacher-epochs", type=int, help="Teacher epochs on the labels (default: --epochs).")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False),
              help="Load the teacher from this checkpoint instead of training it.")
@click.option("--teacher-cache", type=click.Path(file_okay=False),
              help="Learn from the teacher outputs cached in this folder by `kdplug "
                   "cache-teacher` (checked against this run; no teacher phase).")
@click.option("--teacher-cache-verify", type=click.Choice(["full", "lazy", "size"]),
              help="Cache checksums: all before training (full, default), each chunk on first "
                   "read (lazy), or file sizes only (size).")
@click.option("--baseline/--no-baseline", default=None,
              help="Also train the student from scratch (same budget and seed).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Output folder (default runs/distill-<time>).")
@click.option("--resume", is_flag=True, default=None, help="Continue the run in --out.")
@click.option("--overwrite", is_flag=True, default=None, help="Start over in an --out that holds a run.")
@click.option("--device", help="auto | cpu | cuda | cuda:N (default auto).")
@click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), help="Mixed precision (autocast).")
@click.option("--seed", type=int, help="Random seed (default 0).")
@click.option("--batch-size", type=int, help="Global batch size (default 64).")
@click.option("--eval-batch-size", type=int, help="Evaluation batch size per process (default 256).")
@click.option("--optimizer", type=click.Choice(["adamw", "adam", "sgd"]), help="Default adamw.")
@click.option("--lr", type=float, help="Learning rate (default 1e-3).")
@click.option("--teacher-lr", type=float, help="Teacher learning rate (default: --lr).")
@click.option("--weight-decay", type=float, help="Weight decay (default 0.01).")
@click.option("--momentum", type=float, help="SGD momentum (default 0.9).")
@click.option("--scheduler", type=click.Choice(["cosine", "linear", "constant"]),
              help="LR schedule per step (default cosine).")
@click.option("--warmup-steps", type=int, help="Linear LR warm-up steps (default 0).")
@click.option("--grad-clip", type=float, help="Max gradient norm (default: none).")
@click.option("--num-workers", type=int, help="DataLoader worker processes (default 0).")
@click.option("--threads", type=int, help="torch CPU threads (default: torch's choice).")
@click.option("--checkpoint-every", type=int,
              help="Also checkpoint every N steps (default: at each epoch's end only).")
@click.option("--quiet", is_flag=True, default=None, help="No per-epoch lines or progress bars.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML file with the same keys (flags override it).")
@click.option("--teacher-option", multiple=True, metavar="KEY=VALUE",
              help="Teacher factory option (repeatable), e.g. dropout=0.1.")
@click.option("--student-option", multiple=True, metavar="KEY=VALUE", help="Student factory option.")
@click.option("--data-option", multiple=True, metavar="KEY=VALUE",
              help="Data provider option, e.g. root=data or download=false.")
@click.option("--loss-option", multiple=True, metavar="KEY=VALUE", help="Loss factory option.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
def distill(config_file: Any, as_json: bool, **options: Any) -> None:
    """Train the teacher, distil the student, (--baseline) train the student alone; compare.

    Writes report.json, metrics.jsonl, curves.png, config.json/.toml and checkpoints/ to --out.
    Runs under `torchrun --nproc_per_node=K` as it is (DistributedDataParallel).
    """
    import os

    from .engine import distill as run_distill
    from .engine.config import parse_options

    for flag, key in _OPTION_TABLE_FLAGS:
        items = options.pop(flag)
        options[key] = parse_options(items, "--" + flag.replace("_", "-")) if items else None
    result = run_distill(config=config_file, **options)
    if int(os.environ.get("RANK", "0")) == 0:
        if as_json:
            click.echo(json.dumps(result.report, indent=2))
        else:
            click.echo(result.table())
            click.echo(f"outputs: {result.out}")


@cli.command("cache-teacher")
@click.option("--teacher", required=True, help="Teacher name (or hf:PATH; `kdplug plugins`).")
@click.option("--data", required=True, help="Data provider name (its training split is cached).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache folder.")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False),
              help="The teacher's weights, e.g. checkpoints/teacher.pt of a `kdplug distill` run.")
@click.option("--teacher-option", multiple=True, metavar="KEY=VALUE",
              help="Teacher factory option (repeatable).")
@click.option("--data-option", multiple=True, metavar="KEY=VALUE",
              help="Data provider option (repeatable); use the same ones with `kdplug distill`.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Storage of dense logits (or top-k log-probabilities).")
@click.option("--top-k", type=int, default=None,
              help="Keep the K largest classes per row (indices + log-probabilities): for large "
                   "vocabularies and token sequences. Default: dense logits.")
@click.option("--chunk-size", type=int, default=1024, show_default=True,
              help="Samples per chunk (the unit of writing, checksumming and --resume).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Teacher batch size.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), default="none",
              show_default=True, help="Run the teacher under autocast.")
@click.option("--resume", is_flag=True,
              help="Continue (or repair) the cache in --out: verified chunks are kept.")
@click.option("--overwrite", is_flag=True, help="Delete the cache in --out first.")
@click.option("--allow-random-transforms", is_flag=True,
              help="The training transform is random: cache --views augmented views per sample "
                   "(replayed exactly by `kdplug distill --teacher-cache` with the same --seed).")
@click.option("--views", type=int, default=1, show_default=True,
              help="Augmented views per sample (with --allow-random-transforms).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the augmented views (and of a teacher built from its name).")
@click.option("--no-evaluate", is_flag=True,
              help="Skip measuring the teacher on the test split (kept in the manifest).")
@click.option("--num-workers", type=int, default=0, show_default=True,
              help="DataLoader workers.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest instead of a summary.")
def cache_teacher(teacher: str, data: str, out: str, teacher_option: Any, data_option: Any,
                  no_evaluate: bool, as_json: bool, **options: Any) -> None:
    """Run a teacher once over a data set's training split and cache its outputs in --out.

    Dense logits or top-k (indices + log-probabilities), in chunks with checksums, finished by an
    atomic manifest; `kdplug distill --teacher-cache DIR` then trains students without running
    the teacher. Runs under `torchrun` as it is (each process writes its shard).
    """
    import os

    from .cache.writer import cache_teacher as run_cache_teacher
    from .engine.config import parse_options

    result = run_cache_teacher(
        teacher, data, out,
        teacher_options=parse_options(teacher_option, "--teacher-option"),
        data_options=parse_options(data_option, "--data-option"),
        evaluate_teacher=not no_evaluate, **options)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps(result.manifest, indent=2) if as_json else result.summary())


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
