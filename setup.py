"""Builds kdplug's native op (csrc/) and nothing else; all metadata lives in pyproject.toml.

The CPU kernel files (csrc/cpu/*.cpp) are compiled once per CPU capability (baseline x86-64, AVX2,
AVX-512; the baseline only on other architectures) into the one extension, which picks the best
the CPU supports at load time; the rest of csrc/ is compiled once, for the baseline.

Environment:
  KDPLUG_NO_EXT=1       build no native code (kdplug then uses its pure-PyTorch fallback)
  KDPLUG_NO_CUDA=1      build the CPU kernels only, even where nvcc is found
  TORCH_CUDA_ARCH_LIST  GPU architectures; default "8.0;9.0+PTX" plus the visible GPUs' own
"""
import glob
import os
import platform
import runpy
import shutil
import subprocess
import warnings

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
# One source of truth for the flags, shared with the JIT build; loaded by path (kdplug's own
# imports need packages the build environment may lack).
FLAGS = runpy.run_path(os.path.join(ROOT, "kdplug", "_build_flags.py"))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


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


def _cuda_arch_list(torch, cuda_home):
    """The portable default plus the visible GPUs' architectures nvcc can compile for."""
    visible = ["{}.{}".format(*torch.cuda.get_device_capability(i))
               for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    try:
        nvcc_archs = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
                                    capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        nvcc_archs = []
    return FLAGS["cuda_arch_list"](visible, nvcc_archs)


def _build_ext_class(cpp_extension):
    class BuildExtensionPerCpuCapability(cpp_extension.BuildExtension):
        """Compiles an extension's `cpu_capability_sources` once per entry of its
        `cpu_capability_flags` (into build_temp/cpu_<name>/), besides its other sources.

        The baseline objects come first in the link: where shared inline code (ATen's headers,
        the standard library) is emitted by several objects, GNU ld keeps the first copy, so code
        outside the capability namespaces is the baseline's (tests/test_cpu_dispatch.py checks)."""

        def build_extension(self, ext):
            per_capability = getattr(ext, "cpu_capability_flags", None)
            if not per_capability:
                return super().build_extension(ext)
            compile_once = self.compiler.compile  # BuildExtension's ninja compile

            def compile_all(sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                            extra_preargs=None, extra_postargs=None, depends=None):
                objects = compile_once(sources, output_dir=output_dir, macros=macros,
                                       include_dirs=include_dirs, debug=debug,
                                       extra_preargs=extra_preargs, extra_postargs=extra_postargs,
                                       depends=depends)
                for capability, flags in per_capability.items():
                    postargs = dict(extra_postargs)
                    postargs["cxx"] = [*extra_postargs["cxx"], *flags]
                    objects += compile_once(
                        ext.cpu_capability_sources,
                        output_dir=os.path.join(output_dir, "cpu_" + capability), macros=macros,
                        include_dirs=include_dirs, debug=debug, extra_preargs=extra_preargs,
                        extra_postargs=postargs, depends=depends)
                return objects

            self.compiler.compile = compile_all
            try:
                return super().build_extension(ext)
            finally:
                self.compiler.compile = compile_once

    return BuildExtensionPerCpuCapability.with_options(use_ninja=True)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (kdplug/_csrc), so the JIT fallback can build the op
    outside a checkout, and recipes/ (kdplug/_recipes), so `kdplug recipes` and `kdplug demo`
    work from a wheel; an editable install finds both beside the package instead."""

    SHIPPED = {"csrc": "_csrc", "recipes": "_recipes"}

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder, packaged in self.SHIPPED.items():
            for source in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
                if os.path.isfile(source):
                    target = os.path.join(self.build_lib, "kdplug", packaged,
                                          os.path.relpath(source, folder))
                    self.mkpath(os.path.dirname(target))
                    self.copy_file(source, target)


def ext_modules_and_cmdclass():
    if _flag("KDPLUG_NO_EXT"):
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    capability_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
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

    # No -std: torch.utils.cpp_extension adds the standard this torch was built with.
    cxx = list(FLAGS["CXX_FLAGS"])
    include_dirs = [os.path.join(ROOT, "csrc")]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    use_cuda = bool(cuda_sources) and not _flag("KDPLUG_NO_CUDA") and torch.version.cuda is not None
    if use_cuda and not _nvcc_available(cpp_extension.CUDA_HOME):
        warnings.warn("nvcc not found (set CUDA_HOME): building kdplug's CPU kernels only.")
        use_cuda = False

    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list(torch, cpp_extension.CUDA_HOME)
        # pip's nvidia-* wheels carry headers (cuDNN, NCCL, ...) that torch's CUDA headers may
        # include and a bare toolkit lacks; searched after CUDA_HOME's, never instead of them.
        import site
        for base in site.getsitepackages():
            for folder in sorted(glob.glob(os.path.join(base, "nvidia", "*", "include"))):
                cxx += ["-idirafter", folder]
        extension = cpp_extension.CUDAExtension(
            "kdplug._C", sources + cuda_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=FLAGS["LINK_FLAGS"])
    else:
        extension = cpp_extension.CppExtension(
            "kdplug._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
            extra_link_args=FLAGS["LINK_FLAGS"])
    extension.cpu_capability_sources = capability_sources
    extension.cpu_capability_flags = {
        name: FLAGS["CPU_CAPABILITY_FLAGS"][name]
        for name in FLAGS["cpu_capabilities_to_build"](platform.machine())}
    return [extension], {"build_ext": _build_ext_class(cpp_extension)}


ext_modules, cmdclass = ext_modules_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
