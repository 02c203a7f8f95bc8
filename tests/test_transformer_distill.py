"""End to end through kdplug.distill / `kdplug distill`: the Transformer pairs, feature losses with
their projection in the checkpoint, the CNN hint, and the errors raised before training."""
from __future__ import annotations

import random

import pytest
import torch

import kdplug
from kdplug_transformer.text_data import classification_splits
from run_helpers import write_corpus

try:
    from kdplug import distill
except ImportError:
    from kdplug.engine import distill


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models


TEACHER = dict(num_layers=2, d_model=32, num_heads=2)
STUDENT = dict(num_layers=1, d_model=16, num_heads=2)
FAST = dict(batch_size=16, lr=3e-3, quiet=True, device="cpu", eval_batch_size=64)


def generated_classification(n_per_class=24, seed=0):
    """Generated sentences whose words give away their class (for tests only)."""
    rng = random.Random(seed)
    vocab = [["red", "apple", "cherry", "ruby"], ["blue", "sky", "ocean", "navy"],
             ["green", "grass", "leaf", "moss"]]
    pairs = [(" ".join(rng.choice(vocab[c]) for _ in range(rng.randint(2, 7))), str(c))
             for c in range(3) for _ in range(n_per_class)]
    return classification_splits(pairs, max_len=48, test_fraction=0.25, seed=seed)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


def test_classifier_pair_distils_with_hidden_and_attention_terms(tmp_path):
    result = distill("transformer-cls-teacher", "transformer-cls-student",
                     generated_classification(), "kd+ce+hidden+attention", epochs=2,
                     teacher_epochs=2, teacher_options=TEACHER, student_options=STUDENT,
                     temperature=2.0, alpha=0.5, out=str(tmp_path / "run"), **FAST)
    assert result.task == "classification"
    assert result.teacher.params > result.student.params
    history = result.student.history
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["train_loss"]))
                                     for r in history)
    assert 0.0 <= result.student.accuracy <= 1.0


def test_lm_pair_distils_on_a_text_file(corpus, tmp_path):
    result = distill("transformer-lm-teacher", "transformer-lm-student", f"text:{corpus}",
                     "kd+ce", epochs=1, teacher_epochs=1, teacher_options=TEACHER,
                     student_options=STUDENT, data_options={"seq_len": 32}, temperature=2.0,
                     alpha=0.5, out=str(tmp_path / "run"), baseline=True, **FAST)
    assert result.task == "lm"
    for phase in (result.teacher, result.student, result.scratch):
        assert phase.metrics["perplexity"] > 1.0 and phase.metrics["tokens"] > 0


@pytest.mark.parametrize("loss_name, divergence", [("kd+ce", "kl"), ("kd", "jsd")])
def test_an_lm_run_with_the_fused_head_matches_one_without(corpus, tmp_path, monkeypatch,
                                                           loss_name, divergence):
    import kdplug.ops

    calls = []
    fused = kdplug.ops.fused_linear_kd
    monkeypatch.setattr(kdplug.ops, "fused_linear_kd", lambda *a, **k: calls.append(1) or
                        fused(*a, **k))
    results = {}
    for mode in ("on", "off"):
        results[mode] = distill(
            "transformer-lm-teacher", "transformer-lm-student", f"text:{corpus}", loss_name,
            epochs=2, teacher_epochs=1, teacher_options=TEACHER, student_options=STUDENT,
            data_options={"seq_len": 24}, temperature=2.0, alpha=0.5, out=str(tmp_path / mode),
            loss_options={"fused_linear": mode, "divergence": divergence}, **FAST)
        if mode == "on":
            assert calls, "fused_linear=on did not reach fused_linear_kd"
            calls.clear()
    assert not calls  # fused_linear=off: the logits path
    on, off = results["on"].student, results["off"].student
    assert len(on.history) == 2
    for a, b in zip(on.history, off.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    for key in ("loss", "perplexity", "accuracy"):
        assert on.metrics[key] == pytest.approx(off.metrics[key], rel=1e-4, abs=1e-6)


def test_vocabulary_mismatch_is_caught_before_training(corpus, tmp_path):
    with pytest.raises(kdplug.KdplugError) as info:
        distill("transformer-lm-teacher", "transformer-lm-student", f"text:{corpus}", "kd+ce",
                epochs=1, teacher_epochs=1, teacher_options={**TEACHER, "vocab_size": 300},
                student_options=STUDENT, data_options={"seq_len": 32},
                out=str(tmp_path / "run"), **FAST)
    message = str(info.value)
    assert ("vocabulary mismatch: the teacher 'transformer-lm-teacher' predicts 300 tokens, the "
            "student 'transformer-lm-student' 259" in message), message
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir())


class _StopAfter:
    def __init__(self, steps):
        self.steps = steps

    def on_step(self, phase, epoch, step, loss):
        if phase == "student" and step >= self.steps:
            raise KeyboardInterrupt("simulated kill")


def test_projection_is_trained_saved_and_restored_on_resume(tmp_path):
    data = generated_classification()
    common = dict(epochs=1, teacher_epochs=1, teacher_options=TEACHER, student_options=STUDENT,
                  loss_options={"hidden_weight": 0.5}, checkpoint_every=1, **FAST)
    whole = distill("transformer-cls-teacher", "transformer-cls-student", data, "kd+ce+hidden",
                    out=str(tmp_path / "whole"), **common)
    ckpt = torch.load(whole.student.checkpoint, weights_only=False)
    loss_state = ckpt["state"]["loss"]
    keys = sorted(k for k in loss_state if k.startswith("hidden.projections."))
    assert keys == ["hidden.projections.s0_t0.bias", "hidden.projections.s0_t0.weight",
                    "hidden.projections.s1_t2.bias", "hidden.projections.s1_t2.weight"]
    assert loss_state["hidden.projections.s1_t2.weight"].shape == (32, 16)
    # the projection learned: it differs from a fresh loss prepared from the same seed? it must
    # at least be in the optimizer state (one Adam slot per student and projection tensor)
    n_student = len(list(whole.student.model.parameters()))
    assert len(ckpt["state"]["optimizer"]["state"]) == n_student + 4

    with pytest.raises(KeyboardInterrupt):
        distill("transformer-cls-teacher", "transformer-cls-student", data, "kd+ce+hidden",
                out=str(tmp_path / "killed"), callbacks=[_StopAfter(2)], **common)
    resumed = distill("transformer-cls-teacher", "transformer-cls-student", data,
                      "kd+ce+hidden", out=str(tmp_path / "killed"), resume=True, **common)
    again = torch.load(resumed.student.checkpoint, weights_only=False)["state"]["loss"]
    for key in keys:
        torch.testing.assert_close(again[key], loss_state[key])
    for name, value in whole.student.model.state_dict().items():
        torch.testing.assert_close(resumed.student.model.state_dict()[name], value)


def test_fitnets_hint_on_the_cnn_pair_through_the_engine(tmp_path):
    result = distill("cnn-teacher", "cnn-student", "digits", "kd+ce+hint", epochs=1,
                     teacher_epochs=0, data_options={"train_size": 96},
                     loss_options={"hidden_weight": 0.1}, out=str(tmp_path / "run"),
                     batch_size=32, quiet=True, device="cpu")
    state = torch.load(result.student.checkpoint, weights_only=False)["state"]["loss"]
    convs = {k: v.shape for k, v in state.items() if k.endswith("weight")}
    assert convs and all(len(shape) == 4 and shape[-2:] == (1, 1) for shape in convs.values())


def test_cli_lm_preset(corpus, tmp_path):
    from click.testing import CliRunner

    from kdplug.cli import cli

    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, [
        "distill", "--teacher", "transformer-lm-teacher", "--student", "transformer-lm-student",
        "--data", f"text:{corpus}", "--epochs", "1", "--teacher-epochs", "1", "--batch-size",
        "16", "--device", "cpu", "--teacher-option", "num_layers=2", "--teacher-option",
        "d_model=32", "--teacher-option", "num_heads=2", "--student-option", "d_model=16",
        "--student-option", "num_heads=2", "--data-option", "seq_len=32", "--loss",
        "kd+ce+attention", "--loss-option", "attention_layers=uniform", "-T", "2", "--alpha",
        "0.5", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ppl" in result.output and (out / "report.json").is_file()
    missing = CliRunner().invoke(cli, [
        "distill", "--teacher", "transformer-lm-teacher", "--student", "transformer-lm-student",
        "--data", f"text:{tmp_path / 'none.txt'}", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1
    assert "none.txt" in missing.output and "does not exist" in missing.output
