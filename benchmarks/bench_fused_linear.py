"""Forward+backward time and peak extra memory of a language model's distillation loss with its
two output heads: the logits materialized vs computed chunk by chunk (kdplug.ops.fused_linear_kd).

    python benchmarks/bench_fused_linear.py                     # the issue's grid (slow on a CPU)
    python benchmarks/bench_fused_linear.py --tokens 2048 --hidden 256 --vocab 32000 128256
    python benchmarks/bench_fused_linear.py --quick             # a smoke run
    python benchmarks/bench_fused_linear.py --vocab 128256 --chunk-sizes 256 512  # + other chunks

The loss, every variant: α·T²·KL(teacher ‖ student) per token + (1 − α)·CE(student, labels), with
student logits = h @ Wsᵀ (h and Ws learn) and teacher logits = ht @ Wtᵀ (frozen), T = 2, α = 0.5.

  eager     both heads, F.log_softmax, F.kl_div(log_target), F.cross_entropy: what users write
  unfused   both heads, then kdplug.ops.kd_loss(s, t, labels=...): kdplug's path without fusion
  chunked   kdplug.ops.fused_linear_kd(..., backend="torch"): chunked, pure PyTorch per chunk
  native    kdplug.ops.fused_linear_kd(..., backend="native"): chunked, the native op per chunk

Times are medians of interleaved repeats (the order flips each repeat, so a shared machine slows
the variants alike). Peak extra memory is what one forward+backward adds on top of its inputs:
on the CPU the resident-set high-water mark of a fresh subprocess per variant (after a warm-up
call; KDPLUG_CPU_GRAD_CACHE=0), on CUDA torch's allocator peak. The goals of issue #11 are
printed, not asserted: native's peak ≤ 15% of eager's at V = 128256, native no slower than
unfused.
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

from bench_kd_loss import _rss_bytes  # this folder is on sys.path when run as a script
from kdplug.ops import backend_status, fused_linear_kd, kd_loss

VARIANTS = ("eager", "unfused", "chunked", "native")
T, ALPHA = 2.0, 0.5


def make_inputs(tokens, hidden, vocab, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
    ht = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    wt = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    return h, w.requires_grad_(), ht, wt, labels


def eager_loss(h, w, ht, wt, labels):
    s = h @ w.t()
    with torch.no_grad():
        t = ht @ wt.t()
    soft = F.kl_div(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1),
                    reduction="batchmean", log_target=True) * T * T
    return ALPHA * soft + (1 - ALPHA) * F.cross_entropy(s.float(), labels)


def unfused_loss(h, w, ht, wt, labels):
    with torch.no_grad():
        t = ht @ wt.t()
    return kd_loss(h @ w.t(), t, T, labels=labels, alpha=ALPHA)


def chunked_loss(backend, chunk_size=None):
    return lambda h, w, ht, wt, labels: fused_linear_kd(h, w, ht, wt, labels=labels,
                                                         temperature=T, alpha=ALPHA,
                                                         chunk_size=chunk_size, backend=backend)


def add_chunk_variants(sizes):
    """native/N: the native path with chunk_size=N, to compare with the default chunk."""
    names = []
    for n in sizes:
        names.append(f"native/{n}")
        LOSSES[names[-1]] = chunked_loss("native", n)
    return names


LOSSES = {"eager": eager_loss, "unfused": unfused_loss, "chunked": chunked_loss("torch"),
          "native": chunked_loss("native")}


def fwd_bwd(variant, inputs):
    h, w = inputs[0], inputs[1]
    h.grad = w.grad = None
    LOSSES[variant](*inputs).backward()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_variants(variants, inputs, device, repeats):
    times = {v: [] for v in variants}
    for v in variants:
        fwd_bwd(v, inputs)  # warm-up
    for r in range(repeats):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            sync(device)
            start = time.perf_counter()
            fwd_bwd(v, inputs)
            sync(device)
            times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def measure_memory_here(variant, tokens, hidden, vocab, dtype_name, device):
    inputs = make_inputs(tokens, hidden, vocab, getattr(torch, dtype_name), device)
    fwd_bwd(variant, inputs)  # warm-up: lazy initializations are not the variant's memory
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(variant, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    inputs[0].grad = inputs[1].grad = None
    base = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fwd_bwd(variant, inputs)
    return _rss_bytes("VmHWM") - base


def peak_extra_memory(variant, tokens, hidden, vocab, dtype_name, device):
    if device == "cuda":
        return measure_memory_here(variant, tokens, hidden, vocab, dtype_name, device)
    env = {**os.environ, "KDPLUG_CPU_GRAD_CACHE": "0"}
    cmd = [sys.executable, __file__, "--memory-probe",
           json.dumps([variant, tokens, hidden, vocab, dtype_name, device])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        return None  # e.g. killed for memory: printed as "—"
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[],
                    help="also time the native path at these chunk sizes (variants native/N)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--quick", action="store_true", help="one small case, one repeat")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_probe:
        probe = json.loads(args.memory_probe)
        if "/" in probe[0]:
            add_chunk_variants([int(probe[0].split("/")[1])])
        print(measure_memory_here(*probe))
        return None
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.repeats = [256], [64], [4096], 1
    variants = [v for v in args.variants
                if v != "native" or backend_status()["native_available"]]
    if args.chunk_sizes and backend_status()["native_available"]:
        variants += add_chunk_variants(args.chunk_sizes)
    print(f"fused linear KD loss, forward+backward; {args.device}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; T = {T}, alpha = {ALPHA}")
    print("   BT      H       V  dtype     | " + " | ".join(f"{v:>17}" for v in variants)
          + " |  native vs unfused")
    rows = []
    for tokens in args.tokens:
        for hidden in args.hidden:
            for vocab in args.vocab:
                for dtype_name in args.dtypes:
                    inputs = make_inputs(tokens, hidden, vocab, getattr(torch, dtype_name),
                                         args.device)
                    secs = time_variants(variants, inputs, args.device, args.repeats)
                    del inputs
                    peaks = {v: None if args.no_memory else peak_extra_memory(
                        v, tokens, hidden, vocab, dtype_name, args.device) for v in variants}
                    rows.append(dict(tokens=tokens, hidden=hidden, vocab=vocab,
                                     dtype=dtype_name, seconds=secs, peak_bytes=peaks))
                    cells = [f"{secs[v] * 1e3:8.0f} ms {_mib(peaks[v]):>6}" for v in variants]
                    ratio = (f"x{secs['unfused'] / secs['native']:.2f} faster"
                             if "native" in secs and "unfused" in secs else "")
                    print(f"{tokens:5d} {hidden:6d} {vocab:7d}  {dtype_name:8s}  | "
                          + " | ".join(cells) + f" |  {ratio}", flush=True)
    _print_goals(rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    return rows


def _mib(value):
    return "—" if value is None else f"{value / 2**20:.0f}M"


def _print_goals(rows):
    for r in rows:
        peaks = r["peak_bytes"]
        if r["vocab"] == 128256 and peaks.get("native") and peaks.get("eager"):
            share = peaks["native"] / peaks["eager"]
            print(f"goal: native peak <= 15% of eager at V = 128256 "
                  f"({r['tokens']}x{r['hidden']} {r['dtype']}): {share:.1%} "
                  f"{'met' if share <= 0.15 else 'NOT met'}")
        secs = r["seconds"]
        if "native" in secs and "unfused" in secs:
            print(f"goal: native no slower than unfused ({r['tokens']}x{r['hidden']}x"
                  f"{r['vocab']} {r['dtype']}): x{secs['unfused'] / secs['native']:.2f} "
                  f"{'met' if secs['native'] <= secs['unfused'] else 'NOT met'}")


if __name__ == "__main__":
    main()
