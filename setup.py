"""Builds kdplug's native op (csrc/) and nothing else; all metadata lives in pyproject.toml.

Environment:
  KDPLUG_NO_EXT=1     build no native code (kdplug then uses its pure-PyTorch fallback)
  KDPLUG_NO_CUDA=1    build the CPU kernel only, even where nvcc is found
  KDPLUG_CPU_ARCH     default | avx2 | avx512 (auto-detected from the build machine)
  TORCH_CUDA_ARCH_LIST  GPU architectures; "8.0;9.0" when no GPU is visible
"""
import glob
import os
import platform
import shutil
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _cpu_arch():
    wanted = os.environ.get("KDPLUG_CPU_ARCH", "").strip().lower()
    if wanted:
        return wanted
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return "default"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "default"


# at::vec picks its implementation from CPU_CAPABILITY_*; the matching -m flags must come with it.
CPU_ARCH_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
}


def _nvcc_available(cuda_home):
    return bool(cuda_home) and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


def _default_cuda_home():
    """torch guesses CUDA_HOME as the folder above `which nvcc`; for a wrapper or link such as
    /usr/local/bin/nvcc that is /usr/local, which holds no CUDA headers. Pick a folder that has
    both nvcc and the headers."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if (os.path.exists(os.path.join(home, "bin", "nvcc"))
                and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))):
            os.environ["CUDA_HOME"] = home
            return


def ext_modules_and_cmdclass():
    if _flag("KDPLUG_NO_EXT"):
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return [], {}
    _default_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("torch is not importable at build time: kdplug's native op is not built "
                      "(install torch first and use `pip install --no-build-isolation`).")
        return [], {}

    arch = _cpu_arch()
    if arch not in CPU_ARCH_FLAGS:
        raise SystemExit(f"KDPLUG_CPU_ARCH={arch!r}: expected one of {sorted(CPU_ARCH_FLAGS)}")
    # No -std: torch.utils.cpp_extension adds the standard this torch was built with.
    cxx = ["-O3", "-fopenmp", *CPU_ARCH_FLAGS[arch]]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    use_cuda = bool(cuda_sources) and not _flag("KDPLUG_NO_CUDA") and torch.version.cuda is not None
    if use_cuda and not _nvcc_available(cpp_extension.CUDA_HOME):
        warnings.warn("nvcc not found (set CUDA_HOME): building kdplug's CPU kernel only.")
        use_cuda = False

    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        # pip's nvidia-* wheels carry headers (cuDNN, NCCL, ...) that torch's CUDA headers may
        # include and a bare toolkit lacks; searched after CUDA_HOME's, never instead of them.
        import site
        for base in site.getsitepackages():
            for folder in sorted(glob.glob(os.path.join(base, "nvidia", "*", "include"))):
                cxx += ["-idirafter", folder]
        define_macros.append(("KDPLUG_WITH_CUDA", None))
        extension = cpp_extension.CUDAExtension(
            "kdplug._C", sources + cuda_sources,
            include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3",
                                                    "-lineinfo"]},
            extra_link_args=["-fopenmp"])
    else:
        extension = cpp_extension.CppExtension(
            "kdplug._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [extension], {"build_ext": build_ext}


ext_modules, cmdclass = ext_modules_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
