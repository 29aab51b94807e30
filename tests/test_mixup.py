"""Probabilistic mixup: deterministic per (seed, epoch, rank, step), padding never mixed,
loss = lambda-weighted cross-entropy."""
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.batch import MixInfo, apply_mixup, draw_mixup, mixup_cross_entropy


def test_draw_is_deterministic_and_respects_padding():
    p = np.full(16, 0.9, np.float32)
    valid = np.ones(16, bool); valid[12:] = False
    a = draw_mixup(p, valid, 1.0, seed=3, epoch=2, rank=0, step=5)
    b = draw_mixup(p, valid, 1.0, seed=3, epoch=2, rank=0, step=5)
    c = draw_mixup(p, valid, 1.0, seed=3, epoch=2, rank=0, step=6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    partner, lam, mixed = a
    assert not mixed[12:].any() and (partner[12:] == np.arange(12, 16)).all()
    assert valid[partner[mixed]].all() and (partner[mixed] != np.flatnonzero(mixed)).all()
    assert (lam[~mixed] == 1).all() and ((lam[mixed] >= 0.5) & (lam[mixed] < 1)).all()


def test_probability_zero_and_one():
    valid = np.ones(64, bool)
    _, _, none = draw_mixup(np.zeros(64), valid, 1.0, 0, 0, 0, 0)
    assert not none.any()
    _, _, most = draw_mixup(np.ones(64), valid, 1.0, 0, 0, 0, 0)
    assert most.sum() >= 60  # all but the (rare) fixed points of the permutation


def test_apply_and_loss():
    x = torch.randn(4, 3, 2, 2)
    info = MixInfo(torch.tensor([1, 0, 2, 3]), torch.tensor([0.25, 0.5, 1.0, 1.0]),
                   torch.tensor([True, True, False, False]))
    y = apply_mixup(x, info)
    torch.testing.assert_close(y[0], 0.25 * x[0] + 0.75 * x[1])
    torch.testing.assert_close(y[1], 0.5 * x[1] + 0.5 * x[0])
    torch.testing.assert_close(y[2:], x[2:])
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    loss = mixup_cross_entropy(logits, labels, info)
    ce = F.cross_entropy(logits, labels, reduction="none")
    ce_b = F.cross_entropy(logits, labels[[1, 0, 2, 3]], reduction="none")
    torch.testing.assert_close(loss[0], 0.25 * ce[0] + 0.75 * ce_b[0])
    torch.testing.assert_close(loss[2:], ce[2:])


def test_loader_score_update_rule(cifar_wds, monkeypatch):
    """docs/algorithm.md: only the primary is updated, with its own CE and weight lambda."""
    import pipeline
    ds = pipeline.open_dataset(cifar_wds)
    L = pipeline.Loader(ds, batch_size=200, keep=0.5, policy="swdpp_v1", epochs=4, seed=0,
                        backend="torch", num_workers=0, device="cpu", mixup=True)
    for b in L.epoch(0):
        L.update(b.ids, torch.ones(len(b)))
    seen = []
    real_update = L.scores.update
    monkeypatch.setattr(L.scores, "update", lambda i, l, w=None: (seen.append((i, l, w)), real_update(i, l, w))[1])
    n_mixed = 0
    for b in L.epoch(1):
        logits = torch.randn(len(b), 10)
        losses = b.loss(logits)
        L.update(b.ids, losses.detach())
        ids, l, w = seen[-1]
        if b.mix is not None:
            n_mixed += int(b.mix.mixed.sum())
            torch.testing.assert_close(l, F.cross_entropy(logits, b.labels, reduction="none"))
            torch.testing.assert_close(w, b.mix.lam)
            m = b.mix.mixed
            assert not torch.allclose(losses[m], l[m])
    assert n_mixed > 0
