"""Distillation step throughput (tokens/s) of the Transformer LM pair at a 32,000-token vocabulary:
the loss through kdplug's fused op against the eager PyTorch loss, in the same run, interleaved.

    python benchmarks/bench_lm_step.py                   # CPU defaults (small batch)
    python benchmarks/bench_lm_step.py --device cuda --batch 16 --seq-len 256
    python benchmarks/bench_lm_step.py --quick           # a smoke run

One step is what the engine does per batch: the teacher (transformer-lm-teacher: 6 layers, d=384)
in eval mode under no_grad, the student (transformer-lm-student: 2 layers, d=128) forward, the loss
α·T²·KL(teacher ‖ student) per counted token + (1−α)·next-token CE, backward, AdamW step (the
engine's optimizer: torch's fused AdamW). --teacher-options / --student-options change the
models' sizes (e.g. num_layers=2,d_model=128,num_heads=4: a teacher whose body costs little
beside its head). All variants use the same models, batches (right-padded, so the padding mask
is exercised) and optimizer; only the loss differs:

  fused    kdplug.ops.kd_kl_div(s, t, T, mask=tokens)   (native kernel when built, see below)
  eager    F.kl_div(F.log_softmax(s/T), F.softmax(t/T), reduction="none").sum(-1) over counted
           tokens, × T²: what users write
  fallback kdplug.ops.kd_kl_div(..., backend="torch")  (only with --with-fallback)
  fused-linear  kdplug.ops.fused_linear_kd on both models' final hidden states and heads, the CE
           fused in (labels=, alpha=): no [tokens, V] logits held, chunk by chunk (issue #11)

Peak memory: the process's resident-set growth over one step of each variant (its high-water mark
reset before the step; CPU only), printed next to the throughput.

Variants alternate within every repeat (order flipped each repeat) and each figure is the median
of the repeats, so a noisy shared machine slows them alike. The first steps (warm-up) are not timed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import kdplug
from bench_kd_loss import _rss_bytes  # this folder is on sys.path when run as a script
from kdplug.engine.config import ConfigError, DistillConfig, parse_options
from kdplug.engine.loop import make_optimizer
from kdplug.ops import backend_status, fused_linear_kd, kd_kl_div

IGNORE = -100


def eager_soft(s, t, temperature, mask):
    rows = F.kl_div(F.log_softmax(s.float() / temperature, -1),
                    F.softmax(t.float() / temperature, -1), reduction="none").sum(-1)
    return rows[mask].mean() * temperature * temperature


def make_soft(variant):
    if variant == "fused":
        return lambda s, t, T, m: kd_kl_div(s, t, T, mask=m)
    if variant == "fallback":
        return lambda s, t, T, m: kd_kl_div(s, t, T, mask=m, backend="torch")
    return eager_soft


def make_batch(batch, seq_len, vocab, seed, device):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (batch, seq_len + 1), generator=g)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=g)
    lengths[0] = seq_len
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    inputs = tokens[:, :-1].masked_fill(~mask, 0)
    labels = tokens[:, 1:].masked_fill(~mask, IGNORE)
    return {k: v.to(device) for k, v in
            {"inputs": inputs, "labels": labels, "attention_mask": mask}.items()}


def model_options(text):
    """"num_layers=2,d_model=128" -> {"num_layers": 2, "d_model": 128} (each pair read as the
    CLI reads --teacher-option)."""
    try:
        return parse_options(filter(None, text.split(",")), "--teacher-options/--student-options")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def peak_growth(run):
    """Resident-set growth while run() runs (Linux; None elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _rss_bytes("VmRSS")
        run()
        return _rss_bytes("VmHWM") - base
    except OSError:
        run()
        return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--amp", choices=["none", "bf16"], default="none")
    ap.add_argument("--teacher-options", type=model_options, default={},
                    help="teacher model options, e.g. num_layers=2,d_model=128,num_heads=4")
    ap.add_argument("--student-options", type=model_options, default={},
                    help="student model options, e.g. num_layers=2,d_model=128")
    ap.add_argument("--with-fallback", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.repeats, args.warmup = 1, 2, 1
    device = torch.device(args.device)
    torch.manual_seed(0)
    opts = dict(vocab_size=args.vocab, max_len=args.seq_len)
    teacher = kdplug.create_teacher("transformer-lm-teacher", **opts, **args.teacher_options)
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    variants = ["fused", "eager", "fused-linear"] + (["fallback"] if args.with_fallback else [])
    # one student (and optimizer) per variant, from the same initial weights
    init = kdplug.create_student("transformer-lm-student", **opts, **args.student_options)
    students = {}
    for v in variants:
        s = kdplug.create_student("transformer-lm-student", **opts, **args.student_options)
        s.load_state_dict(init.state_dict())
        s.to(device).train()
        students[v] = (s, make_optimizer(DistillConfig(optimizer="adamw", weight_decay=0.01),
                                         s.parameters(), lr=1e-4))
    batches = [make_batch(args.batch, args.seq_len, args.vocab, i, device) for i in range(4)]
    tokens_per_step = int(batches[0]["attention_mask"].sum())  # the first batch's count
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp == "bf16" \
        else (lambda: torch.autocast(device.type, enabled=False))
    T, alpha = args.temperature, args.alpha

    def fused_linear_step(student, batch):
        inputs, attention = batch["inputs"], batch["attention_mask"]
        with torch.no_grad(), amp():
            t_hidden = teacher.final_hidden_states(inputs, attention_mask=attention)
        with amp():
            s_hidden = student.final_hidden_states(inputs, attention_mask=attention)
            mask = batch["labels"] != IGNORE
            return fused_linear_kd(s_hidden, student.head.weight, t_hidden, teacher.head.weight,
                                   labels=batch["labels"], alpha=alpha, temperature=T,
                                   mask=mask)

    def step(variant, batch):
        student, opt = students[variant]
        if variant == "fused-linear":
            loss = fused_linear_step(student, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())
        soft = make_soft(variant)
        with torch.no_grad(), amp():
            t_logits = teacher(batch["inputs"], attention_mask=batch["attention_mask"]).logits
        with amp():
            s_logits = student(batch["inputs"], attention_mask=batch["attention_mask"]).logits
            mask = batch["labels"] != IGNORE
            loss = alpha * soft(s_logits, t_logits.to(s_logits.dtype), T, mask) + (1 - alpha) * \
                F.cross_entropy(s_logits.float().reshape(-1, args.vocab),
                                batch["labels"].reshape(-1), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    first = {v: step(v, batches[0]) for v in variants}  # same weights: the losses must agree
    peaks = {v: peak_growth(lambda: step(v, batches[1])) for v in variants}
    for v in variants:
        for i in range(args.warmup - 1):
            step(v, batches[(i + 1) % len(batches)])
    counted = [int(b["attention_mask"].sum()) for b in batches]
    times = {v: [] for v in variants}
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            n_tokens = 0
            sync(device)
            start = time.perf_counter()
            for i in range(args.steps):
                k = (r * args.steps + i) % len(batches)
                step(v, batches[k])
                n_tokens += counted[k]
            sync(device)
            times[v].append(n_tokens / (time.perf_counter() - start))
    status = backend_status()
    optimizer = students["eager"][1]
    optimizer_name = (type(optimizer).__name__
                      + (" (fused)" if optimizer.defaults.get("fused") else ""))
    result = {
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "vocab": args.vocab, "batch": args.batch, "teacher_options": args.teacher_options,
        "student_options": args.student_options, "optimizer": optimizer_name,
        "seq_len": args.seq_len, "amp": args.amp,
        "counted_tokens_per_step": tokens_per_step, "steps": args.steps,
        "repeats": args.repeats, "fused_backend": "native" if status["native_available"]
        and not status["env_overrides"].get("KDPLUG_FORCE_TORCH") else "torch",
        "first_step_loss": first, "peak_rss_growth_bytes": peaks,
        "tokens_per_s_median": {v: statistics.median(t) for v, t in times.items()},
        "tokens_per_s_all": times,
    }
    med = result["tokens_per_s_median"]
    print(f"LM distillation step, vocab {args.vocab}, batch {args.batch}×{args.seq_len} "
          f"({sum(counted) / len(counted):.0f} counted tokens/step on average), {device}, "
          f"{torch.get_num_threads()} threads, amp {args.amp}")
    print(f"teacher transformer-lm-teacher {args.teacher_options or ''}, student "
          f"transformer-lm-student {args.student_options or ''}; {result['optimizer']}; fused op "
          f"backend: {result['fused_backend']}")
    print("first-step loss (same weights): " + ", ".join(f"{v} {x:.5f}" for v, x in first.items()))
    for v in variants:
        spread = f"[{min(times[v]):.0f}–{max(times[v]):.0f}]"
        peak = "" if peaks[v] is None else f"  peak +{peaks[v] / 2**20:.0f} MiB"
        print(f"  {v:<12} {med[v]:>10.0f} tokens/s  {spread}  ×{med[v] / med['eager']:.2f} vs "
              f"eager{peak}")
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
