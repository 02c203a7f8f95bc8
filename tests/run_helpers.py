"""What several test modules (and tests/fsdp_worker.py, under torchrun) use to run the engine:
a callback that stops a run at a given step, and a small generated text corpus."""
from __future__ import annotations

import random
from pathlib import Path


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
