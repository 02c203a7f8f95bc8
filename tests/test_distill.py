"""End-to-end distillation on generated data through the API and the CLI; bad input; the teacher."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import TensorDataset

import kdplug
from kdplug.cli import cli
from kdplug.data import DataSplits
from kdplug.engine import NonFiniteLossError, distill
from kdplug.engine.checkpoint import load_checkpoint
from kdplug.errors import UnknownOptionError

PHASE_KEYS = {"name", "params", "accuracy", "inference_ms_per_batch"}
FILES = ("report.json", "metrics.jsonl", "curves.png", "config.json", "config.toml",
         "checkpoints/teacher.pt", "checkpoints/student.pt")


def generated(n: int = 96, classes: int = 4, size: int = 8, seed: int = 0) -> DataSplits:
    """Noisy class prototypes: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(classes, 1, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = prototypes[y] + 0.7 * torch.randn(n, 1, size, size, generator=g)
    cut = n * 3 // 4
    return DataSplits(train=TensorDataset(x[:cut], y[:cut]), test=TensorDataset(x[cut:], y[cut:]),
                      num_classes=classes, input_shape=(1, size, size),
                      model_options={"in_channels": 1, "image_size": size, "num_classes": classes})


class GeneratedData:
    @kdplug.hookimpl
    def register_datasets(register):
        register("generated", generated, description="test data: noisy prototypes")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


@pytest.fixture(scope="module", autouse=True)
def generated_plugin():
    name = kdplug.register_plugin(GeneratedData, name="generated-data")
    try:
        yield name
    finally:
        kdplug.unregister_plugin(name)


TINY = dict(teacher="cnn-teacher", student="cnn-student", data="generated", epochs=2,
            teacher_epochs=2, batch_size=16, quiet=True)


class NoTraining:
    """A callback that fails the test if a step runs (bad input must stop before training)."""

    def on_step(self, **_):
        raise AssertionError("training started")


def test_api_end_to_end(tmp_path):
    result = distill(**TINY, baseline=True, out=str(tmp_path / "run"))
    out = Path(result.out)
    for name in FILES + ("checkpoints/scratch.pt",):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    for phase in ("teacher", "student", "scratch"):
        assert PHASE_KEYS <= set(report[phase])
        assert 0.0 <= report[phase]["accuracy"] <= 1.0
        assert report[phase]["inference_ms_per_batch"] > 0
    assert report["teacher"]["params"] > report["student"]["params"]
    assert report["student"]["params"] == report["scratch"]["params"]
    assert report["config"]["temperature"] == 4.0 and report["config"]["loss"] == "kd+ce"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in lines] == [
        ("teacher", 1), ("teacher", 2), ("student", 1), ("student", 2), ("scratch", 1),
        ("scratch", 2)]
    assert result.student.accuracy == report["student"]["accuracy"]
    assert result.gain == pytest.approx(report["distillation_gain"])
    assert result.teacher.model is not None and not result.teacher.model.training
    assert "student (distilled)" in result.table()
    # the teacher learned its labels (the classic sketch's teacher never does)
    assert result.teacher.accuracy > 0.5


def test_student_with_ce_loss_is_exactly_the_scratch_baseline(tmp_path):
    """Same initial weights, data order and seed: only the loss tells the two phases apart."""
    result = distill(**{**TINY, "teacher_epochs": 0}, loss="ce", baseline=True, out=str(tmp_path))
    assert result.student.history[-1]["test_loss"] == result.scratch.history[-1]["test_loss"]
    assert result.student.accuracy == result.scratch.accuracy


def test_cli_end_to_end_with_config_file_and_flags(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('teacher = "cnn-teacher"\nstudent = "cnn-student"\ndata = "generated"\n'
                      "epochs = 5\nteacher-epochs = 1\nbatch_size = 16\nalpha = 0.5\n"
                      "[data_options]\nn = 80\n")
    out = tmp_path / "cli-run"
    result = CliRunner().invoke(cli, [
        "distill", "--config", str(config), "--epochs", "1", "--temperature", "2",
        "--data-option", "n=64", "--student-option", "dropout=0.1", "--baseline", "--quiet",
        "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "student (distilled)" in result.output and "student (scratch)" in result.output
    assert "teacher" in result.output and f"outputs: {out}" in result.output
    for name in FILES:
        assert (out / name).is_file(), name
    resolved = json.loads((out / "config.json").read_text())
    # flags override the file; tables merge key by key
    assert resolved["epochs"] == 1 and resolved["teacher_epochs"] == 1
    assert resolved["temperature"] == 2.0 and resolved["alpha"] == 0.5
    assert resolved["data_options"] == {"n": 64}
    assert resolved["student_options"] == {"dropout": 0.1}
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["epochs"] == 1
    # the written config.toml reruns the same thing
    rerun = kdplug.engine.resolve_config(str(out / "config.toml"))
    assert rerun.data_options == {"n": 64} and rerun.temperature == 2.0


def test_teacher_is_in_eval_mode_and_gets_no_gradient(tmp_path):
    teacher = kdplug.create_teacher("cnn-teacher", in_channels=1, image_size=8, num_classes=4)
    seen = []

    class SpyLoss(torch.nn.Module):
        def forward(self, student_out, teacher_out, batch):
            seen.append((teacher.training, teacher_out.logits.requires_grad,
                         torch.is_grad_enabled(), student_out.logits.requires_grad,
                         any(p.grad is not None for p in teacher.parameters())))
            return kdplug.create_loss("kd+ce")(student_out, teacher_out, batch)

    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distill(teacher, "cnn-student", "generated", SpyLoss(), epochs=1, teacher_epochs=0,
            batch_size=16, quiet=True, out=str(tmp_path))
    assert len(seen) == 1 + 4  # the dry run, then 4 steps (72 samples // 16)
    for training, t_grad, grad_enabled, s_grad, has_grad in seen[1:]:
        assert (training, t_grad, grad_enabled, s_grad, has_grad) == (False, False, True, True,
                                                                      False)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics did not drift
    assert all(p.requires_grad for p in teacher.parameters())  # unfrozen again afterwards


def test_ready_objects_work_too(tmp_path):
    splits = generated()
    teacher = kdplug.create_teacher("cnn-teacher", **splits.model_options)
    student = kdplug.create_student("cnn-student", **splits.model_options)
    result = distill(teacher, student, splits, epochs=1, teacher_epochs=1, batch_size=16,
                     quiet=True, out=str(tmp_path))
    assert result.student.model is student and result.teacher.name == "CNN"


def bad_toml(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("options, message", [
    (dict(teacher="cnn-teachr"), r"unknown teacher 'cnn-teachr'; did you mean 'cnn-teacher'\?"),
    (dict(student="cnn-studnt"), r"unknown student 'cnn-studnt'; did you mean 'cnn-student'\?"),
    (dict(data="generatd"), r"unknown dataset 'generatd'; did you mean 'generated'\?"),
    (dict(loss="kd+c"), r"unknown loss 'kd\+c'; did you mean 'kd\+ce'\?"),
    (dict(alpha=1.5), r"alpha must be in \[0, 1\], got 1.5"),
    (dict(alpha=-0.5), r"alpha must be in \[0, 1\]"),
    (dict(temperature=0), r"temperature must be finite and > 0, got 0"),
    (dict(temperature=-2.0), r"temperature must be finite and > 0"),
    (dict(teacher_options={"num_classes": 7}),
     r"the teacher 'cnn-teacher' and data 'generated' disagree: the teacher gives logits "
     r"\[2, 7\].*needs \[2, 4\] \(4 classes\)"),
    (dict(student_options={"image_size": 16}),
     r"the student 'cnn-student' does not fit data 'generated'.*expects inputs \[B, 1, 16, 16\]"),
    (dict(student_options={"widht": 3}), r"the student 'cnn-student' \(from plugin 'cifar'.*\) has "
                                         r"no option 'widht'\. Its options: in_channels, "
                                         r"image_size, num_classes, dropout$"),
    (dict(teacher_options={"num_clases": 10}), r"no option 'num_clases'; did you mean "
                                               r"'num_classes'\?"),
    (dict(epoch=3), r"unknown config key 'epoch'.*did you mean 'epochs'\?"),
    (dict(batch_size=0), r"^batch_size \(--batch-size\) must be an int >= 1, got 0$"),
    (dict(epochs=-1), r"^epochs \(--epochs\) must be an int >= 1, got -1$"),
    (dict(batch_size=1000), r"fewer than one batch"),
    (dict(amp="fp8"), r"amp \(--amp\) must be one of none, bf16, fp16, got 'fp8'"),
    (dict(optimizer="lion"), r"optimizer \(--optimizer\) must be one of"),
])
def test_bad_input_stops_before_training(tmp_path, options, message):
    with pytest.raises(kdplug.KdplugError, match=message):
        distill(**{**TINY, **options}, out=str(tmp_path), callbacks=[NoTraining()])


def test_bad_config_files_are_named(tmp_path):
    path = bad_toml(tmp_path, 'teacher = "cnn-teacher"\ntemprature = 3\n')
    with pytest.raises(kdplug.KdplugError, match=r"unknown config key 'temprature' in .*bad.toml; "
                                                 r"did you mean 'temperature'\?"):
        distill(config=path)
    path = bad_toml(tmp_path, 'temprature = 3\nepoch = 2\nalfa = 0.5\n')  # every typo at once
    with pytest.raises(kdplug.KdplugError, match=r"unknown config keys in .*bad.toml: 'temprature' "
                                                 r"\(did you mean 'temperature'\?\), 'epoch' "
                                                 r"\(did you mean 'epochs'\?\), 'alfa' \(did you "
                                                 r"mean 'alpha'\?\)\. Known keys: teacher, "):
        distill(config=path)
    path = bad_toml(tmp_path, 'teacher = "cnn-teacher"\nstudent = "cnn-student"\n'
                              'data = "digits"\n[data_options]\ntrain_sise = 300\n')
    with pytest.raises(UnknownOptionError, match=r"the dataset 'digits' \(from plugin "
                                                        r"'cifar'.*\) has no option 'train_sise'; "
                                                        r"did you mean 'train_size'\? Its options: "
                                                        r"image_size, channels, test_fraction, "
                                                        r"split_seed, train_size, augment$"):
        distill(config=path, out=str(tmp_path / "run"), callbacks=[NoTraining()])
    path = bad_toml(tmp_path, "epochs = \n")
    with pytest.raises(kdplug.KdplugError, match=r"bad.toml' is not valid TOML"):
        distill(config=path)
    path = bad_toml(tmp_path, 'epochs = "ten"\n')
    with pytest.raises(kdplug.KdplugError, match=r"'epochs' \(in .*bad.toml\): expected an int"):
        distill(config=path)
    with pytest.raises(kdplug.KdplugError, match="cannot read config file"):
        distill(config=str(tmp_path / "missing.toml"))


def test_cli_bad_input_is_an_error_line_not_a_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["distill", "--teacher", "cnn-teacher", "--student",
                                      "cnn-student", "--data", "generated", "--alpha", "2",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "Error: alpha must be in [0, 1], got 2.0" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["distill", "--data-option", "oops"])
    assert result.exit_code == 1 and "--data-option expects key=value, got 'oops'" in result.output


def test_a_teacher_checkpoint_that_is_no_checkpoint_is_named(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("it is not a checkpoint\n")
    with pytest.raises(kdplug.KdplugError, match=r"cannot read checkpoint '.*notes.txt': it is not "
                                                 r"a file torch.save wrote \(a kdplug checkpoint "
                                                 r"or a state_dict of tensors\), or it is damaged"):
        distill(**TINY, teacher_checkpoint=str(notes), out=str(tmp_path / "run"),
                callbacks=[NoTraining()])
    assert not (tmp_path / "run").exists()


def test_a_mismatched_teacher_checkpoint_is_named(tmp_path):
    torch.save(kdplug.create_teacher("cnn-teacher").state_dict(), tmp_path / "t.pt")
    with pytest.raises(kdplug.KdplugError, match=r"t.pt' does not fit the teacher 'cnn-teacher'.*"
                                                 r"shape mismatch: conv1.weight"):
        distill(**TINY, teacher_checkpoint=str(tmp_path / "t.pt"), out=str(tmp_path / "run"),
                callbacks=[NoTraining()])


def test_an_existing_run_is_not_overwritten_by_accident(tmp_path):
    distill(**{**TINY, "epochs": 1, "teacher_epochs": 0}, out=str(tmp_path))
    with pytest.raises(kdplug.KdplugError, match="already holds a run.*--resume.*--overwrite"):
        distill(**{**TINY, "epochs": 1, "teacher_epochs": 0}, out=str(tmp_path))
    distill(**{**TINY, "epochs": 1, "teacher_epochs": 0}, out=str(tmp_path), overwrite=True)


def test_non_finite_loss_stops_naming_phase_epoch_and_step(tmp_path):
    calls = {"n": 0}

    def exploding(student_out, teacher_out, batch):
        calls["n"] += 1
        loss = kdplug.create_loss("kd+ce")(student_out, teacher_out, batch)
        return loss * float("nan") if calls["n"] == 1 + 4 + 2 else loss  # dry run, epoch 1, 2

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) in phase 'student' "
                                                 r"epoch 2, step 2.*last good checkpoint") as info:
        distill(**{**TINY, "teacher_epochs": 0}, loss=exploding, out=str(tmp_path))
    assert (info.value.phase, info.value.epoch, info.value.step) == ("student", 2, 2)
    kept = load_checkpoint(tmp_path / "checkpoints" / "student.pt")
    assert (kept["epoch"], kept["step"], kept["done"]) == (1, 0, False)
    assert all(math.isfinite(float(v.float().abs().sum())) for v in kept["model"].values())


def test_demo_plumbing_with_one_epoch(tmp_path):
    """`kdplug demo`'s code path: the showcase recipe (digits, 200 labels, mixup, baseline,
    table); the real demo trains 400 epochs."""
    from kdplug.engine.demo import demo_summary, run_demo

    result = run_demo(out=str(tmp_path), quiet=True, epochs=1, teacher_epochs=1)
    cfg = result.config
    assert (cfg.loss, cfg.temperature, cfg.alpha, cfg.kd_augment) == ("kd", 1.0, 1.0, "mixup")
    assert cfg.data_options == {"train_size": 200, "augment": 1} and result.scratch is not None
    assert result.report["data"] == "digits" and result.report["student"]["epochs"] == 1
    assert "student (scratch)" in result.table()
    assert "200 labelled" in demo_summary()


def test_a_loss_that_uses_no_teacher_trains_the_student_alone(tmp_path):
    out = tmp_path / "alone"
    result = CliRunner().invoke(cli, [
        "distill", "--student", "cnn-student", "--data", "generated", "--loss", "ce", "--epochs",
        "1", "--batch-size", "16", "--quiet", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.output.splitlines()[2:] if line.strip()]
    assert rows[0] == "student" and "student (distilled)" not in result.output
    report = json.loads((out / "report.json").read_text())
    assert "teacher" not in report and report["student"]["epochs"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["student.pt"]
    # the student learns exactly as in a run with a teacher that its loss never reads
    with_teacher = distill(**{**TINY, "teacher_epochs": 0, "epochs": 1}, loss="ce",
                           out=str(tmp_path / "with-teacher"))
    assert with_teacher.student.loss == report["student"]["loss"]


@pytest.mark.parametrize("options, message", [
    (dict(loss="kd+ce"), r"the loss 'kd\+ce' learns from a teacher, and none was given: pass "
                         r"--teacher NAME .*--loss ce"),
    (dict(loss="ce", teacher_checkpoint="teacher.pt"), r"teacher_checkpoint needs the teacher's "
                                                       r"name too"),
])
def test_a_run_without_a_teacher_needs_a_loss_that_uses_none(tmp_path, options, message):
    with pytest.raises(kdplug.KdplugError, match=message):
        distill(student="cnn-student", data="generated", **options, out=str(tmp_path / "run"),
                callbacks=[NoTraining()])
    assert not (tmp_path / "run").exists()  # nothing built, nothing written
