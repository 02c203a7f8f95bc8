"""Start-up: a command imports what it needs when it needs it. The times are measured by
benchmarks/bench_startup.py; here, what must not be imported on the way."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from kdplug import _op_support

# seconds each at start-up; what imports them must be the command that uses them
HEAVY = ("torch._dynamo", "sklearn", "matplotlib", "transformers", "scipy")


def test_plugins_doctor_and_digits_import_none_of_the_heavy_modules():
    code = textwrap.dedent(f"""
        import sys
        from kdplug.cli import cli
        for args in (["plugins"], ["doctor"], ["--help"]):
            cli.main(args, standalone_mode=False)
        import kdplug
        kdplug.create_dataset("digits", train_size=10)  # the CSV scikit-learn ships, not sklearn
        from kdplug.engine.report import write_config  # the engine, up to curves.png
        import kdplug.engine.run
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


def test_the_constant_mark_is_the_one_torch_compiler_sets():
    """The ops mark their backend choice for dynamo without importing it (2-4 s); torch's own
    decorator must still do no more than set that flag."""
    def theirs():
        return 0

    def ours():
        return 0

    torch.compiler.assume_constant_result(theirs)
    _op_support.assume_constant_result(ours)
    assert vars(theirs) == vars(ours) == {"_dynamo_marked_constant": True}
    assert _op_support.choose_backend._dynamo_marked_constant is True
