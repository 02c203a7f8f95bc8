"""Runtime CPU dispatch: the kernels compiled per capability, the selection, and a check of the
built extension's machine code that the baseline path runs no AVX instruction."""
from __future__ import annotations

import collections
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdplug import _build_flags, _cpu_capability, _ext
from kdplug._cpu_capability import CpuCapabilityError, choose

NATIVE = _ext.native_status()
needs_native = pytest.mark.skipif(not NATIVE.available, reason=f"native op missing: {NATIVE.reason}")
X86 = platform.machine().lower() in ("x86_64", "amd64")


# ----------------------------------------------------------------------------- the choice

def test_unset_chooses_the_best_capability_both_built_and_supported():
    assert choose("", ["default", "avx2", "avx512"], ["default", "avx2"]) == (
        "avx2", "the best this CPU supports among those built")
    assert choose("", ["default"], ["default", "avx2", "avx512"])[0] == "default"


def test_a_forced_capability_is_used_and_named_as_the_reason():
    assert choose("default", ["default", "avx2"], ["default", "avx2"]) == (
        "default", "set by KDPLUG_CPU_CAPABILITY=default")


@pytest.mark.parametrize("requested, compiled, supported, message", [
    ("sse4", ["default"], ["default"], r"KDPLUG_CPU_CAPABILITY=sse4: expected one of default, "
                                       r"avx2, avx512"),
    ("avx512", ["default", "avx2", "avx512"], ["default", "avx2"],
     r"KDPLUG_CPU_CAPABILITY=avx512: this CPU does not support avx512; it supports: default, avx2"),
    ("avx2", ["avx512"], ["default", "avx2", "avx512"],
     r"KDPLUG_CPU_CAPABILITY=avx2: kdplug's native op was built without avx2 kernels; it has: "
     r"avx512"),
])
def test_a_capability_that_cannot_run_is_a_clear_error(requested, compiled, supported, message):
    with pytest.raises(CpuCapabilityError, match=message):
        choose(requested, compiled, supported)


@needs_native
def test_the_extension_has_every_capability_of_this_architecture():
    state = _cpu_capability.current()
    if NATIVE.source == "prebuilt":
        assert list(state.compiled) == _build_flags.cpu_capabilities_to_build(platform.machine())
    assert "default" in state.supported and state.selected in state.compiled


@needs_native
def test_the_native_selection_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="unknown CPU capability 'sse4': expected one of default, "
                                         "avx2, avx512"):
        torch.ops.kdplug._select_cpu_capability("sse4")


def _doctor(env):
    environ = {**os.environ, **env}
    environ.pop("KDPLUG_FORCE_TORCH", None)
    return subprocess.run([sys.executable, "-m", "kdplug", "doctor", "--json"], env=environ,
                          capture_output=True, text=True, timeout=120)


@needs_native
def test_env_var_selects_the_capability_at_load_time_and_doctor_says_why():
    done = _doctor({"KDPLUG_CPU_CAPABILITY": "default"})
    assert done.returncode == 0, done.stderr
    cpu = json.loads(done.stdout)["native_cpu_capability"]
    assert cpu["selected"] == "default" and cpu["reason"] == "set by KDPLUG_CPU_CAPABILITY=default"

    unset = json.loads(_doctor({"KDPLUG_CPU_CAPABILITY": ""}).stdout)["native_cpu_capability"]
    assert unset["selected"] == _cpu_capability.usable()[-1]
    assert unset["reason"] == "the best this CPU supports among those built"


@needs_native
def test_env_var_naming_a_missing_capability_is_an_error_not_a_fallback():
    done = _doctor({"KDPLUG_CPU_CAPABILITY": "avx1024"})
    assert done.returncode == 1
    assert "Error: KDPLUG_CPU_CAPABILITY=avx1024: expected one of default, avx2, avx512" in done.stderr


@needs_native
def test_every_capability_gives_the_same_loss_and_gradient():
    from kdplug.ops import kd_kl_div

    s, t = torch.randn(41, 1271, dtype=torch.float64), torch.randn(41, 1271, dtype=torch.float64)
    results = {}
    for capability in _cpu_capability.usable():
        with _cpu_capability.use(capability):
            student = s.float().requires_grad_()
            loss = kd_kl_div(student, t.float(), 3.0, backend="native")
            loss.backward()
            results[capability] = (loss.detach(), student.grad)
            assert _cpu_capability.current().selected == capability
    base_loss, base_grad = results["default"]
    for loss, grad in results.values():
        torch.testing.assert_close(loss, base_loss, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(grad, base_grad, rtol=2e-5, atol=1e-7)


# ----------------------------------------------------------------------------- the machine code

CAPABILITY_TAGS = {"avx512": ("cpu_avx512", "::AVX512::"), "avx2": ("cpu_avx2", "::AVX2::"),
                   "default": ("cpu_default",)}
EVEX_OPERAND = re.compile(r"%zmm|%k[1-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b")


def _capability_of(name: str):
    """The capability whose namespace a (demangled) function name mentions (kdplug's or ATen's
    at::vec); such a function can only come from that capability's objects."""
    for capability, tags in CAPABILITY_TAGS.items():
        if any(tag in name for tag in tags):
            return capability
    return None


def scan_functions(library: Path):
    """Every function of `library`: name, global (merged by the linker) or local, whether it holds
    VEX (AVX/AVX2/FMA/F16C) or EVEX (AVX-512) instructions, and the functions it calls directly."""
    def objdump(*args):
        return subprocess.run(["objdump", *args, "-C", str(library)], capture_output=True,
                               text=True, check=True).stdout

    exported = set()
    for line in objdump("-t").splitlines():
        m = re.match(r"^([0-9a-f]+) (.{7}) \.text\s", line)
        if m and "F" in m.group(2) and m.group(2)[0] != "l":
            exported.add(int(m.group(1), 16))
    functions, current = {}, None
    for line in objdump("-d", "--no-show-raw-insn").splitlines():
        header = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if header:
            address = int(header.group(1), 16)
            current = functions[address] = {"name": header.group(2), "vex": 0, "evex": 0,
                                            "calls": set(), "global": address in exported}
            continue
        insn = re.match(r"^\s+[0-9a-f]+:\s+(\S+)\s*(.*)$", line)
        if insn and current is not None:
            mnemonic, operands = insn.groups()
            current["vex"] += mnemonic.startswith("v")  # VEX/EVEX-encoded: AVX and later
            current["evex"] += bool(EVEX_OPERAND.search(operands))
            target = re.match(r"^([0-9a-f]+) <([^>+]*)>$", operands)
            if mnemonic.startswith(("call", "jmp")) and target and "@plt" not in target.group(2):
                current["calls"].add(int(target.group(1), 16))
    return functions


def baseline_violations(functions):
    """Functions with AVX instructions that the baseline path can reach: from every global
    function outside the capability namespaces (one copy of each is kept for the whole library),
    every static initializer (they run at load on any CPU) and the default capability's code,
    following direct calls."""
    roots = [address for address, f in functions.items()
             if (f["global"] and _capability_of(f["name"]) is None)
             or f["name"].startswith("_GLOBAL__sub_I") or _capability_of(f["name"]) == "default"]
    seen, stack = set(), roots
    while stack:
        address = stack.pop()
        if address in seen or address not in functions:
            continue
        seen.add(address)
        stack.extend(functions[address]["calls"])
    return sorted(functions[a]["name"] for a in seen if functions[a]["vex"])


@needs_native
@pytest.mark.skipif(not X86, reason="AVX exists on x86-64 only; elsewhere only the baseline is built")
def test_baseline_path_of_the_extension_has_no_avx_instruction():
    """The ODR trap: inline code shared by the per-capability objects must not reach the baseline
    path compiled for AVX. Everything outside the capability namespaces that can run must be
    baseline code; AVX2 code must not use AVX-512; and the capability copies do use their ISA."""
    assert shutil.which("objdump"), "objdump (binutils) is needed to inspect the extension"
    from kdplug import _C

    functions = scan_functions(Path(_C.__file__))
    assert baseline_violations(functions) == []
    by_capability = collections.defaultdict(list)
    for f in functions.values():
        by_capability[_capability_of(f["name"])].append(f)
    assert by_capability["default"] and not any(f["vex"] for f in by_capability["default"])
    assert any(f["vex"] for f in by_capability["avx2"])
    assert not any(f["evex"] for f in by_capability["avx2"])
    assert any(f["evex"] for f in by_capability["avx512"])


TOY_HEADER = """
__attribute__((noinline)) inline float total(const float* p, int n) {
  float s = 0; for (int i = 0; i < n; ++i) s += p[i] * p[i]; return s; }
"""


@pytest.mark.skipif(not X86, reason="AVX exists on x86-64 only")
def test_the_check_catches_an_avx_copy_of_shared_inline_code(tmp_path):
    """A toy library shows the trap and that the check sees it: an inline function emitted by an
    -mavx2 object and by a baseline one is kept once; if the AVX2 object comes first in the link,
    the baseline function calls the AVX2 copy."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    (tmp_path / "toy.h").write_text(TOY_HEADER)
    (tmp_path / "fast.cpp").write_text(
        '#include "toy.h"\nnamespace cpu_avx2 { float fast(const float* p, int n) '
        '{ return total(p, n); } }\n')
    (tmp_path / "base.cpp").write_text(
        '#include "toy.h"\nfloat base(const float* p, int n) { return total(p, n); }\n')
    for name, flags in (("fast", ["-mavx2", "-mfma"]), ("base", [])):
        subprocess.run([compiler, "-O2", "-fPIC", *flags, "-c", f"{name}.cpp", "-o", f"{name}.o"],
                       cwd=tmp_path, check=True)
    for order, expected in ((["fast.o", "base.o"], ["total(float const*, int)"]),
                            (["base.o", "fast.o"], [])):
        subprocess.run([compiler, "-shared", *order, "-o", "toy.so"], cwd=tmp_path, check=True)
        assert baseline_violations(scan_functions(tmp_path / "toy.so")) == expected, order



@pytest.mark.parametrize("requested, host, built", [
    ("", "avx2", "avx2"), ("default", "avx512", "default"), ("avx512", "avx2", "avx2"),
    ("sse4", "avx512", "avx512"),
])
def test_jit_build_compiles_one_capability_never_beyond_the_host(monkeypatch, requested, host,
                                                                   built):
    """The JIT build compiles every file with one capability's flags, static initializers
    included, so a request beyond the host builds the host's (and the load then refuses it)."""
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(_cpu_capability, "host_capability", lambda: host)
    monkeypatch.setenv("KDPLUG_CPU_CAPABILITY", requested)
    _ext._jit_build()
    [call] = calls
    assert call["name"] == f"kdplug_jit_C_{built}"
    assert call["extra_cflags"] == _build_flags.CXX_FLAGS + _build_flags.CPU_CAPABILITY_FLAGS[built]
    assert any(s.endswith("cpu_dispatch.cpp") for s in call["sources"])
