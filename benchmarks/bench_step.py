"""Time per distillation step: kdplug's engine against the loop a user would write by hand.

Both sides train the same student (identical initial weights) from the same frozen teacher on the
same batches, with AdamW(lr=1e-3). The hand-written loop is the textbook one:

    with torch.no_grad(): t = teacher(x)
    s = student(x)
    soft = kl_div(log_softmax(s/T), softmax(t/T), "batchmean") · T²
    loss = α·soft + (1−α)·cross_entropy(s, y)
    opt.zero_grad(); loss.backward(); opt.step()

kdplug's step is ``Trainer.train_step`` exactly as ``kdplug.distill`` runs it (teacher in eval mode
under no_grad, the ``kd+ce`` loss through the fused ``kd_kl_div``, non-finite check, LR schedule).
Steps are interleaved (ABBA order) in one process and the medians compared.

    python benchmarks/bench_step.py                      # digits shape (1x8x8) and CIFAR shape
    python benchmarks/bench_step.py --shape cifar --batch-size 128 --steps 40
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kdplug
from kdplug.engine import DistillConfig, Trainer
from kdplug.engine.distributed import DistEnv, resolve_device

SHAPES = {"digits": (1, 8, 10), "cifar": (3, 32, 10)}  # in_channels, image_size, classes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=0, help="timed steps per side "
                        "(default: 200 for digits, 30 for cifar)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--strict", action="store_true", help="exit 1 if kdplug is slower")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, T={args.temperature}, alpha={args.alpha}")
    slower = False
    for shape in (SHAPES if args.shape == "all" else [args.shape]):
        steps = args.steps or (200 if shape == "digits" else 30)
        ratio = bench(shape, steps, args, device)
        slower |= ratio > 1.0
    return 1 if (args.strict and slower) else 0


def bench(shape: str, steps: int, args, device: torch.device) -> float:
    channels, size, classes = SHAPES[shape]
    options = dict(in_channels=channels, image_size=size, num_classes=classes)
    torch.manual_seed(0)
    teacher = kdplug.create_teacher("cnn-teacher", **options).to(device).eval()
    student_k = kdplug.create_student("cnn-student", **options).to(device)
    student_h = copy.deepcopy(student_k)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(args.batch_size, channels, size, size, generator=g),
             torch.randint(0, classes, (args.batch_size,), generator=g)) for _ in range(8)]
    data = [(x.to(device), y.to(device)) for x, y in data]
    T, alpha = args.temperature, args.alpha

    # kdplug: the engine's own step
    cfg = DistillConfig(lr=1e-3, weight_decay=0.01, temperature=T, alpha=alpha)
    trainer = Trainer(student_k, kdplug.create_loss("kd+ce", temperature=T, alpha=alpha),
                      cfg=cfg, env=DistEnv(device=device), lr=1e-3, total_steps=10 ** 9,
                      teacher=teacher)
    batches = [{"inputs": x, "labels": y} for x, y in data]

    def kdplug_step(i: int) -> None:
        trainer.train_step(batches[i % len(batches)])

    # by hand: what a user writes instead
    opt = torch.optim.AdamW(student_h.parameters(), lr=1e-3, weight_decay=0.01)

    def hand_step(i: int) -> None:
        x, y = data[i % len(data)]
        with torch.no_grad():
            t = teacher(x)
        s = student_h(x)
        soft = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1),
                        reduction="batchmean") * T * T
        loss = alpha * soft + (1 - alpha) * F.cross_entropy(s, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(step, i: int) -> float:
        sync()
        start = time.perf_counter()
        step(i)
        sync()
        return time.perf_counter() - start

    for i in range(args.warmup):
        kdplug_step(i)
        hand_step(i)
    times = {"kdplug": [], "hand": []}
    for i in range(steps):  # ABBA: neither side always goes first
        order = (("kdplug", kdplug_step), ("hand", hand_step))
        for name, step in (order if i % 2 == 0 else order[::-1]):
            times[name].append(timed(step, i))
    k_ms = statistics.median(times["kdplug"]) * 1e3
    h_ms = statistics.median(times["hand"]) * 1e3
    ratio = k_ms / h_ms
    verdict = "kdplug is not slower" if ratio <= 1.0 else "kdplug is SLOWER"
    print(f"{shape:>7} ({channels}x{size}x{size}, {steps} steps each): "
          f"kdplug {k_ms:8.3f} ms/step  hand-written {h_ms:8.3f} ms/step  "
          f"ratio kdplug/hand {ratio:.3f}  -> {verdict}")
    return ratio


if __name__ == "__main__":
    sys.exit(main())
