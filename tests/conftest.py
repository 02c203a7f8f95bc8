"""Shared fixtures: a freshly loaded plugin manager, throwaway installed distributions, the CLI."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, Optional

import pytest

from kdplug.plugins import DISABLE_ENV, LOAD_ENV, builtin_plugin_names, reset_plugin_manager


def pytest_sessionstart(session):
    """Under `make test` (KDPLUG_REQUIRE_NATIVE=1) a failed or skipped native build stops the run,
    instead of leaving the native-op tests to skip."""
    if os.environ.get("KDPLUG_REQUIRE_NATIVE") != "1":
        return
    import shutil

    import torch

    from kdplug import _ext

    status = _ext.native_status()
    missing = [] if status.source == "prebuilt" else [f"kdplug._C ({status.reason})"]
    devices = ["CPU"] + (["CUDA"] if shutil.which("nvcc") and not os.environ.get("KDPLUG_NO_CUDA")
                         else [])
    for op in ("kd_loss_fwd", "kd_loss_topk_fwd"):
        missing += [f"kdplug::{op} for {key}" for key in devices
                    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"kdplug::{op}", key)]
    if not torch._C._dispatch_has_kernel("kdplug::kd_loss_fwd_eager"):
        missing.append("kdplug::kd_loss_fwd_eager (the C++ autograd of CPU calls)")
    if missing:
        pytest.exit("KDPLUG_REQUIRE_NATIVE=1 but the native build is missing: "
                    + "; ".join(missing), returncode=1)


@functools.lru_cache(maxsize=None)
def _cpu_capabilities_to_test():
    """Each CPU capability this process can run the native kernels with (KDPLUG_CPU_CAPABILITY, if
    set, narrows it to that one); a single placeholder where the native op is missing."""
    from kdplug import _cpu_capability, _ext

    if not _ext.native_status().available:
        return ("no-native-op",)
    if os.environ.get(_cpu_capability.ENV):
        return (_cpu_capability.current().selected,)
    return tuple(_cpu_capability.usable())


def pytest_generate_tests(metafunc):
    if "cpu_capability" in metafunc.fixturenames:
        metafunc.parametrize("cpu_capability", list(_cpu_capabilities_to_test()), indirect=True)


def pytest_collection_modifyitems(config, items):
    """A test run with the PyTorch backend or on a GPU is the same under every CPU capability:
    keep its copy for the best capability only (shown as deselected)."""
    duplicates = []
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if (params and "cpu_capability" in params
                and (params.get("backend") == "torch" or params.get("device") == "cuda")
                and params["cpu_capability"] != _cpu_capabilities_to_test()[-1]):
            duplicates.append(item)
    if duplicates:
        config.hook.pytest_deselected(items=duplicates)
        dropped = set(duplicates)
        items[:] = [item for item in items if item not in dropped]


@pytest.fixture
def cpu_capability(request):
    """Runs the test with the native CPU kernels of one capability (parametrized over every one
    this CPU supports). Op test modules opt in with
    `pytestmark = pytest.mark.usefixtures("cpu_capability")`."""
    from kdplug import _cpu_capability

    if request.param not in _cpu_capability.CAPABILITIES:
        yield request.param
        return
    with _cpu_capability.use(request.param):
        yield request.param


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run many times faster on one thread than on two of a busy 2-core machine.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_plugins():
    """Plugins are found and loaded again for this test, and forgotten after it."""
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def no_installed_plugins(monkeypatch, fresh_plugins):
    """Only the plugins a test registers itself (no entry point is loaded)."""
    monkeypatch.setenv(LOAD_ENV, "")
    monkeypatch.setenv(DISABLE_ENV, ",".join(builtin_plugin_names()))


def write_distribution(site: Path, name: str, version: str, modules: Dict[str, str],
                       entry_points: Dict[str, str]) -> None:
    """Install a distribution by hand, as pip would: modules plus <name>-<version>.dist-info/."""
    site.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text(
        "[kdplug]\n" + "".join(f"{ep} = {target}\n" for ep, target in entry_points.items()))


@pytest.fixture(scope="session")
def make_distribution():
    return write_distribution


def run_kdplug_subprocess(*args: str, pythonpath: Iterable[Path] = (),
                          env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`python -m kdplug ARGS` in a new interpreter, with only the plugin env vars given."""
    pythonpath = [str(p) for p in pythonpath]
    environ = {k: v for k, v in os.environ.items() if k not in (DISABLE_ENV, LOAD_ENV)}
    paths = pythonpath + [environ.get("PYTHONPATH", "")]
    environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "kdplug", *args], env=environ,
                          capture_output=True, text=True, timeout=120,
                          cwd=pythonpath[0] if pythonpath else None)


@pytest.fixture(scope="session")
def run_kdplug():
    return run_kdplug_subprocess
