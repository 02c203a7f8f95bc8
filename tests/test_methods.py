"""The published methods (dkd, dist, at, sp, rkd, pkt) against references written from each
paper's formulas: plain float64 loops over samples, classes and positions, no code shared with
kdplug.methods."""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import kdplug
from kdplug.outputs import ModelOutput

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- references

def softmax(row, T):
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    z = sum(e)
    return [v / z for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ref_ce(s, labels):
    total = 0.0
    for row, y in zip(s.tolist(), labels.tolist()):
        total -= math.log(softmax(row, 1.0)[y])
    return total / len(labels)


def ref_dkd_rows(s, t, labels, T):
    """Zhao et al. 2022, Eqs. 2-4: b = [p_t, p_\\t]; p̂_i = p_i / p_\\t for the non-target i."""
    rows = []
    for zs, zt, g in zip(s.tolist(), t.tolist(), labels.tolist()):
        ps, pt = softmax(zs, T), softmax(zt, T)
        bs, bt = [ps[g], 1 - ps[g]], [pt[g], 1 - pt[g]]
        hat_s = [p / (1 - ps[g]) for i, p in enumerate(ps) if i != g]
        hat_t = [p / (1 - pt[g]) for i, p in enumerate(pt) if i != g]
        rows.append((T * T * kl(bt, bs), T * T * kl(hat_t, hat_s), T * T * kl(pt, ps), pt[g]))
    return rows


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def ref_dist(s, t, T, beta, gamma):
    """Huang et al. 2022, Eqs. 6-9: 1 − Pearson per sample (inter) and per class (intra)."""
    ys = [softmax(r, T) for r in s.tolist()]
    yt = [softmax(r, T) for r in t.tolist()]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt)) / len(ys)
    cols_s, cols_t = list(zip(*ys)), list(zip(*yt))
    intra = 1 - sum(pearson(a, b) for a, b in zip(cols_s, cols_t)) / len(cols_s)
    return T * T * (beta * inter + gamma * intra)


def ref_at(fs, ft, p):
    """Zagoruyko & Komodakis 2017: Q = Σ_c |A_c|^p, vectorized, over its L2 norm; the squared
    difference averaged over samples and positions (the authors' at_loss)."""
    total, count = 0.0, 0
    for a_s, a_t in zip(fs.tolist(), ft.tolist()):
        def q(a):
            hw = [(i, j) for i in range(len(a[0])) for j in range(len(a[0][0]))]
            v = [sum(abs(c[i][j]) ** p for c in a) for i, j in hw]
            n = math.sqrt(sum(x * x for x in v))
            return [x / n for x in v]

        for x, y in zip(q(a_s), q(a_t)):
            total += (x - y) ** 2
            count += 1
    return total / count


def ref_sp(fs, ft):
    """Tung & Mori 2019, Eqs. 1-4: G = QQᵀ, row-normalized; ‖G_T − G_S‖_F² / b²."""
    def gram(f):
        q = [x.flatten().tolist() for x in f]
        g = [[sum(a * b for a, b in zip(qi, qj)) for qj in q] for qi in q]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = gram(fs), gram(ft)
    b = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


def huber(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def ref_rkd(es, et, wd, wa):
    """Park et al. 2019, Eqs. 4-7: distances over their mean (distinct pairs), cosines of the
    angle at the middle vertex of each triplet (0 where two points coincide), Huber, averaged."""
    b = len(es)

    def dist_matrix(e):
        d = [[math.dist(e[i], e[j]) for j in range(b)] for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[v / mu for v in row] for row in d]

    def angle(e, i, j, k):
        u = [x - y for x, y in zip(e[i], e[j])]
        v = [x - y for x, y in zip(e[k], e[j])]
        nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
        if nu == 0 or nv == 0:
            return 0.0
        return sum(x * y for x, y in zip(u, v)) / (nu * nv)

    es, et = es.tolist(), et.tolist()
    ds, dt = dist_matrix(es), dist_matrix(et)
    loss_d = sum(huber(ds[i][j], dt[i][j]) for i in range(b) for j in range(b)) / (b * b)
    triplets = list(itertools.product(range(b), repeat=3))
    loss_a = sum(huber(angle(es, i, j, k), angle(et, i, j, k)) for i, j, k in triplets) / b ** 3
    return wd * loss_d + wa * loss_a


def ref_pkt(es, et, eps=1e-7):
    """Passalis & Tefas 2018, Eqs. 7-10 with the cosine kernel K = (cos + 1)/2; as the authors'
    code: the sums include j = i and the KL is averaged over the b² entries."""
    def cond(e):
        b = len(e)
        cos = [[sum(x * y for x, y in zip(e[i], e[j])) /
                (math.sqrt(sum(x * x for x in e[i])) * math.sqrt(sum(y * y for y in e[j])))
                for j in range(b)] for i in range(b)]
        k = [[(c + 1) / 2 for c in row] for row in cos]
        return [[v / sum(row) for v in row] for row in k]

    p, q = cond(et.tolist()), cond(es.tolist())
    b = len(p)
    return sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps))
               for i in range(b) for j in range(b)) / (b * b)


# ----------------------------------------------------------------------------- helpers

def outs(s_logits, t_logits, s_feats=None, t_feats=None):
    return (ModelOutput(logits=s_logits, hidden_states=s_feats),
            ModelOutput(logits=t_logits, hidden_states=t_feats))


def logits_pair(n=6, c=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g, dtype=dtype) * 3).requires_grad_()
    t = torch.randn(n, c, generator=g, dtype=dtype) * 3
    labels = torch.randint(0, c, (n,), generator=g)
    return s, t, labels


# ----------------------------------------------------------------------------- DKD

@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_matches_the_paper_and_decomposes_classical_kd(T):
    from kdplug.methods.logit_terms import dkd_terms

    s, t, labels = logits_pair(n=5, c=11)
    tckd, nckd = dkd_terms(s, t, labels, T)
    ref = ref_dkd_rows(s, t, labels, T)
    torch.testing.assert_close(tckd, torch.tensor([r[0] for r in ref], dtype=torch.float64))
    torch.testing.assert_close(nckd, torch.tensor([r[1] for r in ref], dtype=torch.float64))
    # Eq. 1 of the paper: KD = TCKD + (1 − p_t^T) · NCKD, per sample
    kd = torch.tensor([r[2] for r in ref], dtype=torch.float64)
    p_target = torch.tensor([r[3] for r in ref], dtype=torch.float64)
    torch.testing.assert_close(tckd + (1 - p_target) * nckd, kd)


def test_dkd_loss_with_its_defaults_is_ce_plus_the_weighted_terms_and_warms_up():
    s, t, labels = logits_pair(n=6, c=9, seed=1)
    loss = kdplug.create_loss("dkd")  # base ce, α=1, β=8, T=4, warm-up 20 epochs
    ref = ref_dkd_rows(s, t, labels, 4.0)
    dkd = sum(1.0 * r[0] + 8.0 * r[1] for r in ref) / len(ref)
    ce = ref_ce(s, labels)
    for epoch, factor in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (100, 1.0)):
        loss.set_epoch(epoch)
        value = loss(*outs(s, t), {"labels": labels})
        torch.testing.assert_close(value, torch.tensor(ce + factor * dkd, dtype=torch.float64))
    assert set(loss.last_terms) == {"ce", "dkd"}
    custom = kdplug.create_loss("dkd", base="none", tckd_weight=0.5, nckd_weight=2.0,
                                warmup_epochs=0, temperature=2.0)
    ref2 = ref_dkd_rows(s, t, labels, 2.0)
    torch.testing.assert_close(custom(*outs(s, t), {"labels": labels}),
                               torch.tensor(sum(0.5 * r[0] + 2 * r[1] for r in ref2) / 6,
                                            dtype=torch.float64))


def test_dkd_gradcheck_and_incoming_gradient():
    from kdplug.methods.logit_terms import DKDTerm

    s, t, labels = logits_pair(n=4, c=5, seed=2)
    term = DKDTerm(temperature=3.0, warmup_epochs=0)
    assert torch.autograd.gradcheck(
        lambda x: term(*outs(x, t), {"labels": labels}), (s,))
    value = term(*outs(s, t), {"labels": labels})
    (grad,) = torch.autograd.grad(value * 2.5, s)
    (unit,) = torch.autograd.grad(term(*outs(s, t), {"labels": labels}), s)
    torch.testing.assert_close(grad, 2.5 * unit)


def test_dkd_without_set_epoch_warns_once_and_runs_at_full_weight():
    s, t, labels = logits_pair()
    loss = kdplug.create_loss("dkd", base="none")
    with pytest.warns(UserWarning, match="set_epoch"):
        first = loss(*outs(s, t), {"labels": labels})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = loss(*outs(s, t), {"labels": labels})
    torch.testing.assert_close(first, second)
    loss.set_epoch(100)
    torch.testing.assert_close(loss(*outs(s, t), {"labels": labels}), first)


def test_dkd_on_token_logits_counts_only_labelled_tokens_in_float32():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 4, 6, generator=g)
    t = torch.randn(2, 4, 6, generator=g)
    labels = torch.randint(0, 6, (2, 4), generator=g)
    labels[0, 1] = labels[1, 3] = -100
    loss = kdplug.create_loss("dkd", base="none", warmup_epochs=0)
    keep = labels != -100
    ref = ref_dkd_rows(s[keep].double(), t[keep].double(), labels[keep], 4.0)
    value = loss(*outs(s, t), {"labels": labels})
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, torch.tensor(sum(r[0] + 8 * r[1] for r in ref) / len(ref),
                                                   dtype=torch.float32))


def test_dkd_bad_options_are_named():
    with pytest.raises(kdplug.KdplugError, match="nckd_weight"):
        kdplug.create_loss("dkd", nckd_weight=-1)
    with pytest.raises(kdplug.KdplugError, match="warmup_epochs"):
        kdplug.create_loss("dkd", warmup_epochs=1.5)
    with pytest.raises(kdplug.KdplugError, match="loss 'dkd'.*nckd_weigth.*own options"):
        kdplug.create_loss("dkd", nckd_weigth=2)
    with pytest.raises(kdplug.KdplugError, match="temperature"):
        kdplug.create_loss("dkd", temperature=0)
    with pytest.raises(kdplug.KdplugError, match="set_epoch takes the 0-based epoch"):
        kdplug.create_loss("dkd").set_epoch(-1)


# ----------------------------------------------------------------------------- DIST

@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dist_matches_the_paper(T):
    s, t, labels = logits_pair(n=7, c=5, seed=4)
    loss = kdplug.create_loss("dist", base="none", temperature=T, inter_weight=1.5,
                              intra_weight=0.5)
    value = loss(*outs(s, t), {"labels": labels})
    torch.testing.assert_close(value, torch.tensor(ref_dist(s, t, T, 1.5, 0.5),
                                                   dtype=torch.float64))
    with_ce = kdplug.create_loss("dist", temperature=T)(*outs(s, t), {"labels": labels})
    torch.testing.assert_close(with_ce, torch.tensor(ref_dist(s, t, T, 1, 1) + ref_ce(s, labels),
                                                     dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda x: loss(*outs(x, t), {"labels": labels}), (s,))


# ----------------------------------------------------------------------------- AT, SP

def feature_maps(seed=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(3, 4, 6, 6, generator=g, dtype=dtype), torch.randn(3, 5, 3, 3, generator=g,
                                                                        dtype=dtype)]
    t = [torch.randn(3, 8, 6, 6, generator=g, dtype=dtype), torch.randn(3, 2, 3, 3, generator=g,
                                                                        dtype=dtype)]
    return [f.requires_grad_() for f in s], t


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_at_matches_the_paper_on_every_stage(p):
    s, t = feature_maps()
    loss = kdplug.create_loss("at", base="none", p=p)
    value = loss(*outs(torch.zeros(3, 4), torch.zeros(3, 4), s, t), {})
    expected = 1000 * sum(ref_at(a, b, p) for a, b in zip(s, t))
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, b: loss(*outs(torch.zeros(3, 4), torch.zeros(3, 4), [a, b], t), {}),
        tuple(s))


def test_at_pools_the_larger_map_and_adds_ce_by_default():
    g = torch.Generator().manual_seed(6)
    s_feat = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t_feat = torch.randn(2, 6, 4, 4, generator=g, dtype=torch.float64)
    s_logits, t_logits, labels = logits_pair(n=2, c=3)
    loss = kdplug.create_loss("at", weight=10.0, layer_map="last")
    value = loss(*outs(s_logits, t_logits, [s_feat], [t_feat]), {"labels": labels})
    pooled = torch.nn.functional.avg_pool2d(s_feat, 2)
    expected = ref_ce(s_logits, labels) + 10 * ref_at(pooled, t_feat, 2.0)
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float64))


def test_sp_matches_the_paper():
    s, t = feature_maps(seed=7)
    loss = kdplug.create_loss("sp", base="none", layer_map="uniform")
    value = loss(*outs(torch.zeros(3, 4), torch.zeros(3, 4), s, t), {})
    expected = 3000 * sum(ref_sp(a, b) for a, b in zip(s, t))
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float64))
    last = kdplug.create_loss("sp", base="none")  # default: the last feature only
    torch.testing.assert_close(last(*outs(torch.zeros(3, 4), torch.zeros(3, 4), s, t), {}),
                               torch.tensor(3000 * ref_sp(s[1], t[1]), dtype=torch.float64))


# ----------------------------------------------------------------------------- RKD, PKT

def embeddings(b=5, ds=4, dt=6, seed=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, ds, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(b, dt, generator=g, dtype=torch.float64))


def test_rkd_matches_the_paper():
    es, et = embeddings()
    loss = kdplug.create_loss("rkd", base="none")
    value = loss(*outs(torch.zeros(5, 3), torch.zeros(5, 3), [es], [et]), {})
    torch.testing.assert_close(value, torch.tensor(ref_rkd(es, et, 25, 50), dtype=torch.float64))
    only_angle = kdplug.create_loss("rkd", base="none", distance_weight=0, weight=2.0)
    torch.testing.assert_close(
        only_angle(*outs(torch.zeros(5, 3), torch.zeros(5, 3), [es], [et]), {}),
        torch.tensor(2 * ref_rkd(es, et, 0, 50), dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda x: loss(*outs(torch.zeros(5, 3), torch.zeros(5, 3), [x], [et]), {}), (es,))


def test_rkd_and_pkt_pool_feature_maps_to_embeddings():
    g = torch.Generator().manual_seed(9)
    fs = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    ft = torch.randn(4, 5, 2, 2, generator=g, dtype=torch.float64)
    zeros = torch.zeros(4, 3)
    rkd = kdplug.create_loss("rkd", base="none")(*outs(zeros, zeros, [fs], [ft]), {})
    torch.testing.assert_close(rkd, torch.tensor(ref_rkd(fs.mean((2, 3)), ft.mean((2, 3)), 25, 50),
                                                 dtype=torch.float64))
    pkt = kdplug.create_loss("pkt", base="none", pool="flatten")(*outs(zeros, zeros, [fs], [ft]),
                                                                  {})
    torch.testing.assert_close(pkt, torch.tensor(30000 * ref_pkt(fs.flatten(1), ft.flatten(1)),
                                                 dtype=torch.float64))
    with pytest.raises(kdplug.KdplugError, match="pool must be one of avg, flatten"):
        kdplug.create_loss("pkt", pool="max")


def test_pkt_matches_the_paper():
    es, et = embeddings(b=6, seed=10)
    loss = kdplug.create_loss("pkt", base="none")
    value = loss(*outs(torch.zeros(6, 3), torch.zeros(6, 3), [es], [et]), {})
    torch.testing.assert_close(value, torch.tensor(30000 * ref_pkt(es, et), dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda x: loss(*outs(torch.zeros(6, 3), torch.zeros(6, 3), [x], [et]), {}), (es,))


# ----------------------------------------------------------------------------- all methods

@pytest.mark.parametrize("name", ["dkd", "dist", "at", "sp", "rkd", "pkt"])
def test_every_method_trains_a_zoo_student_in_float32(name):
    """One optimizer step on a real pair of the CIFAR zoo: finite loss, gradients reach the
    student, none reach the teacher, and the base term is there."""
    torch.manual_seed(0)
    student = kdplug.create_student("resnet20", num_classes=10)
    teacher = kdplug.create_teacher("resnet56", num_classes=10).eval()
    loss = kdplug.create_loss(name)
    loss.set_epoch(0)
    x = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        t_out = teacher(x, output_hidden_states=True)
    s_out = student(x, output_hidden_states=True)
    value = loss(s_out, t_out, {"inputs": x, "labels": labels})
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert set(loss.last_terms) == {"ce", name}
    info = kdplug.get_registration("loss", name).info
    assert info["kind"] in ("logit", "feature", "relation")


def test_feature_methods_say_when_the_models_give_no_features():
    s, t, labels = logits_pair()
    with pytest.raises(kdplug.KdplugError, match="returned no hidden_states"):
        kdplug.create_loss("at")(*outs(s, t), {"labels": labels})
