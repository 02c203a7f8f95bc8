"""The plugin manager: real entry points, block/allow lists, failures, in-process plugins."""
from __future__ import annotations

import json
import sys

import pluggy
import pytest

import kdplug
from kdplug.errors import PluginError, PluginLoadWarning, UnknownHookError
from kdplug.plugins import builtin_plugin_names, get_plugin_manager, reset_plugin_manager

GOOD_PLUGIN = '''
import kdplug

def build_teacher(**options):
    raise NotImplementedError  # listing never builds

@kdplug.hookimpl
def register_teachers(register):
    register("good-teacher", build_teacher, description="for tests")

@kdplug.hookimpl
def register_losses(register):
    register("good-loss", build_teacher)
'''

BROKEN_PLUGIN = 'raise RuntimeError("broken on purpose")\n'

MISSPELT_PLUGIN = '''
import kdplug

@kdplug.hookimpl
def register_teacher(register):  # should be register_teachers
    pass
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory, make_distribution):
    """A folder that, on sys.path, installs one working and one broken plugin."""
    site = tmp_path_factory.mktemp("site")
    make_distribution(site, "kdplug-good", "1.2.3", {"kdplug_good": GOOD_PLUGIN},
                      {"good": "kdplug_good"})
    make_distribution(site, "kdplug-broken", "0.0.1", {"kdplug_broken": BROKEN_PLUGIN},
                      {"broken": "kdplug_broken"})
    return site


def report(run_kdplug, site, **env):
    result = run_kdplug("plugins", "--json", pythonpath=[site], env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def by_name(report_):
    return {plugin["name"]: plugin for plugin in report_["plugins"]}


@pytest.fixture(scope="module")
def default_run(run_kdplug, site):
    return report(run_kdplug, site)


def test_entry_point_plugin_listed_with_version_hooks_and_registrations(default_run):
    good = by_name(default_run[0])["good"]
    assert good["distribution"] == "kdplug-good"
    assert good["version"] == "1.2.3"
    assert good["module"] == "kdplug_good"
    assert good["hooks"] == ["register_losses", "register_teachers"]
    assert good["registered"] == {"teacher": ["good-teacher"], "student": [],
                                  "loss": ["good-loss"], "dataset": []}


def test_builtin_plugins_come_through_the_same_entry_points(default_run):
    plugins = by_name(default_run[0])
    for name in ("cifar", "transformer"):
        assert plugins[name]["distribution"] == "kdplug"
        assert plugins[name]["version"] == kdplug.__version__


def test_plugin_failing_on_import_is_reported_and_others_still_load(default_run):
    data, stderr = default_run
    assert data["failed"] == [{
        "name": "broken", "distribution": "kdplug-broken", "version": "0.0.1",
        "entry_point": "kdplug_broken", "error": "RuntimeError: broken on purpose"}]
    assert "broken" not in by_name(data)
    assert {"good", "cifar", "transformer"} <= set(by_name(data))
    assert "Warning: kdplug plugin 'broken' (kdplug-broken 0.0.1) failed to load" in stderr


def test_failed_plugins_are_shown_by_the_text_listing(run_kdplug, site):
    result = run_kdplug("plugins", pythonpath=[site], env={"KDPLUG_LOAD_PLUGINS": "good,broken"})
    assert result.returncode == 0, result.stderr
    assert "failed to load:\n  broken  (kdplug-broken 0.0.1): RuntimeError: broken on purpose" \
        in result.stdout
    assert "good  (kdplug-good 1.2.3)\n  hooks: register_losses, register_teachers" in result.stdout


def test_disable_list_blocks_plugins(run_kdplug, site):
    blocked = ["broken", *builtin_plugin_names()]
    data, _ = report(run_kdplug, site, KDPLUG_DISABLE_PLUGINS=" , ".join(blocked))
    assert set(by_name(data)) == {"good"}
    assert data["failed"] == []
    assert {(s["name"], s["reason"]) for s in data["skipped"]} == {
        (name, "disabled by KDPLUG_DISABLE_PLUGINS") for name in blocked}


def test_load_list_loads_only_those_third_party_plugins_and_every_builtin(run_kdplug, site):
    data, stderr = report(run_kdplug, site, KDPLUG_LOAD_PLUGINS="good,nosuch")
    assert set(by_name(data)) == {"good", *builtin_plugin_names()}
    assert data["failed"] == []  # broken was never imported
    assert "KDPLUG_LOAD_PLUGINS names 'nosuch', but no installed plugin is called that" in stderr


def test_builtin_losses_survive_a_load_list_naming_only_a_third_party_plugin(run_kdplug, site):
    data, _ = report(run_kdplug, site, KDPLUG_LOAD_PLUGINS="good")
    assert {"ce", "kd", "kd+ce"} <= set(by_name(data)["losses"]["registered"]["loss"])


def test_empty_load_list_loads_only_the_builtins(run_kdplug, site):
    data, _ = report(run_kdplug, site, KDPLUG_LOAD_PLUGINS="")
    assert set(by_name(data)) == set(builtin_plugin_names()) and data["failed"] == []
    assert {s["name"] for s in data["skipped"]} == {"good", "broken"}


def test_a_builtin_is_left_out_only_by_the_disable_list(run_kdplug, site):
    data, _ = report(run_kdplug, site, KDPLUG_LOAD_PLUGINS="good", KDPLUG_DISABLE_PLUGINS="cifar")
    assert "cifar" not in by_name(data) and "transformer" in by_name(data)


def test_misspelt_hook_in_installed_plugin_fails_loudly(run_kdplug, tmp_path, make_distribution):
    make_distribution(tmp_path, "kdplug-typo", "2.0", {"kdplug_typo": MISSPELT_PLUGIN},
                      {"typo": "kdplug_typo"})
    result = run_kdplug("plugins", pythonpath=[tmp_path], env={"KDPLUG_LOAD_PLUGINS": "typo"})
    assert result.returncode == 1
    assert ("Error: plugin 'typo' (kdplug-typo 2.0) implements unknown hook 'register_teacher' "
            "(did you mean 'register_teachers'?)") in result.stderr
    assert "KDPLUG_DISABLE_PLUGINS=typo" in result.stderr
    assert "Traceback" not in result.stderr


def test_same_distribution_twice_on_path_loads_once(monkeypatch, fresh_plugins, site):
    monkeypatch.setenv("KDPLUG_LOAD_PLUGINS", "good")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(site))
    try:
        pm = get_plugin_manager()
        names = [name for name, _ in pm.list_name_plugin()]
        assert names.count("good") == 1 and set(names) == {"good", *builtin_plugin_names()}
        assert pm.failed == []
    finally:
        sys.modules.pop("kdplug_good", None)


def test_two_distributions_claiming_one_plugin_name(monkeypatch, fresh_plugins, tmp_path,
                                                    make_distribution):
    for dist in ("kdplug-first", "kdplug-second"):
        make_distribution(tmp_path / dist, dist, "1.0", {}, {"same": "kdplug_cifar"})
        monkeypatch.syspath_prepend(str(tmp_path / dist))
    monkeypatch.setenv("KDPLUG_LOAD_PLUGINS", "same")
    monkeypatch.setenv("KDPLUG_DISABLE_PLUGINS", "cifar")  # the built-in of the same module
    with pytest.warns(PluginLoadWarning, match="'same'"):
        pm = get_plugin_manager()
    assert pm.has_plugin("same")
    [failed] = pm.failed
    assert failed.name == "same" and "already used by" in failed.error


def test_manager_loads_once_and_reset_reloads(fresh_plugins):
    pm = get_plugin_manager()
    assert kdplug.get_plugin_manager() is pm
    reset_plugin_manager()
    assert get_plugin_manager() is not pm


class Misspelt:
    @kdplug.hookimpl
    def register_student(register):  # should be register_students
        pass


def test_misspelt_hook_registered_in_process_fails(no_installed_plugins):
    with pytest.raises(UnknownHookError, match=r"unknown hook 'register_student' "
                                               r"\(did you mean 'register_students'\?\)"):
        kdplug.register_plugin(Misspelt)
    assert not get_plugin_manager().has_plugin("Misspelt")


def test_pluggy_check_pending_catches_a_misspelt_hook(no_installed_plugins):
    pm = get_plugin_manager()
    pm.register(Misspelt)  # raw pluggy: no kdplug check on the way in
    try:
        with pytest.raises(pluggy.PluginValidationError, match="register_student"):
            pm.check_pending()
    finally:
        pm.unregister(Misspelt)
    pm.check_pending()


def test_hook_with_wrong_arguments_names_the_plugin(no_installed_plugins):
    class WrongArgs:
        @kdplug.hookimpl
        def register_teachers(add):  # the spec's argument is `register`
            pass

    with pytest.raises(PluginError, match="plugin 'WrongArgs' does not match kdplug's hookspecs"):
        kdplug.register_plugin(WrongArgs)


class Tiny:
    """An in-process plugin, as a test or notebook would write it."""

    @kdplug.hookimpl
    def register_students(register):
        register("tiny", lambda **options: options, size="xs")


def test_register_and_unregister_in_process(no_installed_plugins):
    name = kdplug.register_plugin(Tiny, name="tiny-plugin")
    try:
        assert name == "tiny-plugin"
        entry = kdplug.list_students()["tiny"]
        assert (entry.plugin, entry.distribution, entry.info) == ("tiny-plugin", None, {"size": "xs"})
        assert by_name(kdplug.plugin_report())["tiny-plugin"]["registered"]["student"] == ["tiny"]
    finally:
        assert kdplug.unregister_plugin("tiny-plugin") is Tiny
    assert kdplug.list_students() == {}  # the registry was rebuilt
    with pytest.raises(kdplug.KdplugError, match="no plugin 'tiny-plugin' is registered"):
        kdplug.unregister_plugin("tiny-plugin")


def test_blocked_name_cannot_be_registered_in_process(monkeypatch, fresh_plugins):
    monkeypatch.setenv("KDPLUG_LOAD_PLUGINS", "")
    monkeypatch.setenv("KDPLUG_DISABLE_PLUGINS", "Tiny")
    with pytest.warns(PluginLoadWarning):  # no installed plugin is called Tiny
        get_plugin_manager()
    with pytest.raises(PluginError, match="plugin 'Tiny' is blocked by KDPLUG_DISABLE_PLUGINS"):
        kdplug.register_plugin(Tiny)
