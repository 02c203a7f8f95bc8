"""What a run writes besides checkpoints: the curves plot and the rerunnable config.toml."""
from __future__ import annotations

import math
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from kdplug.engine.config import resolve_config, to_toml
from kdplug.engine.report import plot_curves

RECORDS = [{"phase": phase, "epoch": e, "test_accuracy": acc, "test_loss": loss}
           for phase, base in (("teacher", 0.9), ("student", 0.8), ("scratch", 0.7))
           for e, (acc, loss) in enumerate(((base, 0.5), (base + 0.05, 0.3)), 1)]


def test_curves_leave_matplotlib_s_backend_and_pyplot_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # what a notebook or a user might have chosen
    try:
        plot_curves(tmp_path / "curves.png", RECORDS, title="t → s")
        assert matplotlib.get_backend().lower() == "svg"
        if "matplotlib.pyplot" in sys.modules:
            assert not sys.modules["matplotlib.pyplot"].get_fignums()  # no figure left open
    finally:
        matplotlib.use(before)
    data = (tmp_path / "curves.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temporary file left


def test_curves_replace_an_old_plot_whole(tmp_path):
    path = tmp_path / "curves.png"
    path.write_bytes(b"old")
    plot_curves(path, RECORDS[:2])
    assert path.read_bytes().startswith(b"\x89PNG")


def test_config_toml_reads_back_as_the_config(tmp_path):
    cfg = resolve_config(teacher="t", student="s", data="d", temperature=2, grad_clip=1.5,
                         data_options={"root": "a \"quoted\" path", "sizes": [1, 2],
                                       "nested": {"k": True}, "missing": None, "where": Path("p")},
                         loss_options={"inf": math.inf})
    text = to_toml(cfg.to_dict())
    back = tomllib.loads(text)
    assert back["temperature"] == 2.0 and back["grad_clip"] == 1.5 and "teacher_lr" not in back
    assert back["data_options"] == {"root": 'a "quoted" path', "sizes": [1, 2],
                                    "nested": {"k": True}, "where": "p"}  # None left out
    assert back["loss_options"] == {"inf": math.inf}
    again = resolve_config(back)  # a config file resolves to the same run
    assert again.to_dict() == {**cfg.to_dict(), "data_options": back["data_options"]}
