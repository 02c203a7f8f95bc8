"""The README's example plugin, installed by pip from a copy, as a user would."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdplug

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "kdplug-example-plugin"
EXAMPLE_FILES = {"pyproject.toml": "toml", "kdplug_example_plugin.py": "python"}


@pytest.mark.parametrize("filename", sorted(EXAMPLE_FILES))
def test_readme_shows_the_example_files_verbatim(filename):
    readme = (ROOT / "README.md").read_text()
    source = (EXAMPLE / filename).read_text()
    assert f"```{EXAMPLE_FILES[filename]}\n{source}```\n" in readme


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """The example copied out of the repo and pip-installed into a folder for PYTHONPATH."""
    tmp = tmp_path_factory.mktemp("example")
    source = shutil.copytree(EXAMPLE, tmp / "kdplug-example-plugin",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
                   check=True, capture_output=True, timeout=300)
    return target


def test_installed_example_is_listed_with_its_registrations(run_kdplug, installed_example):
    result = run_kdplug("plugins", "--json", pythonpath=[installed_example],
                        env={"KDPLUG_LOAD_PLUGINS": "example"})
    assert result.returncode == 0, result.stderr
    [example] = [p for p in json.loads(result.stdout)["plugins"] if p["name"] == "example"]
    assert (example["distribution"], example["version"]) == ("kdplug-example-plugin", "0.1.0")
    assert example["registered"] == {"teacher": ["example-mlp-large"],
                                     "student": ["example-mlp-small"],
                                     "loss": ["example-kd"], "dataset": []}


def test_installed_example_adds_a_command(run_kdplug, installed_example):
    result = run_kdplug("example-sizes", "--in-features", "64", "--num-classes", "5",
                        pythonpath=[installed_example], env={"KDPLUG_LOAD_PLUGINS": "example"})
    assert result.returncode == 0, result.stderr
    teacher = 64 * 256 + 256 + 256 * 5 + 5  # Linear(64, 256), Linear(256, 5)
    student = 64 * 32 + 32 + 32 * 5 + 5
    assert result.stdout == (f"example-mlp-large: {teacher:,} parameters\n"
                             f"example-mlp-small: {student:,} parameters\n")
    listed = run_kdplug("plugins", "--json", pythonpath=[installed_example],
                        env={"KDPLUG_LOAD_PLUGINS": "example"})
    [example] = [p for p in json.loads(listed.stdout)["plugins"] if p["name"] == "example"]
    assert example["commands"] == ["example-sizes"] and "register_commands" in example["hooks"]


@pytest.fixture
def example_loaded(monkeypatch, fresh_plugins, installed_example):
    monkeypatch.syspath_prepend(str(installed_example))
    monkeypatch.setenv("KDPLUG_LOAD_PLUGINS", "example")
    yield
    sys.modules.pop("kdplug_example_plugin", None)


def test_example_models_and_loss_work(example_loaded):
    torch.manual_seed(0)
    teacher = kdplug.create_teacher("example-mlp-large", in_features=12, num_classes=5)
    student = kdplug.create_student("example-mlp-small", in_features=12, num_classes=5)
    assert isinstance(teacher, torch.nn.Module) and isinstance(student, torch.nn.Module)
    assert kdplug.list_teachers()["example-mlp-large"].distribution == "kdplug-example-plugin"

    inputs, targets = torch.randn(8, 3, 4), torch.randint(0, 5, (8,))
    with torch.no_grad():
        teacher_out = teacher(inputs)
    student_out = student(inputs)
    assert teacher_out.shape == student_out.shape == (8, 5)

    from kdplug.outputs import ModelOutput

    batch = {"inputs": inputs, "labels": targets}
    loss = kdplug.create_loss("example-kd", temperature=2.0, alpha=0.5)
    value = loss(ModelOutput(student_out), ModelOutput(teacher_out), batch)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert all(p.grad is not None for p in student.parameters())

    # With alpha=1 only the soft term is left: zero when the student matches the teacher.
    soft_only = kdplug.create_loss("example-kd", alpha=1.0)
    assert soft_only(ModelOutput(teacher_out), ModelOutput(teacher_out), batch).abs().item() < 1e-6
    with pytest.raises(ValueError, match="temperature > 0"):
        kdplug.create_loss("example-kd", temperature=0)


def test_example_plugin_distils_end_to_end(example_loaded, monkeypatch, tmp_path):
    """The copied-out plugin's models and loss run through kdplug.distill on the digits data."""
    monkeypatch.setenv("KDPLUG_LOAD_PLUGINS", "example,cifar,losses")
    result = kdplug.distill(
        teacher="example-mlp-large", student="example-mlp-small", data="digits",
        loss="example-kd", epochs=1, teacher_epochs=1, out=str(tmp_path / "run"), quiet=True,
        teacher_options={"in_features": 64}, student_options={"in_features": 64})
    assert result.student.name == "example-mlp-small"
    assert 0.0 <= result.student.accuracy <= 1.0 and (tmp_path / "run" / "report.json").exists()
