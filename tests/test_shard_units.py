"""Which submodules FSDP shards as units: a model's declaration, its plugin's, Hugging Face's
_no_split_modules, the default; and the models that cannot be sharded as declared."""
from __future__ import annotations

import pytest
from torch import nn

import kdplug
from kdplug.engine.components import Source, declared_units
from kdplug.engine.shard_units import ATTRIBUTE, shard_units


def paths(units):
    return [path for path, _ in units]


def test_the_default_takes_transformer_layers_and_leaves_the_rest_to_the_root():
    lm = kdplug.create_student("transformer-lm-student", num_layers=3, d_model=16, num_heads=2)
    assert paths(shard_units(lm)) == ["blocks.0", "blocks.1", "blocks.2"]  # tok, head: root


def test_the_default_takes_the_blocks_of_each_stage_and_a_sequentials_layers():
    resnet = kdplug.create_student("resnet8x4", num_classes=10)
    units = paths(shard_units(resnet))
    assert "layer1.0" in units and "layer3.0" in units and "layer1" not in units
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    assert paths(shard_units(mlp)) == ["1", "3"]  # the layers with parameters


def test_without_containers_the_default_takes_the_children_with_parameters():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

    assert paths(shard_units(Flat())) == ["a", "b"]


def test_a_model_declares_its_units_and_wildcards_match_one_segment():
    cnn = kdplug.create_student("cnn-student", in_channels=1, image_size=8, norm="none")
    assert getattr(cnn, ATTRIBUTE) == ("conv1", "conv2", "fc1")
    assert sorted(paths(shard_units(cnn))) == ["conv1", "conv2", "fc1"]
    lm = kdplug.create_student("transformer-lm-student", num_layers=2, d_model=16, num_heads=2)
    lm.kdplug_shard_units = ["blocks.*", "blocks.*.mlp"]
    # innermost first: FSDP shards a unit inside another before the outer one
    assert paths(shard_units(lm)) == ["blocks.0.mlp", "blocks.1.mlp", "blocks.0", "blocks.1"]


def test_a_plugin_declares_the_units_of_the_models_it_registers(fresh_plugins):
    class Plugin:
        @kdplug.hookimpl
        def register_students(self, register):
            register("two-linear", lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                     shard_units=["0"])

    kdplug.register_plugin(Plugin(), name="units-test")
    try:
        source = Source.of("student", "two-linear")
        model = source.registration.create()
        assert paths(shard_units(model, declared_units(source))) == ["0"]
    finally:
        kdplug.unregister_plugin("units-test")


def test_hugging_face_no_split_modules_name_the_block_classes():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

    class Model(nn.Module):
        _no_split_modules = ["Layer"]

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.encoder = nn.Module()
            self.encoder.stack = nn.ModuleList([Layer(), Layer()])

    assert paths(shard_units(Model())) == ["encoder.stack.0", "encoder.stack.1"]


def test_a_path_that_names_no_module_is_named_with_the_closest():
    lm = kdplug.create_student("transformer-lm-student", num_layers=1, d_model=16, num_heads=2)
    lm.kdplug_shard_units = ("blokcs.*",)
    with pytest.raises(kdplug.KdplugError, match=r"the student's kdplug_shard_units: 'blokcs.\*' "
                                                 r"names no module; did you mean 'blocks.0'\? "
                                                 r"\(its modules: tok, pos"):
        shard_units(lm, what="the student")


def test_tied_parameters_in_two_units_are_refused():
    lm = kdplug.create_student("transformer-lm-student", num_layers=1, d_model=16, num_heads=2)
    assert lm.head.weight is lm.tok.weight
    lm.kdplug_shard_units = ("tok",)
    with pytest.raises(kdplug.KdplugError, match=r"the parameter tok.weight is tied to "
                                                 r"head.weight, but they would be sharded in "
                                                 r"different units \('tok' and the model "
                                                 r"itself\)"):
        shard_units(lm, what="the student")


def test_a_model_without_parameters_cannot_be_sharded():
    with pytest.raises(kdplug.KdplugError, match=r"the teacher \(Softmax\) has no parameters to "
                                                 r"shard"):
        shard_units(nn.Softmax(dim=-1), what="the teacher")
