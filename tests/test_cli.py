"""The CLI: a thin layer over kdplug's Python API."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Optional

import pytest
from click.testing import CliRunner

import kdplug
from kdplug.cli import cli
from kdplug.settings import setting


class Pair:
    @kdplug.hookimpl
    def register_teachers(register):
        register("big", lambda **options: None)

    @kdplug.hookimpl
    def register_students(register):
        register("small", lambda **options: None)


@pytest.fixture
def pair(no_installed_plugins):
    name = kdplug.register_plugin(Pair, name="pair")
    try:
        yield name
    finally:
        kdplug.unregister_plugin(name)


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output == f"kdplug, version {kdplug.__version__}\n"


@pytest.mark.parametrize("command", [[]] + [[name] for name in cli.commands])
def test_every_command_has_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert result.output.startswith(f"Usage: cli {' '.join(command)}".rstrip())


def test_plugins_lists_hooks_and_registered_names(pair):
    result = invoke("plugins")
    assert result.exit_code == 0
    assert result.output.startswith("pair  (registered in-process)\n"
                                    "  hooks: register_students, register_teachers\n"
                                    "  teacher: big\n"
                                    "  student: small\n"
                                    "skipped:\n")


def test_plugins_json_is_the_api_report(pair):
    result = invoke("plugins", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output) == kdplug.plugin_report()
    [plugin] = json.loads(result.output)["plugins"]
    assert plugin["registered"]["teacher"] == ["big"]


def test_demo_is_a_command_with_help():
    # The demo itself trains for a minute; tests/test_distill.py runs its code path briefly.
    result = invoke("demo", "--help")
    assert result.exit_code == 0 and "digits" in result.output


def test_kdplug_errors_print_a_message_not_a_traceback(no_installed_plugins):
    class Raises:
        @kdplug.hookimpl
        def register_losses(register):
            raise RuntimeError("boom")

    pm = kdplug.get_plugin_manager()
    pm.register(Raises)  # raw pluggy: the error waits for the registry to be built
    try:
        result = CliRunner().invoke(cli, ["plugins"])
    finally:
        pm.unregister(Raises)
    assert result.exit_code == 1
    assert result.output == ("Error: plugin 'Raises' failed in register_losses: "
                             "RuntimeError: boom\n")


def test_no_plugins_loaded_and_why(no_installed_plugins):
    output = invoke("plugins").output
    assert output.startswith("no plugins loaded\nskipped:\n")
    assert "  cifar  (kdplug 0.1.0): disabled by KDPLUG_DISABLE_PLUGINS\n" in output


# ----------------------------------------------------------------------------- generated options

#: The flags of `kdplug distill` and `kdplug cache-teacher` before their options were generated
#: from DistillConfig and CacheConfig: every one must still be accepted.
DISTILL_FLAGS_BEFORE = (
    "--teacher --student --data --loss --temperature -T --alpha --epochs --teacher-epochs "
    "--teacher-checkpoint --teacher-cache --teacher-cache-verify --baseline --no-baseline --out "
    "--resume --overwrite --device --amp --seed --batch-size --eval-batch-size --optimizer --lr "
    "--teacher-lr --weight-decay --momentum --scheduler --warmup-steps --grad-clip "
    "--num-workers --threads --checkpoint-every --quiet --config --teacher-option "
    "--student-option --data-option --loss-option --json").split()
CACHE_FLAGS_BEFORE = (
    "--teacher --data --out --teacher-checkpoint --teacher-option --data-option --dtype --top-k "
    "--chunk-size --batch-size --device --amp --resume --overwrite --allow-random-transforms "
    "--views --seed --no-evaluate --num-workers --threads --quiet --json").split()


def _flags(command):
    return {flag for param in command.params for flag in param.opts + param.secondary_opts}


def _help_entries(text):
    """`--help` as {first flag: the option's help text on one line}."""
    entries, flag = {}, None
    for line in text.split("Options:\n", 1)[1].splitlines():
        stripped = line.strip()
        if stripped.startswith("-") and line.startswith("  ") and not line.startswith("   "):
            names = stripped.split("  ")[0]
            flag = [n for n in names.replace(",", " ").split() if n.startswith("--")][0]
            entries[flag] = stripped[len(names):].strip()
        elif flag is not None:
            entries[flag] += " " + stripped
    return {k: " ".join(v.split()) for k, v in entries.items()}


@pytest.mark.parametrize("command, config, extra", [
    ("distill", "DistillConfig", {"--config", "--json", "--help"}),
    ("cache-teacher", "CacheConfig", {"--json", "--help"}),
])
def test_help_shows_every_field_with_its_help_and_default(command, config, extra):
    from kdplug.cache.config import CacheConfig
    from kdplug.engine.config import DistillConfig
    from kdplug.settings import settings_of

    fields = settings_of({"DistillConfig": DistillConfig, "CacheConfig": CacheConfig}[config])
    output = CliRunner().invoke(cli, [command, "--help"], terminal_width=400,
                                max_content_width=400).output  # one line per option
    entries = _help_entries(output)
    assert set(entries) == {f.long_flag for f in fields} | extra
    for field in fields:
        text = entries[field.long_flag]
        assert " ".join(field.help.split()) in text, field.name
        if field.shown_default is not None:
            assert f"[default: {field.shown_default}]" in text, field.name
        if field.choices:
            assert "[" + "|".join(field.choices) + "]" in output


def test_todays_flags_are_all_still_there():
    assert set(DISTILL_FLAGS_BEFORE) <= _flags(cli.commands["distill"])
    assert set(CACHE_FLAGS_BEFORE) <= _flags(cli.commands["cache-teacher"])


@dataclass
class Settings:
    """A settings dataclass of the tests' own, to read the generator's output."""

    size: int = setting(3, help="A size.")
    rate: Optional[float] = setting(None, short="-r", help="A rate.")
    mode: str = setting("a", choices=("a", "b"), help="A mode.")
    fast: bool = setting(False, help="Go fast.")
    check: bool = setting(True, negatable=True, help="Check.")
    extra: Dict[str, Any] = setting(default_factory=dict, flag="--extra-option", help="Extra.")


def test_a_field_is_an_option_of_its_type():
    """Types, choices, option tables, switches: what each field becomes on the command line."""
    import click

    from kdplug.cli_options import given_settings, settings_options

    seen = {}

    @click.command()
    @settings_options(Settings)
    def run(**values):
        seen.update(given_settings(Settings, values))

    runner = CliRunner()
    assert runner.invoke(run, []).exit_code == 0 and seen == {}  # nothing given, nothing passed
    result = runner.invoke(run, ["--size", "7", "-r", "0.5", "--mode", "b", "--fast",
                                 "--no-check", "--extra-option", "k=[1, 2]",
                                 "--extra-option", "name=x"])
    assert result.exit_code == 0, result.output
    assert seen == {"size": 7, "rate": 0.5, "mode": "b", "fast": True, "check": False,
                    "extra": {"k": [1, 2], "name": "x"}}
    assert Settings(**seen).size == 7
    bad = runner.invoke(run, ["--mode", "c"])
    assert bad.exit_code == 2 and "'c' is not one of 'a', 'b'" in bad.output
    assert "[default: 3]" in runner.invoke(run, ["--help"]).output


def test_cache_teacher_options_are_checked_by_name():
    from kdplug.cache import CacheError, cache_teacher

    with pytest.raises(CacheError, match=r"unknown cache_teacher option 'chunksize'; did you "
                                         r"mean 'chunk_size'\?"):
        cache_teacher("t", "d", "out", chunksize=3)
    with pytest.raises(CacheError, match="missing: data, out"):
        cache_teacher("t")
    with pytest.raises(CacheError, match=r"dtype must be one of float32, float16, bfloat16, "
                                         r"got 'int8'"):
        cache_teacher("t", "d", "out", dtype="int8")
    with pytest.raises(CacheError, match=r"^top_k must be an int >= 1, got 0; to cache dense "
                                         r"logits \(every class\), leave --top-k out$"):
        cache_teacher("t", "d", "out", top_k=0)


def test_a_flag_with_a_bad_value_is_named_as_a_flag():
    """Without a config file there is no 'config key' to speak of."""
    result = CliRunner().invoke(cli, ["distill", "--epochs", "-1"])
    assert result.exit_code == 1
    assert result.output == "Error: epochs (--epochs) must be an int >= 1, got -1\n"


def test_storage_dtypes_are_the_format_s():
    from kdplug.cache.config import STORAGE_DTYPES
    from kdplug.cache.format import DTYPES

    assert set(STORAGE_DTYPES) == set(DTYPES)


# ----------------------------------------------------------------------------- plugins

class Described:
    @kdplug.hookimpl
    def register_teachers(register):
        register("big", lambda **options: None, description="a big one")
        register("bigger", lambda **options: None)


def test_plugins_shows_each_name_with_its_description(no_installed_plugins):
    kdplug.register_plugin(Described, name="described")
    try:
        output = invoke("plugins").output
        report = kdplug.plugin_report()
    finally:
        kdplug.unregister_plugin("described")
    assert output.startswith("described  (registered in-process)\n"
                             "  hooks: register_teachers\n"
                             "  teacher: big     a big one\n"
                             "  teacher: bigger\n")
    [plugin] = report["plugins"]
    assert plugin["descriptions"]["teacher"] == {"big": "a big one", "bigger": None}


class Greeter:
    @kdplug.hookimpl
    def register_commands(cli):
        import click

        @cli.command()
        @click.option("--name", default="world", help="Whom to greet.")
        def hello(name):
            """Say hello (a plugin's command)."""
            if name == "nobody":
                raise kdplug.KdplugError("nobody is not a name")
            click.echo(f"hello, {name}; {len(kdplug.list_teachers())} teachers")


@pytest.fixture
def fresh_cli():
    """The cli group as a new command line sees it: plugin commands not added yet."""
    from kdplug.cli import KdplugGroup

    group = KdplugGroup(name="cli", commands=dict(cli.commands))
    yield group


def test_a_plugin_adds_a_command(no_installed_plugins, fresh_cli):
    kdplug.register_plugin(Greeter, name="greeter")
    try:
        runner = CliRunner()
        result = runner.invoke(fresh_cli, ["hello", "--name", "kd"])
        listing = runner.invoke(fresh_cli, ["--help"]).output
        error = runner.invoke(fresh_cli, ["hello", "--name", "nobody"])
        report = kdplug.plugin_report()
        text = runner.invoke(fresh_cli, ["plugins"]).output
    finally:
        kdplug.unregister_plugin("greeter")
    assert result.exit_code == 0 and result.output == "hello, kd; 0 teachers\n"
    assert "hello" in listing and "Say hello (a plugin's command)." in listing
    assert error.exit_code == 1 and error.output == "Error: nobody is not a name\n"
    assert report["plugins"][0]["commands"] == ["hello"]
    assert "  hooks: register_commands\n  commands: hello\n" in text


def test_a_plugin_command_cannot_take_a_builtin_name(no_installed_plugins, fresh_cli):
    class Clash:
        @kdplug.hookimpl
        def register_commands(cli):
            @cli.command("distill")
            def mine():
                pass

    kdplug.register_plugin(Clash, name="clash")
    try:
        result = CliRunner().invoke(fresh_cli, ["no-such-command"])
        builtin = CliRunner().invoke(fresh_cli, ["distill", "--help"])
    finally:
        kdplug.unregister_plugin("clash")
    assert result.exit_code == 1
    assert ("Error: plugin 'clash' adds the command 'distill', which kdplug itself already has"
            in result.output)
    assert builtin.exit_code == 0  # built-in commands never wait for the plugins' ones


def test_a_plugin_failing_in_register_commands_is_named(no_installed_plugins):
    class Broken:
        @kdplug.hookimpl
        def register_commands(cli):
            raise RuntimeError("no commands today")

    kdplug.register_plugin(Broken, name="broken")
    try:
        result = invoke("plugins")
    finally:
        kdplug.unregister_plugin("broken")
    assert result.exit_code == 1
    assert result.output == ("Error: plugin 'broken' failed in register_commands: "
                             "RuntimeError: no commands today\n")
