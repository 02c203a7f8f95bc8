"""The registry: who registered what, and clear errors for duplicates, unknown names, bad factories."""
from __future__ import annotations

import pytest
import torch

import kdplug
from kdplug.errors import (DuplicateNameError, InvalidFactoryError, KdplugError, PluginError,
                           UnknownNameError, UnknownOptionError)
from kdplug.plugins import DISABLE_ENV, LOAD_ENV
from kdplug.registry import Registration, Registry


def teacher_plugin(*names, factory=lambda **options: torch.nn.Linear(4, 3)):
    """A plugin object registering teachers `names`, all built by `factory`."""
    class Plugin:
        @kdplug.hookimpl
        def register_teachers(register):
            for name in names:
                register(name, factory)
    return Plugin


@pytest.fixture(autouse=True)
def isolated(no_installed_plugins):
    """Every test here sees only the plugins it registers."""


def test_duplicate_name_across_two_plugins_names_both():
    kdplug.register_plugin(teacher_plugin("resnet"), name="alpha")
    try:
        with pytest.raises(DuplicateNameError,
                           match="teacher 'resnet' is registered by two plugins: 'alpha' and 'beta'"):
            kdplug.register_plugin(teacher_plugin("resnet"), name="beta")
        assert kdplug.list_teachers()["resnet"].plugin == "alpha"  # beta was rolled back
        assert not kdplug.get_plugin_manager().has_plugin("beta")
    finally:
        kdplug.unregister_plugin("alpha")


def test_duplicate_message_names_distributions_of_installed_plugins():
    registry = Registry()
    registry.add(Registration("loss", "kd", len, "one", "kdplug-one", "1.0"))
    with pytest.raises(DuplicateNameError) as error:
        registry.add(Registration("loss", "kd", len, "two", "kdplug-two", "2.0"))
    assert "'one' (kdplug-one 1.0) and 'two' (kdplug-two 2.0)" in str(error.value)
    assert "KDPLUG_DISABLE_PLUGINS=<plugin>" in str(error.value)


def test_same_plugin_registering_a_name_twice():
    with pytest.raises(DuplicateNameError, match="registered twice by plugin 'twice'"):
        kdplug.register_plugin(teacher_plugin("a", "a"), name="twice")


def test_unknown_name_lists_known_names_and_suggests_the_closest():
    kdplug.register_plugin(teacher_plugin("mlp-large", "cnn-large"), name="models")
    try:
        with pytest.raises(UnknownNameError) as error:
            kdplug.create_teacher("mlp-larg")
    finally:
        kdplug.unregister_plugin("models")
    assert str(error.value).startswith("unknown teacher 'mlp-larg'; did you mean 'mlp-large'? "
                                       "Known teachers: 'cnn-large', 'mlp-large' Installed "
                                       "plugins that were not loaded (the name may be theirs): ")
    assert str(error.value).endswith(" (disabled by KDPLUG_DISABLE_PLUGINS)")  # all left out here
    assert isinstance(error.value, (KdplugError, LookupError, ValueError))


def test_an_unknown_name_says_a_disabled_plugin_may_have_it(monkeypatch):
    monkeypatch.delenv(LOAD_ENV)
    monkeypatch.setenv(DISABLE_ENV, "cifar")
    with pytest.raises(UnknownNameError, match=r"^unknown teacher 'cnn-teacher'. Known teachers: "
                                               r".* Installed plugins that were not loaded \(the "
                                               r"name may be theirs\): 'cifar' \(disabled by "
                                               r"KDPLUG_DISABLE_PLUGINS\)$"):
        kdplug.create_teacher("cnn-teacher")


def test_a_misspelt_factory_option_names_the_closest_and_lists_them():
    kdplug.register_plugin(teacher_plugin(
        "net", factory=lambda *, width=4, depth=2: torch.nn.Linear(width, depth)), name="nets")
    try:
        with pytest.raises(UnknownOptionError, match=r"^the teacher 'net' \(from plugin 'nets'\) "
                                                     r"has no option 'widht'; did you mean "
                                                     r"'width'\? Its options: width, depth$") as err:
            kdplug.create_teacher("net", widht=8)
        assert isinstance(err.value, KdplugError) and isinstance(err.value, TypeError)
        with pytest.raises(UnknownOptionError, match=r"has no options 'a', 'b'\. Its options"):
            kdplug.create_teacher("net", a=1, b=2)
        assert kdplug.create_teacher("net", width=8).in_features == 8
    finally:
        kdplug.unregister_plugin("nets")
    kdplug.register_plugin(teacher_plugin("any"), name="open")  # factory(**options): any option
    try:
        assert isinstance(kdplug.create_teacher("any", whatever=1), torch.nn.Linear)
    finally:
        kdplug.unregister_plugin("open")


def test_unknown_name_when_nothing_of_that_kind_is_registered():
    with pytest.raises(UnknownNameError, match="unknown dataset 'cifar10': no datasets are "
                                               "registered"):
        kdplug.create_dataset("cifar10")


def test_unknown_kind():
    with pytest.raises(UnknownNameError, match="unknown kind 'teachers'; expected one of"):
        kdplug.get_registration("teachers", "x")


def test_non_callable_factory_names_the_plugin():
    with pytest.raises(InvalidFactoryError, match=r"plugin 'bad' registered teacher 'oops' with "
                                                  r"factory 42 \(int\); expected a callable"):
        kdplug.register_plugin(teacher_plugin("oops", factory=42), name="bad")
    assert not kdplug.get_plugin_manager().has_plugin("bad")


def test_factory_building_the_wrong_thing_names_the_plugin():
    kdplug.register_plugin(teacher_plugin("not-a-module", factory=lambda **o: "logits"),
                           name="wrong")
    try:
        with pytest.raises(InvalidFactoryError, match="from plugin 'wrong' returned 'logits' "
                                                      r"\(str\); expected a torch.nn.Module"):
            kdplug.create_teacher("not-a-module")
    finally:
        kdplug.unregister_plugin("wrong")


def test_create_passes_options_and_records_the_origin():
    class Plugin:
        @kdplug.hookimpl
        def register_losses(register):
            register("scaled", lambda scale=1.0: (lambda s, t, batch: scale * (s - t).sum()),
                     description="test loss")

    kdplug.register_plugin(Plugin, name="my-losses")
    try:
        loss = kdplug.create_loss("scaled", scale=2.0)
        assert loss(torch.ones(2), torch.zeros(2), None).item() == 4.0
        entry = kdplug.list_losses()["scaled"]
        assert (entry.kind, entry.name, entry.plugin, entry.info) == (
            "loss", "scaled", "my-losses", {"description": "test loss"})
    finally:
        kdplug.unregister_plugin("my-losses")


def test_empty_name_is_refused():
    with pytest.raises(PluginError, match="registered a teacher named ''; expected a non-empty"):
        kdplug.register_plugin(teacher_plugin(""), name="blank")


def test_hook_returning_a_value_is_a_contract_error():
    class Returns:
        @kdplug.hookimpl
        def register_students(register):
            return {"small": object}

    with pytest.raises(PluginError, match="register_students returned .*register\\(name, factory"):
        kdplug.register_plugin(Returns)


def test_hook_raising_names_the_plugin_and_keeps_the_cause():
    class Raises:
        @kdplug.hookimpl
        def register_datasets(register):
            raise OSError("no disk")

    with pytest.raises(PluginError, match="plugin 'Raises' failed in register_datasets: "
                                          "OSError: no disk") as error:
        kdplug.register_plugin(Raises)
    assert isinstance(error.value.__cause__, OSError)
