"""Forward+backward time and peak extra memory of the KD loss: kdplug's native op against the
pure-PyTorch fallback, the eager composition users write, and torch.compile of it; then every
divergence against kl, and the fused hard-label term against the op plus a separate cross-entropy.

    python benchmarks/bench_kd_loss.py                 # CPU, all parts and shapes
    python benchmarks/bench_kd_loss.py --device cuda   # GPU
    python benchmarks/bench_kd_loss.py --quick         # fewer repeats, two shapes
    python benchmarks/bench_kd_loss.py --parts divergences,kdce --no-memory
    python benchmarks/bench_kd_loss.py --threads 1         # steadier on a shared machine
    python benchmarks/bench_kd_loss.py --threads 1 --cpu-time  # the thread's CPU time, not wall
    python benchmarks/bench_kd_loss.py --capability all  # native CPU kernels of each capability

Parts:
  table        kl (kd_kl_div) at each shape: native, fallback, eager, torch.compile; memory
  divergences  kd_loss with each divergence, native: ms, multiple of the floor, multiple of kl's
               own time at the same shape (interleaved with kl and the floor)
  kdce         kd+ce: kd_loss(..., labels=y, alpha=0.5) in one pass against
               0.5 * kd_loss(...) + 0.5 * F.cross_entropy(...) (the op and a separate CE)

The floor is the time to read student and teacher logits once and write the gradient once
(3·N·C·bytes): measured in the same run as `torch.add(s, t, out=g)` on the same tensors, which
moves exactly those bytes, so caches and threads treat it as they treat the op (a single copy
bandwidth would flatter or punish sizes that fit this machine's large L3). Variants, the floor
included, are interleaved so a noisy machine slows all alike; each figure is a median. Peak extra memory is what a forward+backward
adds on top of the inputs: on CPU the resident-set high-water mark of a fresh subprocess (with the
op's buffer reuse off, so its gradient is counted like everyone else's), on a GPU
torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from kdplug import _cpu_capability
from kdplug.ops import DIVERGENCES, backend_status, kd_kl_div, kd_loss

T = 2.0
SHAPES = [(8192, 10), (4096, 100), (2048, 1000), (512, 32000), (64, 128256)]
BF16_SHAPES = [(512, 32000), (64, 128256)]
VARIANTS = ["native", "fallback", "eager", "compile"]
DIVERGENCE_CASES = [(8192, 10, torch.float32), (4096, 100, torch.float32),
                    (2048, 1000, torch.float32), (512, 32000, torch.float32),
                    (512, 32000, torch.bfloat16)]
KDCE_CASES = [(8192, 10, torch.float32), (2048, 1000, torch.float32),
              (512, 32000, torch.float32), (512, 32000, torch.bfloat16)]


def eager_kd(s, t):
    return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T


_compiled = torch.compile(eager_kd)


def make_step(variant):
    if variant.startswith("native"):  # "native", or "native:<capability>"
        return lambda s, t: kd_kl_div(s, t, T, backend="native")
    if variant == "fallback":
        return lambda s, t: kd_kl_div(s, t, T, backend="torch")
    if variant == "eager":
        return eager_kd
    return _compiled


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(step, s, t):
    s.grad = None
    step(s, t).backward()


def inputs(n, c, dtype, device):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, c, generator=g) * 3).to(dtype).to(device).requires_grad_()
    t = (torch.randn(n, c, generator=g) * 3).to(dtype).to(device)
    return s, t


def copy_bandwidth(nbytes, device, repeats):
    """Bytes per second of dst.copy_(src) (read + write), as the floor's yardstick."""
    n = max(nbytes // 4, 1 << 20)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times)


def prepare(variant):
    """Selects the CPU kernels a "native:<capability>" variant runs with (outside the timing)."""
    if variant.startswith("native:"):
        _cpu_capability.select(variant.split(":", 1)[1], "selected by bench_kd_loss.py")


# time.perf_counter, or time.thread_time with --cpu-time: on a machine shared with other jobs a
# one-thread run is descheduled for whole time slices, which wall time counts and CPU time does not.
clock = time.perf_counter


def time_steps(steps, device, repeats):
    """Median ms of each step (a callable), interleaved so a noisy machine slows all alike."""
    for v, step in steps.items():  # warm-up: compile, JIT, allocator
        prepare(v)
        step()
        step()
    times = {v: [] for v in steps}
    for _ in range(repeats):
        for v, step in steps.items():
            prepare(v)
            sync(device)
            t0 = clock()
            step()
            sync(device)
            times[v].append(clock() - t0)
    return {v: statistics.median(ts) * 1e3 for v, ts in times.items()}


def floor_step(s, t):
    """The bytes-moved floor: read s and t once, write one N×C tensor once."""
    out = torch.empty_like(t)
    return lambda: torch.add(s.detach(), t, out=out)


def time_variants(n, c, dtype, device, repeats, variants=VARIANTS):
    """Median ms of each variant's forward+backward, and of the floor (s + t into g)."""
    s, t = inputs(n, c, dtype, device)
    steps = {v: (lambda step=make_step(v): fwd_bwd(step, s, t)) for v in variants}
    steps["floor"] = floor_step(s, t)
    return time_steps(steps, device, repeats)


def time_divergences(n, c, dtype, device, repeats):
    s, t = inputs(n, c, dtype, device)
    steps = {name: (lambda name=name: fwd_bwd(
        lambda a, b: kd_loss(a, b, T, divergence=name, beta=0.5, backend="native"), s, t))
        for name in DIVERGENCES}
    steps["floor"] = floor_step(s, t)
    return time_steps(steps, device, repeats)


def time_kdce(n, c, dtype, device, repeats):
    s, t = inputs(n, c, dtype, device)
    labels = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(1)).to(device)

    def fused(a, b):
        return kd_loss(a, b, T, labels=labels, alpha=0.5, backend="native")

    def separate(a, b):
        return (0.5 * kd_loss(a, b, T, backend="native")
                + 0.5 * F.cross_entropy(a.float(), labels))

    steps = {"fused": lambda: fwd_bwd(fused, s, t), "separate": lambda: fwd_bwd(separate, s, t),
             "floor": floor_step(s, t)}
    return time_steps(steps, device, repeats)


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_here(variant, n, c, dtype_name, device):
    """Peak bytes one forward+backward adds on top of its inputs (run in a fresh process)."""
    dtype = getattr(torch, dtype_name)
    s, t = inputs(n, c, dtype, device)
    step = make_step(variant)
    fwd_bwd(step, s, t)  # warm-up (compile), then measure a second call from a clean state
    s.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(step, s, t)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fwd_bwd(step, s, t)
    return _rss_bytes("VmHWM") - base


def peak_extra_memory(variant, n, c, dtype, device):
    if device == "cuda":
        return measure_memory_here(variant, n, c, str(dtype).split(".")[-1], device)
    env = {**os.environ, "KDPLUG_CPU_GRAD_CACHE": "0"}
    cmd = [sys.executable, __file__, "--memory-probe",
           json.dumps([variant, n, c, str(dtype).split(".")[-1], device])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="two shapes, fewer repeats")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory columns")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time each run by the thread's CPU time (CPU, --threads 1 only): "
                             "steadier than wall time while other jobs share the cores")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; on a shared machine one thread "
                             "gives steadier figures, without waits for a descheduled thread)")
    parser.add_argument("--capability", default=None,
                        help="CPU kernels for the native column: default, avx2, avx512, or all "
                             "(one column per capability this CPU supports); default: the one "
                             "selected at load (KDPLUG_CPU_CAPABILITY, else the best)")
    parser.add_argument("--parts", default="table,divergences,kdce",
                        help="comma-separated: table, divergences, kdce")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(measure_memory_here(*json.loads(args.memory_probe)))
        return

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if device != "cpu" or torch.get_num_threads() != 1:
            raise SystemExit("--cpu-time: expected --device cpu with --threads 1 (the CPU time "
                             "of one thread is the whole run's only then)")
        global clock
        clock = time.thread_time
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - {"table", "divergences", "kdce"})
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {unknown}; expected table, divergences, kdce")
    repeats = args.repeats or (5 if args.quick else (25 if device == "cpu" else 50))
    cases = [(n, c, torch.float32) for n, c in SHAPES] + [(n, c, torch.bfloat16)
                                                         for n, c in BF16_SHAPES]
    divergence_cases, kdce_cases = DIVERGENCE_CASES, KDCE_CASES
    if args.quick:
        cases = [(2048, 1000, torch.float32), (512, 32000, torch.float32)]
        divergence_cases = kdce_cases = cases

    status = backend_status()
    cpu = status["native_cpu_capability"]
    variants = VARIANTS
    if args.capability and device == "cpu":
        if cpu is None:
            raise SystemExit(f"--capability: the native op is not available ({status['reason']})")
        usable = _cpu_capability.usable()
        chosen = usable if args.capability == "all" else [args.capability]
        if not set(chosen) <= set(usable):
            raise SystemExit(f"--capability {args.capability}: expected all or one of "
                             f"{', '.join(usable)} (built and supported here)")
        variants = [f"native:{c}" for c in chosen] + VARIANTS[1:]
        _cpu_capability.select(chosen[-1], f"--capability {args.capability}")
        cpu = _cpu_capability.current()
        cpu = {"selected": cpu.selected, "reason": cpu.reason}
    name = torch.cuda.get_device_name() if device == "cuda" else (
        f"CPU ({torch.get_num_threads()} threads, ATen {status['cpu_capability']})")
    kernels = f"; CPU kernels: {cpu['selected']} ({cpu['reason']})" if cpu else ""
    print(f"kd loss forward+backward, T={T}, on {name}; torch {torch.__version__}; "
          f"native: {status['native_source']} ({', '.join(status['native_devices']) or 'none'})"
          f"{kernels}")
    largest = max(n * c * 4 for n, c, _ in cases)
    bandwidth = copy_bandwidth(largest, device, repeats)
    print(f"copy bandwidth, for reference: {bandwidth / 1e9:.1f} GB/s (read+write of "
          f"{largest / 2**20:.0f} MiB); each row's floor is measured on its own tensors\n")
    report = {"device": name, "bandwidth_gbs": bandwidth / 1e9}
    if "table" in parts:
        report["rows"] = part_table(cases, device, repeats, args.no_memory, variants)
    if "divergences" in parts:
        report["divergences"] = part_divergences(divergence_cases, device, repeats)
    if "kdce" in parts:
        report["kdce"] = part_kdce(kdce_cases, device, repeats)
    print("\njson:", json.dumps(report))


def dtype_name(dtype):
    return str(dtype).split(".")[-1]


def part_table(cases, device, repeats, no_memory, variants=VARIANTS):
    per_capability = [v for v in variants if v.startswith("native:")]
    best = per_capability[-1] if per_capability else "native"
    header = (f"{'N x C':>14} {'dtype':>8} {'floor ms':>9} {'GB/s':>6} | "
              + " | ".join(f"{v:>16}" for v in variants)
              + f" | {best} vs eager, vs compile"
              + (f" | {per_capability[0]} / {best}" if len(per_capability) > 1 else ""))
    print("kl (kd_kl_div), ms of forward+backward (multiple of the floor)")
    print(header)
    print("-" * len(header))
    rows = []
    for n, c, dtype in cases:
        itemsize = torch.tensor([], dtype=dtype).element_size()
        ms = time_variants(n, c, dtype, device, repeats, variants)
        floor_ms = ms.pop("floor")
        floor_gbs = 3 * n * c * itemsize / floor_ms / 1e6
        cells = " | ".join(f"{ms[v]:8.2f} ({ms[v] / floor_ms:4.1f}x)" for v in variants)
        slower = (f" | {ms[per_capability[0]] / ms[best]:5.2f}x" if len(per_capability) > 1
                  else "")
        print(f"{n:>6} x {c:<6} {dtype_name(dtype):>8} {floor_ms:9.3f} {floor_gbs:6.1f} | "
              f"{cells} | "
              f"{ms['eager'] / ms[best]:5.1f}x, {ms['compile'] / ms[best]:4.1f}x{slower}",
              flush=True)
        rows.append({"n": n, "c": c, "dtype": str(dtype), "floor_ms": floor_ms,
                     "floor_gbs": floor_gbs, "ms": ms})

    if not no_memory:
        print("\npeak extra memory of one forward+backward, as a multiple of one input "
              "(N·C·itemsize; the gradient alone is 1.0)")
        print(f"{'N x C':>14} {'dtype':>8} | " + " | ".join(f"{v:>9}" for v in VARIANTS))
        for row, (n, c, dtype) in zip(rows, cases):
            one_input = n * c * torch.tensor([], dtype=dtype).element_size()
            mem = {v: peak_extra_memory(v, n, c, dtype, device) for v in VARIANTS}
            row["peak_extra_bytes"] = mem
            print(f"{n:>6} x {c:<6} {dtype_name(dtype):>8} | "
                  + " | ".join(f"{mem[v] / one_input:8.2f}x" for v in VARIANTS), flush=True)
        if device == "cpu":
            print("(CPU figures are resident-set growth: allocations under glibc's mmap threshold "
                  "may be served from memory freed by the warm-up and show as less)")
    return rows


def part_divergences(cases, device, repeats):
    names = list(DIVERGENCES)
    print("\nkd_loss by divergence (native), ms of forward+backward (multiple of the floor) "
          "[multiple of kl's time]; beta = 0.5")
    print(f"{'N x C':>14} {'dtype':>8} {'floor ms':>9} | " + " | ".join(f"{d:>24}" for d in names))
    rows = []
    for n, c, dtype in cases:
        ms = time_divergences(n, c, dtype, device, repeats)
        floor_ms = ms.pop("floor")
        cells = " | ".join(f"{ms[d]:7.2f} ({ms[d] / floor_ms:4.1f}x) [{ms[d] / ms['kl']:4.2f}]"
                           for d in names)
        print(f"{n:>6} x {c:<6} {dtype_name(dtype):>8} {floor_ms:9.3f} | {cells}", flush=True)
        rows.append({"n": n, "c": c, "dtype": str(dtype), "floor_ms": floor_ms, "ms": ms})
    return rows


def part_kdce(cases, device, repeats):
    print("\nkd+ce (alpha = 0.5, kl): one fused pass against kd_loss + a separate "
          "F.cross_entropy, ms of forward+backward (multiple of the floor)")
    print(f"{'N x C':>14} {'dtype':>8} {'floor ms':>9} | {'fused':>16} | {'separate':>16} | "
          f"separate / fused")
    rows = []
    for n, c, dtype in cases:
        ms = time_kdce(n, c, dtype, device, repeats)
        floor_ms = ms.pop("floor")
        print(f"{n:>6} x {c:<6} {dtype_name(dtype):>8} {floor_ms:9.3f} | "
              f"{ms['fused']:8.2f} ({ms['fused'] / floor_ms:4.1f}x) | "
              f"{ms['separate']:8.2f} ({ms['separate'] / floor_ms:4.1f}x) | "
              f"{ms['separate'] / ms['fused']:5.2f}x", flush=True)
        rows.append({"n": n, "c": c, "dtype": str(dtype), "floor_ms": floor_ms, "ms": ms})
    return rows


if __name__ == "__main__":
    main()
