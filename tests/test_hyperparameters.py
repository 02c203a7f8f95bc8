"""T and α are checked by one rule, wherever they are given: the op, a loss, the run's config."""
from __future__ import annotations

import math

import pytest
import torch

import kdplug
from kdplug.engine.config import ConfigError, resolve_config
from kdplug.hyperparameters import HyperparameterTypeError, check_alpha, check_temperature
from kdplug.ops import kd_kl_div


@pytest.mark.parametrize("value", [0, -1.5, math.nan, math.inf])
def test_a_bad_temperature_reads_the_same_everywhere(value):
    expected = f"temperature must be finite and > 0, got {float(value)}"
    s = t = torch.zeros(2, 3)
    with pytest.raises(ValueError) as op:
        kd_kl_div(s, t, value, backend="torch")
    with pytest.raises(kdplug.KdplugError) as loss:
        kdplug.create_loss("kd+ce", temperature=value)
    with pytest.raises(ConfigError) as config:
        resolve_config(temperature=value)
    for raised in (op, loss, config):
        assert expected in str(raised.value)
    assert str(op.value).startswith("kd_kl_div: ")


@pytest.mark.parametrize("value", [-0.1, 1.01, math.nan])
def test_a_bad_alpha_reads_the_same_everywhere(value):
    expected = f"alpha must be in [0, 1], got {float(value)}"
    with pytest.raises(kdplug.KdplugError) as loss:
        kdplug.create_loss("kd+ce", alpha=value)
    with pytest.raises(ConfigError) as config:
        resolve_config(alpha=value)
    assert expected in str(loss.value) and expected in str(config.value)


def test_good_values_come_back_as_floats_and_non_numbers_are_type_errors():
    assert check_temperature(2) == 2.0 and isinstance(check_temperature(2), float)
    assert check_alpha(1) == 1.0 and check_alpha(0.0) == 0.0
    for bad in ("2", True, None):
        with pytest.raises(HyperparameterTypeError):
            check_temperature(bad)
        with pytest.raises(TypeError):
            check_alpha(bad)
    with pytest.raises(kdplug.KdplugError, match=r"temperature must be .* \(in run.toml\)"):
        check_temperature(0, source=" (in run.toml)")
