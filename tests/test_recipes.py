"""Recipes (recipes/*.toml, `kdplug recipes`) and the vision runs the issue names, end to end
through the CLI on generated data in CIFAR-100's on-disk format."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kdplug
from kdplug.cli import cli
from kdplug.engine.config import resolve_config
from kdplug.recipes import find_recipe, list_recipes, recipes_dir

from test_vision_models import write_cifar100

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CIFAR_RECIPES = ["cifar100-resnet32x4-resnet8x4-kd", "cifar100-resnet32x4-resnet8x4-dkd",
                 "cifar100-wrn_40_2-wrn_16_2-kd", "cifar100-wrn_40_2-wrn_16_2-dkd"]
TINY_DATA = ["--data-option", "download=false", "--data-option", "verify=false",
             "--data-option", "augment=false", "--batch-size", "4", "--eval-batch-size", "8",
             "--epochs", "1", "--teacher-epochs", "1", "--quiet", "--threads", "1"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar100(root, train=8, test=4)
    return root


def test_recipes_are_listed_with_their_published_numbers():
    names = [r.name for r in list_recipes()]
    assert set(CIFAR_RECIPES) | {"digits-showcase", "digits-cnn-kd"} <= set(names)
    dkd = find_recipe("cifar100-resnet32x4-resnet8x4-dkd.toml")
    assert any("DKD 76.32" in note for note in dkd.notes)
    cfg = resolve_config(str(dkd.path))
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (
        "sgd", 0.05, 5e-4, 64, 240)
    assert (cfg.scheduler, cfg.milestones, cfg.lr_decay) == ("step", (150, 180, 210), 0.1)
    assert cfg.loss_options == {"tckd_weight": 1.0, "nckd_weight": 8.0, "warmup_epochs": 20}
    result = invoke("recipes")
    assert result.exit_code == 0
    for name in CIFAR_RECIPES:
        assert f"{name}: " in result.output
    assert "kdplug distill --config" in result.output
    listed = json.loads(invoke("recipes", "--json").output)
    assert {r["name"] for r in listed} == set(names)
    with pytest.raises(kdplug.KdplugError, match="no recipe 'cifar100-resnet32x4-resnet8x4-dk'"
                                                 ".*did you mean"):
        find_recipe("cifar100-resnet32x4-resnet8x4-dk")


def test_recipes_dir_can_be_elsewhere(tmp_path, monkeypatch):
    (tmp_path / "mine.toml").write_text("# my recipe\nteacher = 'cnn-teacher'\nepochs = 3\n")
    monkeypatch.setenv("KDPLUG_RECIPES_DIR", str(tmp_path))
    assert recipes_dir() == tmp_path
    (recipe,) = list_recipes()
    assert (recipe.name, recipe.notes, recipe.config["epochs"]) == ("mine", ["my recipe"], 3)
    (tmp_path / "broken.toml").write_text("epohcs = 3\n")
    with pytest.raises(kdplug.KdplugError, match="unknown config key 'epohcs'.*broken.toml"):
        list_recipes()
    monkeypatch.setenv("KDPLUG_RECIPES_DIR", str(tmp_path / "missing"))
    with pytest.raises(kdplug.KdplugError, match="no recipes folder"):
        list_recipes()


@pytest.mark.parametrize("name", CIFAR_RECIPES)
def test_each_cifar100_recipe_runs_a_few_steps(name, cifar100_root, tmp_path):
    recipe = find_recipe(name)
    result = invoke("distill", "--config", recipe.path, "--data-option", f"root={cifar100_root}",
                    *TINY_DATA, "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["loss"], config["scheduler"], config["lr"]) == (recipe.config["loss"], "step",
                                                                   0.05)
    assert report["student"]["epochs"] == 1 and report["scratch"] is not None
    assert report["teacher"]["name"] == recipe.config["teacher"]


def test_cli_hint_from_torchvision_resnet50_to_mobilenet_by_module_paths(cifar100_root, tmp_path):
    result = invoke("distill", "--teacher", "torchvision:resnet50",
                    "--student", "torchvision:mobilenet_v3_small", "--data", "cifar100",
                    "--data-option", f"root={cifar100_root}", *TINY_DATA,
                    "--loss", "kd+ce+hint", "--loss-option", "student_layers=features.6",
                    "--loss-option", "teacher_layers=layer3", "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["teacher"]["name"] == "torchvision:resnet50"
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "student.pt", weights_only=False)
    projection = ckpt["state"]["loss"]["hidden.projections.s0_t0.weight"]
    assert tuple(projection.shape) == (1024, 40, 1, 1)  # learned: mobilenet 40 -> resnet50 1024


def test_cli_dkd_from_resnet32x4_to_resnet8x4(cifar100_root, tmp_path):
    result = invoke("distill", "--teacher", "resnet32x4", "--student", "resnet8x4",
                    "--data", "cifar100", "--data-option", f"root={cifar100_root}", *TINY_DATA,
                    "--loss", "dkd", "--loss-option", "warmup_epochs=2", "--baseline",
                    "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "resnet8x4" in result.output and "student (distilled)" in result.output
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in records} == {"teacher", "student", "scratch"}


def test_dkd_warmup_follows_the_engine_epochs(tmp_path):
    """The engine tells the loss each epoch: DKD's warm-up factor grows epoch by epoch."""
    factors = []

    class Spy:
        def on_epoch_end(self, phase, epoch, metrics):
            if phase == "student":
                factors.append(loss.term.warmup_factor())

    loss = kdplug.create_loss("dkd", warmup_epochs=4)
    kdplug.distill("cnn-teacher", "cnn-tiny-student", "digits", loss, epochs=3,
                   teacher_epochs=1, data_options={"train_size": 64}, batch_size=32,
                   out=str(tmp_path), quiet=True, threads=1, callbacks=[Spy()])
    assert factors == [0.25, 0.5, 0.75]


def test_mixup_reaches_both_models_in_the_distillation_phase_only(tmp_path):
    seen = {"teacher": [], "student": []}

    def spy(role):
        def hook(module, args):
            seen[role].append(args[0].detach().clone())
        return hook

    teacher = kdplug.create_teacher("cnn-teacher", in_channels=1, image_size=8)
    student = kdplug.create_student("cnn-tiny-student", in_channels=1)
    teacher.register_forward_pre_hook(spy("teacher"))
    student.register_forward_pre_hook(spy("student"))
    kdplug.distill(teacher, student, "digits", "kd", epochs=1, teacher_epochs=0,
                   data_options={"train_size": 64}, batch_size=32, kd_augment="mixup",
                   out=str(tmp_path), quiet=True, threads=1)
    splits = kdplug.create_dataset("digits", train_size=64)
    train_images = {tuple(x.flatten().tolist()) for x, _ in splits.train}
    # the student's training forwards are the teacher's, on images that are no training image
    student_batches = [x for x in seen["student"] if x.shape[0] == 32]
    teacher_batches = [x for x in seen["teacher"] if x.shape[0] == 32]
    assert len(student_batches) == 2 and len(teacher_batches) == 2
    for s, t in zip(student_batches, teacher_batches):
        torch.testing.assert_close(s, t)
        assert sum(tuple(x.flatten().tolist()) in train_images for x in s) < 32
    with pytest.raises(kdplug.KdplugError, match="kd_augment.*one of none, mixup"):
        kdplug.distill("cnn-teacher", "cnn-student", "digits", kd_augment="cutmix",
                       out=str(Path(tmp_path) / "x"))
