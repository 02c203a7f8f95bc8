"""The built-in losses ce, kd and kd+ce: values, masking, gradients, validation, registration."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdplug
from kdplug.outputs import ModelOutput


def reference_kd(s, t, T):
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), batchmean: the textbook formula, eager PyTorch."""
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                    log_target=True) * T * T


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, requires_grad=True)
    t = torch.randn(6, 5, generator=g) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    return s, t, {"inputs": torch.zeros(6, 1), "labels": y}


def test_builtin_losses_are_registered_by_the_losses_plugin():
    losses = kdplug.list_losses()
    for name in ("ce", "kd", "kd+ce"):
        assert name in losses
        assert losses[name].plugin == "losses"


def test_kd_is_t_squared_kl_of_log_probabilities(logits):
    s, t, batch = logits
    loss = kdplug.create_loss("kd", temperature=3.0)
    got = loss(ModelOutput(s), ModelOutput(t), batch)
    torch.testing.assert_close(got, reference_kd(s, t, 3.0))
    got.backward()
    grad = s.grad.clone()
    s.grad = None
    reference_kd(s, t, 3.0).backward()
    torch.testing.assert_close(grad, s.grad)


def test_kd_ce_mixes_soft_and_hard_terms(logits):
    s, t, batch = logits
    loss = kdplug.create_loss("kd+ce", temperature=2.0, alpha=0.7)
    want = 0.7 * reference_kd(s, t, 2.0) + 0.3 * F.cross_entropy(s, batch["labels"])
    torch.testing.assert_close(loss(ModelOutput(s), ModelOutput(t), batch), want)
    # plain tensors are accepted too, and α at the ends drops a term
    torch.testing.assert_close(kdplug.create_loss("kd+ce", alpha=0.0)(s, t, batch),
                               F.cross_entropy(s, batch["labels"]))
    torch.testing.assert_close(kdplug.create_loss("kd+ce", temperature=5.0, alpha=1.0)(s, t, batch),
                               reference_kd(s, t, 5.0))


def test_ce_ignores_the_teacher(logits):
    s, _, batch = logits
    ce = kdplug.create_loss("ce", temperature=4.0, alpha=0.9)  # engine options are accepted
    torch.testing.assert_close(ce(ModelOutput(s), None, batch), F.cross_entropy(s, batch["labels"]))


def test_teacher_gets_no_gradient(logits):
    s, t, batch = logits
    t = t.clone().requires_grad_(True)
    kdplug.create_loss("kd+ce")(s, t, batch).backward()
    assert t.grad is None and s.grad is not None


def test_sequence_logits_count_only_labelled_tokens():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 7, generator=g)
    t = torch.randn(2, 4, 7, generator=g)
    labels = torch.randint(0, 7, (2, 4), generator=g)
    labels[0, 3] = labels[1, 2:] = -100
    keep = labels != -100
    batch = {"inputs": torch.zeros(2, 4, dtype=torch.long), "labels": labels}
    kd = kdplug.create_loss("kd", temperature=2.0)(s, t, batch)
    torch.testing.assert_close(kd, reference_kd(s[keep], t[keep], 2.0))
    ce = kdplug.create_loss("ce")(s, t, batch)
    torch.testing.assert_close(ce, F.cross_entropy(s[keep], labels[keep]))
    # an attention mask narrows it further
    attention = torch.ones(2, 4, dtype=torch.bool)
    attention[0, 0] = False
    masked_batch = {**batch, "attention_mask": attention}
    kd_masked = kdplug.create_loss("kd", temperature=2.0)(s, t, masked_batch)
    both = keep & attention
    torch.testing.assert_close(kd_masked, reference_kd(s[both], t[both], 2.0))


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf"), "4"])
def test_bad_temperature_is_a_clear_error(temperature):
    with pytest.raises(kdplug.KdplugError, match="temperature"):
        kdplug.create_loss("kd+ce", temperature=temperature)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_a_clear_error(alpha):
    with pytest.raises(kdplug.KdplugError, match=r"alpha must be in \[0, 1\]"):
        kdplug.create_loss("kd+ce", alpha=alpha)


def test_unknown_loss_option_is_named():
    with pytest.raises(kdplug.KdplugError, match="'gamma'.*divergence, beta and fused_linear"):
        kdplug.create_loss("kd", gamma=1)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"])
def test_divergence_option_picks_the_ops_divergence(logits, divergence):
    from kdplug.ops import kd_loss_reference

    s, t, batch = logits
    kd = kdplug.create_loss("kd", temperature=2.0, divergence=divergence, beta=0.3)
    torch.testing.assert_close(kd(s, t, batch),
                               kd_loss_reference(s, t, 2.0, divergence=divergence, beta=0.3))
    mix = kdplug.create_loss("kd+ce", temperature=2.0, alpha=0.4, divergence=divergence, beta=0.3)
    want = (0.4 * kd_loss_reference(s, t, 2.0, divergence=divergence, beta=0.3)
            + 0.6 * F.cross_entropy(s, batch["labels"]))
    torch.testing.assert_close(mix(s, t, batch), want)
    assert f"divergence={divergence}" in repr(mix)


def test_kd_ce_on_sequences_is_one_fused_pass_with_the_same_value_and_gradient():
    """[B, L, V] logits: the soft term per counted token, the hard term per labelled token."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 5, 50, generator=g)
    t = torch.randn(3, 5, 50, generator=g)
    labels = torch.randint(0, 50, (3, 5), generator=g)
    labels[0, 4] = labels[2, 3:] = -100
    attention = torch.ones(3, 5, dtype=torch.bool)
    attention[1, 0] = False
    batch = {"inputs": torch.zeros(3, 5, dtype=torch.long), "labels": labels,
             "attention_mask": attention}
    keep = (labels != -100) & attention
    for divergence in ("kl", "jsd"):
        a = s.clone().requires_grad_()
        got = kdplug.create_loss("kd+ce", temperature=2.0, alpha=0.7,
                                 divergence=divergence)(a, t, batch)
        got.backward()
        b = s.clone().requires_grad_()
        from kdplug.ops import kd_loss_reference

        want = (0.7 * kd_loss_reference(b[keep], t[keep], 2.0, divergence=divergence)
                + 0.3 * F.cross_entropy(b[keep], labels[keep]))
        want.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(a.grad, b.grad)


def test_kd_ce_against_a_top_k_teacher_fuses_too():
    from kdplug.ops import kd_loss_topk_reference

    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 6, 40, generator=g)
    logprobs, indices = F.log_softmax(torch.randn(2, 6, 40, generator=g), -1).topk(5, dim=-1)
    labels = torch.randint(0, 40, (2, 6), generator=g)
    labels[1, 5] = -100
    teacher = ModelOutput(logits=logprobs.new_empty(2, 6, 0), extras={"topk": (indices, logprobs)})
    batch = {"inputs": torch.zeros(2, 6, dtype=torch.long), "labels": labels}
    loss = kdplug.create_loss("kd+ce", temperature=1.5, alpha=0.5, rest="bucket",
                              divergence="reverse_kl")
    keep = labels != -100
    want = (0.5 * kd_loss_topk_reference(s[keep], indices[keep], logprobs[keep], 1.5,
                                         divergence="reverse_kl", rest="bucket")
            + 0.5 * F.cross_entropy(s[keep], labels[keep]))
    torch.testing.assert_close(loss(ModelOutput(s), teacher, batch), want)


@pytest.mark.parametrize("options, message", [
    (dict(divergence="js"), r"divergence must be one of \['jsd', 'kl', 'reverse_kl', 'skew_kl', "
                            r"'skew_reverse_kl', 'tvd'\], got 'js'"),
    (dict(divergence="jsd", beta=1.0), r"beta must be in \(0, 1\) for divergence='jsd'.*got 1"),
    (dict(divergence="skew_kl", beta="x"), r"beta must be a number"),
])
def test_bad_divergence_options_are_clear_errors(options, message):
    with pytest.raises(kdplug.KdplugError, match=message):
        kdplug.create_loss("kd+ce", **options)


def test_bf16_logits_work_and_return_float32(logits):
    s, t, batch = logits
    out = kdplug.create_loss("kd+ce")(s.detach().bfloat16(), t.bfloat16(), batch)
    assert out.dtype == torch.float32 and torch.isfinite(out)
