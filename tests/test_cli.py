"""The CLI: a thin layer over kdplug's Python API."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import kdplug
from kdplug.cli import cli


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
