"""Throughput of the CPU kernels' vector exp and log (csrc/cpu/cpu_common.h) on one core, against
the rate at which the fused op sweeps the logits: how much of the op's time the exps and logs
alone would take, i.e. whether they are the bound.

    python benchmarks/bench_cpu_math.py                      # 512x32000 float32, each divergence
    python benchmarks/bench_cpu_math.py --shape 2048x1000 --capability avx2

The math is compiled here (torch.utils.cpp_extension.load_inline, about a minute) from the very
header the kernels include, with the capability's flags from kdplug/_build_flags.py. Each function
maps an L1-resident buffer into another (out = f(in), as the sweeps do), so memory plays no
part; the best of five trials on the thread's CPU clock. The op is timed forward+backward on one
thread (CPU time of the thread, so time lost to other jobs on a shared machine is not counted),
interleaved over the divergences, medians of the repeats.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.cpp_extension import load_inline

from kdplug import _build_flags

import bench_kd_loss  # this folder is on sys.path when run as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOURCE = r"""
#include <torch/extension.h>
#include <time.h>
#include <algorithm>
#include "cpu/cpu_common.h"

namespace {
using kdplug::cpu::Vec;
using kdplug::cpu::kVec;

// Elements per second of out = f(in) over n floats (in L1), `reps` times, on this thread's CPU
// clock (time the thread spent descheduled is not counted); the best of five trials.
template <typename F>
double rate(const std::vector<float>& in, int64_t reps, F f) {
  std::vector<float> out(in.size());
  const int64_t n = static_cast<int64_t>(in.size());
  double best = 0.0;
  for (int trial = 0; trial < 5; ++trial) {
    timespec t0, t1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    for (int64_t r = 0; r < reps; ++r) {
      for (int64_t i = 0; i < n; i += kVec) f(Vec::loadu(in.data() + i)).store(out.data() + i);
      asm volatile("" : : "r"(out.data()) : "memory");  // each rep's stores are kept
    }
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
    const double s = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
    best = std::max(best, static_cast<double>(n) * reps / s);
  }
  return best;
}
}  // namespace

std::vector<double> math_rates(int64_t reps) {
  std::vector<float> neg(4096), pos(4096);
  for (int i = 0; i < 4096; ++i) {
    neg[i] = -20.f * (i + 0.5f) / 4096.f;  // what the sweeps feed exp: logit - max <= 0
    pos[i] = (i + 0.5f) / 4096.f;          // what jsd's log gets: a mixture in (0, 1]
  }
  return {rate(neg, reps, [](const Vec& v) { return v; }),
          rate(neg, reps, [](const Vec& v) { return kdplug::cpu::fast_exp(v); }),
          rate(pos, reps, [](const Vec& v) { return kdplug::cpu::fast_log(v); }),
          rate(pos, reps, [](const Vec& v) { return kdplug::cpu::mixture_log(v); }),
          rate(pos, reps, [](const Vec& v) { return Vec(1.f) / v; }),
          rate(pos, reps, [](const Vec& v) { return kdplug::KdLane<Vec>::div_mixture(Vec(1.f), v); })};
}
"""


def compile_math(capability: str):
    flags = _build_flags.CXX_FLAGS + _build_flags.CPU_CAPABILITY_FLAGS[capability]
    return load_inline(name=f"kdplug_bench_math_{capability}", cpp_sources=[SOURCE],
                       functions=["math_rates"], extra_cflags=flags,
                       extra_include_paths=[os.path.join(ROOT, "csrc")], verbose=False)


def op_ms(n, c, dtype, repeats):
    """Median CPU-thread ms of kd_loss forward+backward per divergence: bench_kd_loss's own
    interleaved timing, on the thread's clock (its --cpu-time)."""
    bench_kd_loss.clock = time.thread_time
    ms = bench_kd_loss.time_divergences(n, c, dtype, torch.device("cpu"), repeats)
    return {d: ms[d] for d in COUNTS}


# exps, logs and divisions per element of each divergence's sweeps (csrc/cpu/kd_dense_cpu.cpp with
# csrc/kd_math.h): every divergence takes one exp of the student and one of the teacher; jsd and
# the skews one log of the mixture (mixture_log); the skews one division by it.
COUNTS = {"kl": (2, 0, 0), "reverse_kl": (2, 0, 0), "tvd": (2, 0, 0), "jsd": (2, 1, 0),
          "skew_kl": (2, 1, 1), "skew_reverse_kl": (2, 1, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512x32000", help="NxC of the op's timing")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--capability", default="avx512", choices=_build_flags.CAPABILITIES)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, c = (int(v) for v in args.shape.lower().split("x"))

    loop, exp, full_log, log, plain_div, div = compile_math(args.capability).math_rates(4000)
    print(f"one core, {args.capability}: elements/s (10^9) of a copy {loop / 1e9:.2f}, "
          f"fast_exp {exp / 1e9:.2f}, fast_log {full_log / 1e9:.2f}, the mixtures' log "
          f"(mixture_log) {log / 1e9:.2f}, division {plain_div / 1e9:.2f}, "
          f"the skews' division (div_mixture) {div / 1e9:.2f}")
    ms = op_ms(n, c, getattr(torch, args.dtype), args.repeats)
    print(f"\nkd_loss forward+backward, {n}x{c} {args.dtype}, one thread (CPU ms, medians):")
    print(f"{'divergence':16s} {'ms':>8s} {'/ kl':>6s} {'elem/s':>9s} {'exp+log+div ms':>15s} "
          f"{'share':>6s}")
    for d, t in ms.items():
        e, lg, dv = COUNTS[d]
        math_ms = n * c * (e / exp + lg / log + dv / div) * 1e3
        print(f"{d:16s} {t:8.2f} {t / ms['kl']:6.2f} {n * c / t / 1e6:9.2e} {math_ms:15.2f} "
              f"{math_ms / t:6.0%}")


if __name__ == "__main__":
    main()
