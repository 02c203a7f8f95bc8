"""Started by tests/test_fsdp.py under torchrun: several kdplug.distill runs in one process group.

``python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py JOBS.json`` runs the
jobs in order (one process group for all of them: one start-up). A job is the keywords of
``kdplug.distill`` plus optionally ``crash_at`` [phase, epoch, step] (every process stops there, as
a killed run would), ``copy_to`` (rank 0 copies the run folder there afterwards) and ``probe``
(the student's logits on fixed token ids, saved to PROBE as the sharded model computes them).
Rank 0 writes what each job saw to ``JOBS.json.out``.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from run_helpers import CrashAt, Interrupt  # this script's folder is on sys.path


def sharding_facts(result) -> dict:
    """What this process holds of each model: its shards' sizes, whether any gradient exists."""
    from torch.distributed.tensor import DTensor

    facts = {}
    for phase in ("teacher", "student"):
        model = getattr(result, phase).model
        if model is None:
            continue
        params = list(model.parameters())
        facts[phase] = {
            "all_dtensors": all(isinstance(p, DTensor) for p in params),
            "local": sum(p.to_local().numel() for p in params if isinstance(p, DTensor)),
            "global": sum(p.numel() for p in params),
            "any_grad": any(p.grad is not None for p in params),
        }
    return facts


def main() -> None:
    jobs_path = Path(sys.argv[1])
    jobs = json.loads(jobs_path.read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    import kdplug

    seen = []
    try:
        for job in jobs:
            options = dict(job["options"])
            crash = job.get("crash_at")
            callbacks = [CrashAt(*crash)] if crash else []
            record = {"out": options["out"]}
            try:
                result = kdplug.distill(callbacks=callbacks, **options)
                record.update(student_loss=result.student.loss, facts=sharding_facts(result))
                if job.get("probe"):
                    ids = torch.randint(0, 200, (3, 24), generator=torch.Generator().manual_seed(0))
                    with torch.no_grad():
                        logits = result.student.model(ids).logits
                    if rank == 0:
                        torch.save({"inputs": ids, "logits": logits}, job["probe"])
            except Interrupt as exc:
                record["interrupted"] = str(exc)
            dist.barrier()
            if job.get("copy_to") and rank == 0:
                shutil.copytree(options["out"], job["copy_to"])
            dist.barrier()
            seen.append(record)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(f"{jobs_path}.out").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
