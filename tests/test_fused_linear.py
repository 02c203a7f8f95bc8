"""fused_linear_kd against the unfused float64 reference: kd_loss on the full logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdplug import _ext
from kdplug.fused_linear import default_chunk_size
from kdplug.ops import (DIVERGENCES, fused_linear_kd, kd_loss_reference, kd_loss_topk_reference)

NATIVE = _ext.native_status().available
BACKENDS = ["torch"] + (["native"] if NATIVE else [])
ROWS, WIDTH, VOCAB = 41, 24, 1271  # 41 tokens: no chunk size below divides them


def inputs(rows=ROWS, width=WIDTH, vocab=VOCAB, teacher_vocab=None, teacher_width=32, seed=0,
           bias=True):
    g = torch.Generator().manual_seed(seed)
    teacher_vocab = teacher_vocab or vocab
    return dict(
        hidden=torch.randn(rows, width, generator=g),
        weight=torch.randn(vocab, width, generator=g) / width ** 0.5 * 3,
        bias=torch.randn(vocab, generator=g) if bias else None,
        teacher_hidden=torch.randn(rows, teacher_width, generator=g),
        teacher_weight=torch.randn(teacher_vocab, teacher_width, generator=g) / 2,
        teacher_bias=torch.randn(teacher_vocab, generator=g) if bias else None,
        labels=torch.randint(0, vocab, (rows,), generator=g),
    )


def leaves(x, dtype):
    out = [x["hidden"], x["weight"]] + ([x["bias"]] if x["bias"] is not None else [])
    return [t.detach().to(dtype).requires_grad_() for t in out]


def teacher_logits_of(x, vocab=None):
    logits = F.linear(x["teacher_hidden"].double(), x["teacher_weight"].double(),
                      None if x["teacher_bias"] is None else x["teacher_bias"].double())
    return logits[..., :vocab] if vocab else logits


def reference(x, grad_out=1.0, teacher=None, **options):
    """float64 value and gradients of the unfused composition."""
    params = leaves(x, torch.float64)
    logits = F.linear(params[0], params[1], params[2] if len(params) > 2 else None)
    teacher = teacher_logits_of(x, logits.shape[-1]) if teacher is None else teacher
    loss = kd_loss_reference(logits, teacher, **options)
    (loss * grad_out).backward()
    return loss.detach(), [p.grad for p in params]


def fused(x, backend, grad_out=1.0, dtype=torch.float32, teacher="hidden", **options):
    params = leaves(x, dtype)
    forms = dict(hidden=dict(teacher_hidden=x["teacher_hidden"].to(dtype),
                             teacher_weight=x["teacher_weight"].to(dtype),
                             teacher_bias=None if x["teacher_bias"] is None
                             else x["teacher_bias"].to(dtype)),
                 logits=dict(teacher_logits=teacher_logits_of(x).to(dtype)))
    loss = fused_linear_kd(params[0], params[1], student_bias=params[2] if len(params) > 2
                           else None, backend=backend, **forms[teacher], **options)
    (loss * grad_out).backward()
    return loss.detach(), [p.grad for p in params]


def assert_matches(got, want, rtol=2e-4, atol=2e-5):
    torch.testing.assert_close(got[0].double(), want[0], rtol=rtol, atol=atol)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_each_divergence_matches_the_unfused_float64_reference(backend, divergence):
    x = inputs(seed=len(divergence))
    options = dict(temperature=2.0, divergence=divergence, beta=0.3)
    assert_matches(fused(x, backend, chunk_size=7, **options), reference(x, **options))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 5, 40, 41, 1000, None])
def test_labels_mask_and_ignore_index_at_odd_chunk_boundaries(backend, chunk):
    x = inputs(seed=chunk or 0)
    x["labels"][::4] = -100
    mask = torch.rand(ROWS, generator=torch.Generator().manual_seed(1)) > 0.3
    options = dict(temperature=4.0, labels=x["labels"], alpha=0.7, mask=mask)
    assert_matches(fused(x, backend, grad_out=-2.5, chunk_size=chunk, **options),
                   reference(x, grad_out=-2.5, **options))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_reduction_without_biases_and_leading_dimensions(backend):
    x = inputs(bias=False)
    x["hidden"] = x["hidden"].reshape(1, ROWS, WIDTH)
    x["teacher_hidden"] = x["teacher_hidden"].reshape(1, ROWS, -1)
    x["labels"] = x["labels"].reshape(1, ROWS)
    options = dict(temperature=1.5, labels=x["labels"], alpha=0.5, reduction="sum")
    assert_matches(fused(x, backend, grad_out=0.25, chunk_size=9, **options),
                   reference(x, grad_out=0.25, **options))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_teacher_given_as_logits(backend):
    x = inputs(seed=3)
    options = dict(temperature=3.0, divergence="jsd", labels=x["labels"], alpha=0.9)
    assert_matches(fused(x, backend, teacher="logits", chunk_size=6, **options),
                   reference(x, **options))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rest", ["renormalize", "bucket"])
def test_a_top_k_teacher_matches_kd_loss_topk_on_the_full_logits(backend, rest):
    x = inputs(seed=4)
    k = 9
    logprobs, indices = teacher_logits_of(x).float().log_softmax(-1).topk(k, dim=-1)
    mask = torch.arange(ROWS) % 5 != 0
    options = dict(temperature=2.0, divergence="kl", labels=x["labels"], alpha=0.6, mask=mask,
                   rest=rest)
    params = leaves(x, torch.float32)
    loss = fused_linear_kd(params[0], params[1], student_bias=params[2],
                           teacher_topk=(indices, logprobs), chunk_size=4, backend=backend,
                           **options)
    (3.0 * loss).backward()
    ref = leaves(x, torch.float32)
    ref_loss = kd_loss_topk_reference(F.linear(*ref), indices, logprobs, **options)
    (3.0 * ref_loss).backward()
    # the top-k op runs in float32 (no float64 kernel): the oracle is its float32 reference
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for got, want in zip(params, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_a_teacher_whose_vocabulary_extends_the_students_is_cut_to_the_prefix(backend, teacher):
    x = inputs(teacher_vocab=VOCAB + 17, seed=5)
    options = dict(temperature=2.0, labels=x["labels"], alpha=0.8)
    want = reference(x, teacher=teacher_logits_of(x)[:, :VOCAB], **options)
    assert_matches(fused(x, backend, teacher=teacher, chunk_size=10, **options), want)
    # the rule is "drop and renormalize": the dropped classes' mass changes nothing
    x["teacher_weight"][VOCAB:] *= 50
    assert_matches(fused(x, backend, teacher=teacher, chunk_size=10, **options), want)


def test_a_teacher_with_fewer_classes_is_an_error_naming_both_sizes():
    x = inputs()
    with pytest.raises(ValueError, match=r"teacher has 1270 classes but the student has 1271"):
        fused_linear_kd(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"][:-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_in_float64(backend):
    x = inputs(rows=5, width=3, vocab=7, teacher_width=4, seed=6)
    labels = torch.tensor([1, -100, 6, 0, 2])
    mask = torch.tensor([True, True, False, True, True])
    teacher = [x["teacher_hidden"].double(), x["teacher_weight"].double()]

    def loss(hidden, weight, bias):
        return fused_linear_kd(hidden, weight, *teacher, student_bias=bias, labels=labels,
                               alpha=0.6, mask=mask, temperature=1.7, divergence="skew_kl",
                               chunk_size=2, backend=backend)

    assert torch.autograd.gradcheck(loss, leaves(x, torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_stay_close_to_float64(backend, dtype):
    x = inputs(seed=7)
    options = dict(temperature=2.0, labels=x["labels"], alpha=0.5)
    got = fused(x, backend, dtype=dtype, chunk_size=16, **options)
    assert got[1][1].dtype == dtype and got[0].dtype == torch.float32
    assert_matches(got, reference(x, **options), rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_autocast_bf16_it_matches_eager_autocast(backend):
    x = inputs(seed=8)
    params = leaves(x, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_kd(params[0], params[1], x["teacher_hidden"], x["teacher_weight"],
                               student_bias=params[2], teacher_bias=x["teacher_bias"],
                               temperature=2.0, chunk_size=8, backend=backend)
    loss.backward()
    ref = leaves(x, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(*ref)
        teacher = F.linear(x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"])
    ref_loss = kd_loss_reference(logits, teacher, 2.0)
    ref_loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in params)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-3)
    for got, want in zip(params, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=5e-2, atol=2e-3)


def test_the_teacher_gets_no_gradient_and_no_graph():
    x = inputs(rows=6, vocab=50)
    teacher_weight = x["teacher_weight"].clone().requires_grad_()
    hidden = x["hidden"].clone().requires_grad_()
    loss = fused_linear_kd(hidden, x["weight"], x["teacher_hidden"], teacher_weight)
    loss.backward()
    assert teacher_weight.grad is None and hidden.grad is not None
    assert x["weight"].grad is None  # not a leaf that asked for one: nothing computed


def test_no_grad_gives_the_same_loss():
    x = inputs(rows=9, vocab=100)
    with torch.no_grad():
        a = fused_linear_kd(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"])
    b = fused_linear_kd(x["hidden"].requires_grad_(), x["weight"], x["teacher_hidden"],
                        x["teacher_weight"])
    torch.testing.assert_close(a, b.detach())


def test_default_chunk_size_bounds_a_chunks_logits_to_64_mib():
    for vocab, width in [(32000, 256), (128256, 1024), (128256, 4096), (50, 8), (10**9, 8)]:
        rows = default_chunk_size(vocab, width)
        assert rows >= 1 and (rows == 1 or rows * 4 * (vocab + width) <= 64 * 2**20)
    assert default_chunk_size(128256, 4096) == 120
    assert default_chunk_size(32000, 256) == 520
    assert default_chunk_size(32000, 256, itemsize=2) == 1040  # bf16: as many bytes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher", ["hidden", "topk"])
def test_rows_the_mask_drops_are_never_multiplied_on_the_cpu(backend, teacher):
    # padding rows hold NaN: any matmul over them would spread it into the head's gradient
    x = inputs(rows=2 * 12, seed=9)
    mask = (torch.arange(24) % 12 < 9).reshape(2, 12)  # [batch, length], right-padded
    for key in ("hidden", "teacher_hidden"):
        x[key] = x[key].reshape(2, 12, -1)
        x[key][~mask] = float("nan")
    labels = x["labels"].reshape(2, 12)
    params = leaves(x, torch.float32)
    options = dict(labels=labels, alpha=0.5, mask=mask, temperature=2.0, chunk_size=5,
                   backend=backend, student_bias=params[2])
    if teacher == "hidden":
        forms = dict(teacher_hidden=x["teacher_hidden"], teacher_weight=x["teacher_weight"],
                     teacher_bias=x["teacher_bias"])
    else:
        logits = F.linear(x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"])
        logprobs, indices = logits.log_softmax(-1).topk(7, dim=-1)
        forms = dict(teacher_topk=(indices, logprobs))
    loss = fused_linear_kd(params[0], params[1], **forms, **options)
    (0.5 * loss).backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in params)
    assert (params[0].grad[~mask] == 0).all() and (params[0].grad[mask] != 0).any()
    # the same as the counted rows alone
    kept = leaves({**x, "hidden": x["hidden"][mask]}, torch.float32)
    forms = ({k: (v[mask] if k == "teacher_hidden" else v) for k, v in forms.items()}
             if teacher == "hidden" else dict(teacher_topk=(indices[mask], logprobs[mask])))
    want = fused_linear_kd(kept[0], kept[1], **forms, **{**options, "labels": labels[mask],
                                                         "mask": None, "student_bias": kept[2]})
    (0.5 * want).backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(params[0].grad[mask], kept[0].grad)
    for got, ref in zip(params[1:], kept[1:]):
        torch.testing.assert_close(got.grad, ref.grad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one form"),
    (dict(teacher_logits=torch.zeros(4, 10), teacher_topk=(torch.zeros(4, 2).long(),
                                                           torch.zeros(4, 2))), "exactly one"),
    (dict(teacher_logits=torch.zeros(5, 10)), r"teacher's rows \(5,\) differ"),
    (dict(teacher_logits=torch.zeros(4, 10), reduction="none"), "reduction"),
    (dict(teacher_logits=torch.zeros(4, 10), chunk_size=0), "chunk_size must be a positive"),
    (dict(teacher_logits=torch.zeros(4, 10), alpha=0.5), "pass labels="),
    (dict(teacher_logits=torch.zeros(4, 10), mask=torch.ones(3, dtype=torch.bool)), "mask"),
    (dict(teacher_topk=(torch.tensor([[0, 0]] * 4), torch.zeros(4, 2))), "distinct"),
    (dict(teacher_topk=(torch.tensor([[0, 10]] * 4), torch.zeros(4, 2))), r"\[0, 10\)"),
    (dict(teacher_topk=(torch.tensor([[0, 1]] * 4), torch.zeros(4, 2)),
          divergence="reverse_kl"), "rest='bucket'"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear_kd(torch.zeros(4, 3), torch.zeros(10, 3), **kwargs)


def test_a_head_of_the_wrong_width_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"student_weight must be \[vocabulary, 3\]"):
        fused_linear_kd(torch.zeros(4, 3), torch.zeros(10, 4), teacher_logits=torch.zeros(4, 10))


def test_torch_compile_traces_it_whole_and_gives_the_same_values():
    # dynamo inlines the autograd.Function: one graph, the chunk loop unrolled (compile time
    # grows with the number of chunks), the per-chunk op through its fake kernel
    x = inputs(rows=13, vocab=60)
    params = leaves(x, torch.float32)

    def loss(hidden, weight, bias):
        return fused_linear_kd(hidden, weight, x["teacher_hidden"], x["teacher_weight"],
                               student_bias=bias, teacher_bias=x["teacher_bias"],
                               temperature=2.0, chunk_size=5)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(*params)
    got.backward()
    want = fused(x, "torch", chunk_size=5, temperature=2.0)
    torch.testing.assert_close(got, want[0].float())
    for p, g in zip(params, want[1]):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_the_engines_unit_gradient_mark_reaches_it(monkeypatch):
    from kdplug import _op_support as support

    seen, original = [], support.scaled_grad
    monkeypatch.setattr(support, "scaled_grad", lambda saved, grad, per_row: seen.append(
        getattr(grad, support.UNIT_GRADIENT, False)) or original(saved, grad, per_row))
    x = inputs(rows=6, vocab=40, bias=False)
    hidden = x["hidden"].requires_grad_()
    support.backward_with_unit_gradient(
        fused_linear_kd(hidden, x["weight"], x["teacher_hidden"], x["teacher_weight"]))
    assert seen == [True]  # known to be 1 without reading it (no device sync on a GPU)
