"""`kdplug doctor` says which backend kd_kl_div uses and why."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from kdplug import _ext


def doctor(*args, **env):
    full_env = {**os.environ, **env}
    done = subprocess.run([sys.executable, "-m", "kdplug", "doctor", *args], env=full_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_doctor_reports_native_backend_and_its_source():
    status = json.loads(doctor("--json"))
    native = _ext.native_status()
    assert status["native_available"] == native.available
    assert status["backend"] == ("native" if native.available else "torch")
    assert status["native_source"] == native.source
    text = doctor()
    assert f"kd_kl_div backend: {status['backend']}" in text


def test_doctor_reports_forced_fallback():
    status = json.loads(doctor("--json", KDPLUG_FORCE_TORCH="1"))
    assert status["backend"] == "torch" and status["native_source"] == "forced-off"
    assert "KDPLUG_FORCE_TORCH=1 forces" in status["reason"]
    assert "KDPLUG_FORCE_TORCH=1" in doctor(KDPLUG_FORCE_TORCH="1")

