"""The output folder: a failed start (a refused --resume, bad input, a folder that cannot be
written) changes nothing in it, leaves no empty folder behind, and says why in one line; for
`kdplug distill` and `kdplug cache-teacher` alike."""
from __future__ import annotations

import errno
from pathlib import Path
from typing import Dict

import pytest
from click.testing import CliRunner

import kdplug
from kdplug import _atomic, _writable
from kdplug.cli import cli
from kdplug.engine import distill
from kdplug.engine.config import load_config_file
# the generated data plugin (a module fixture, active here too), the tiny run and the guard
from test_distill import TINY, NoTraining, generated_plugin  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ONE_EPOCH = {**TINY, "epochs": 1, "teacher_epochs": 1}
CACHE = ["cache-teacher", "--teacher", "cnn-teacher", "--data", "generated", "--quiet"]


def snapshot(folder: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    distill(**ONE_EPOCH, out=str(out))
    return out


def test_a_refused_resume_changes_nothing_in_the_run(finished_run):
    before = snapshot(finished_run)
    assert "config.toml" in before and "checkpoints/teacher.pt" in before
    with pytest.raises(kdplug.KdplugError, match=r"teacher.pt was written with other settings "
                                                 r"\(epochs: 1 then, 2 now; temperature: 4.0 "
                                                 r"then, 2.0 now\)"):
        distill(**{**ONE_EPOCH, "epochs": 2}, temperature=2.0, out=str(finished_run),
                resume=True, callbacks=[NoTraining()])
    assert snapshot(finished_run) == before
    # so `--config out/config.toml` still reruns the run the folder holds
    assert load_config_file(finished_run / "config.toml")["epochs"] == 1


def test_a_failed_overwrite_keeps_the_old_run(finished_run):
    before = snapshot(finished_run)
    with pytest.raises(kdplug.KdplugError, match="does not fit data 'generated'"):
        distill(**ONE_EPOCH, student_options={"image_size": 16}, out=str(finished_run),
                overwrite=True, callbacks=[NoTraining()])
    assert snapshot(finished_run) == before


def test_a_failed_start_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(kdplug.KdplugError, match="does not fit data 'generated'"):
        distill(**ONE_EPOCH, student_options={"image_size": 16}, out=str(out),
                callbacks=[NoTraining()])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["distill", "--student", "cnn-student", "--teacher",
                                      "cnn-teacher", "--data", "generated", "--quiet"], CACHE])
def test_an_output_folder_inside_a_file_is_one_line(tmp_path, command):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    result = CliRunner().invoke(cli, [*command, "--out", str(afile / "sub")])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines() == [
        f"Error: cannot use '{afile / 'sub'}' as --out: '{afile}' is a file, not a folder; "
        "choose another --out"]


def test_a_read_only_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    # Mode 0o555 stops no one running as root (CI containers), so the file system's answer is
    # what is simulated: the check that os.access and statvfs make.
    monkeypatch.setattr(_writable, "_can_write", lambda folder: False)
    monkeypatch.setattr(_writable, "_read_only", lambda folder: True)
    out = tmp_path / "run"
    with pytest.raises(kdplug.KdplugError, match=rf"^cannot write the output folder '{out}': it "
                                                 rf"is on a read-only file system \({tmp_path}\); "
                                                 r"choose another --out$"):
        distill(**ONE_EPOCH, out=str(out), callbacks=[NoTraining()])
    result = CliRunner().invoke(cli, [*CACHE, "--out", str(out)])
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1
    assert "read-only file system" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_a_write_that_fails_at_the_start_is_one_line_and_leaves_nothing(tmp_path, monkeypatch,
                                                                         failure):
    """The check passed but the first write fails (a mount that turned read-only, a full disk):
    the same one line, and the folders made for the run are gone again."""
    def refuse(path, *args, **kwargs):
        raise OSError(failure, "simulated", str(path))

    monkeypatch.setattr(_atomic, "open", refuse, raising=False)  # every atomic file write
    for command in (["distill", "--student", "cnn-student", "--teacher", "cnn-teacher",
                     "--data", "generated", "--quiet", "--epochs", "1"], CACHE):
        out = tmp_path / "new" / "out"
        result = CliRunner().invoke(cli, [*command, "--out", str(out)])
        assert result.exit_code == 1, result.output
        assert result.output.startswith(f"Error: cannot write the output folder '{out}': ")
        assert len(result.output.splitlines()) == 1 and "Traceback" not in result.output
        assert list(tmp_path.iterdir()) == []
