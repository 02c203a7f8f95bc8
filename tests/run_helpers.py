"""What several test modules (and tests/fsdp_worker.py, under torchrun) use to run the engine:
a callback that stops a run at a given step, a small generated text corpus, and epoch records
without their timings (which differ between any two runs)."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, Iterable, List


class Interrupt(Exception):
    pass


class CrashAt:
    """Raises Interrupt after step ``step`` of epoch ``epoch`` (1-based) of ``phase``, as a
    crash there would stop the run (the checkpoints written so far stay)."""

    def __init__(self, phase, epoch, step):
        self.at = (phase, epoch, step)

    def on_step(self, phase, epoch, step, loss):
        if (phase, epoch, step) == self.at:
            raise Interrupt(f"simulated crash at {self.at}")


def write_corpus(folder: Path) -> Path:
    """40 generated paragraphs of a 14-word vocabulary, as ``folder/corpus.txt``."""
    rng = random.Random(0)
    words = "the cat sat on a mat and the dog ran to the park while birds sang".split()
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 30)))
                       for _ in range(40))
    path = Path(folder) / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def without_timing(records: Iterable[Dict]) -> List[Dict]:
    """Epoch records (a history, or metrics.jsonl's lines) without the wall-clock fields:
    ``epoch_time_s``, each part's ``<part>_time_s`` and ``samples_per_s``."""
    return [{k: v for k, v in r.items() if not k.endswith("_time_s") and k != "samples_per_s"}
            for r in records]


def metrics_records(out) -> List[Dict]:
    """A run folder's metrics.jsonl, without timings."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return without_timing(json.loads(line) for line in lines)
