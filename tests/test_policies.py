"""Policies behave as specified in docs/algorithm.md."""
import numpy as np
import pytest

from pipeline.plan.policies import POLICIES, budget, capped_probabilities, get_policy
from pipeline.plan.scores import Scores

N = 2000


def trained_scores(n=N, seed=0, seen=None):
    """Scores with a right-skewed loss distribution (like cross-entropy)."""
    rng = np.random.default_rng(seed)
    s = Scores(n)
    ids = np.arange(n) if seen is None else seen
    s.update(ids, rng.lognormal(-1.0, 1.0, ids.size))
    s.sync()
    s.update(ids, rng.lognormal(-1.0, 1.0, ids.size))
    s.sync()
    return s


def rng():
    return np.random.default_rng(123)


def test_registry_names():
    assert set(POLICIES) == {"full", "uniform", "rs2", "infobatch", "ucb", "eps_greedy", "swdpp", "swdpp_v1"}


@pytest.mark.parametrize("name, kw, msg", [
    ("nope", {}, "choose one of"),
    ("swdpp", {"keep": 0.0}, r"keep must be in \(0, 1\]"),
    ("swdpp", {"keep": 1.5}, r"keep must be in \(0, 1\]"),
    ("swdpp", {"temperature": -1.0}, "temperature must be > 0"),
    ("swdpp_v1", {"keep": 0.3, "p_min": 0.5}, "p_min must be in"),
    ("swdpp", {"bogus": 1}, "allowed"),
    ("swdpp", {"floor": 0.0}, r"floor .* must be in \(0, 1\]"),
    ("swdpp", {"schedule": "cosine"}, "schedule must be one of"),
    ("swdpp", {"weights": "unbiased"}, "weights must be one of"),
    ("swdpp", {"guard": "yes"}, "guard must be true or false"),
    ("infobatch", {"budget": "total"}, "budget must be"),
    ("infobatch", {"r": 1.0}, r"r .* must be in \(0, 1\)"),
    ("eps_greedy", {"eps": 2.0}, "eps"),
    ("ucb", {"c": -1.0}, "c"),
])
def test_invalid_settings_say_what_is_allowed(name, kw, msg):
    kw = {"keep": 0.7, "epochs": 10, **kw}
    with pytest.raises(ValueError, match=msg):
        get_policy(name, **kw)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_gives_k_and_announces_it(name):
    pol = get_policy(name, keep=0.7, epochs=10)
    s = trained_scores()
    for epoch in range(4):      # in order: rs2 and swdpp carry credits from epoch to epoch
        out = pol(s, epoch, rng())
        if epoch in (1, 2):
            continue
        k = pol.num_selected(N, epoch)
        assert out.p.dtype == np.float64 and out.weight.dtype == np.float32 and out.mixup.dtype == np.float32
        assert out.p.shape == out.weight.shape == out.mixup.shape == (N,)
        assert out.p.min() >= 0 and out.p.max() <= 1 + 1e-12
        assert out.p.sum() == pytest.approx(k, abs=1e-6)
        if out.hard:
            assert set(np.unique(out.p)) <= {0.0, 1.0}
    # swdpp_v1 spreads its budget over the run: its pruned epochs pay for its full warm-up epoch
    k3 = N if name == "full" else budget((0.7 * 10 - 2) / 8 if name == "swdpp_v1" else 0.7, N)
    assert pol.num_selected(N, 3) == k3


def test_swdpp_v1_run_budget_pays_for_the_full_epochs():
    for epochs, warmup in ((4, 1), (10, 1), (16, 2), (30, 1)):
        pol = get_policy("swdpp_v1", keep=0.7, epochs=epochs, warmup=warmup)
        total = sum(pol.num_selected(N, e) for e in range(epochs))
        assert total == pytest.approx(0.7 * N * epochs, abs=epochs)   # rounding: < 1 sample per epoch
        assert pol.num_selected(N, 0) == N
    per_epoch = get_policy("swdpp_v1", keep=0.7, epochs=10, budget="epoch")
    assert [per_epoch.num_selected(N, e) for e in range(10)] == [N] + [budget(0.7, N)] * 8 + [N]
    # without a known run length the full epochs cannot be paid for: they come on top
    assert get_policy("swdpp_v1", keep=0.7).num_selected(N, 3) == budget(0.7, N)
    with pytest.raises(ValueError, match="leaves nothing for the pruned epochs"):
        get_policy("swdpp_v1", keep=0.3, epochs=3)                      # 0.9 epochs < 1 warm-up epoch
    with pytest.raises(ValueError, match="budget"):
        get_policy("swdpp_v1", keep=0.7, epochs=3, budget="total")


def test_budget_rounds_half_up():
    assert budget(0.7, 10) == 7 and budget(0.25, 10) == 3 and budget(0.001, 10) == 1


def test_uniform_is_flat_with_unit_weights():
    out = get_policy("uniform", keep=0.7)(trained_scores(), 2, rng())
    assert np.allclose(out.p, 0.7) and (out.weight == 1).all() and (out.mixup == 0).all()


def test_capped_probabilities_floor_cap_and_exact_sum():
    w = np.random.default_rng(1).lognormal(0, 2, 10_000).astype(np.float32)
    p, c = capped_probabilities(w, 4000, 0.05)
    assert p.sum() == pytest.approx(4000, abs=1e-6)
    assert p.min() >= 0.05 - 1e-12 and p.max() <= 1.0
    assert (p == 1.0).sum() > 0                        # heavy tail got capped
    free = p < 1.0
    # uncapped samples stay proportional to w above the floor
    np.testing.assert_allclose((p[free] - 0.05) / 0.95, c * w[free].astype(np.float64), rtol=1e-5)


def test_swdpp_v1_probabilities_weights_and_mixup():
    pol = get_policy("swdpp_v1", keep=0.7, epochs=20, p_min=0.1, budget="epoch")
    s = trained_scores()
    out = pol(s, 5, rng())
    k = budget(0.7, N)
    score = s.ema + 0.5 * np.sqrt(s.var)
    assert out.p.sum() == pytest.approx(k, abs=1e-6)
    assert out.p.min() >= 0.1 - 1e-12
    # higher score -> higher probability (monotone)
    o = np.argsort(score, kind="stable")
    assert np.all(np.diff(out.p[o]) >= -1e-12)
    np.testing.assert_allclose(out.weight, (k / N) / out.p, rtol=1e-6)   # unbiased weights
    # mixup grows as p falls, zero at p = 1, largest at the floor
    assert np.all(np.diff(out.mixup[o]) <= 1e-7)
    assert out.mixup[out.p == 1.0].max(initial=0) == 0
    np.testing.assert_allclose(out.mixup, 0.3 * (1 - out.p) / 0.9, rtol=1e-5, atol=1e-7)
    assert out.mixup.max() <= 0.3                                       # (1 - keep) at p_min
    # heavier pruning -> more mixup for the same sample
    heavier = get_policy("swdpp_v1", keep=0.4, epochs=20, p_min=0.1, budget="epoch")(s, 5, rng())
    assert heavier.mixup.mean() > out.mixup.mean()


def test_swdpp_v1_weight_clipping_and_temperature():
    s = trained_scores()
    out = get_policy("swdpp_v1", keep=0.7, epochs=20, max_weight=2.0)(s, 5, rng())
    assert out.weight.max() == pytest.approx(2.0)
    hot = get_policy("swdpp_v1", keep=0.7, epochs=20, temperature=100.0)(s, 5, rng())
    cold = get_policy("swdpp_v1", keep=0.7, epochs=20, temperature=0.3)(s, 5, rng())
    assert hot.p.std() < cold.p.std()                  # high temperature -> nearly uniform


def test_swdpp_v1_warmup_and_annealing_are_full_epochs():
    pol = get_policy("swdpp_v1", keep=0.7, epochs=16, warmup=2)   # anneal = round(0.125*16) = 2
    s = trained_scores()
    full = [e for e in range(16) if pol.num_selected(N, e) == N]
    assert full == [0, 1, 14, 15]
    out = pol(s, 15, rng())
    assert out.hard and (out.p == 1).all() and (out.weight == 1).all() and (out.mixup == 0).all()


def test_swdpp_v1_unseen_samples_are_optimistic():
    s = trained_scores(seen=np.arange(N // 2))
    out = get_policy("swdpp_v1", keep=0.5, epochs=10)(s, 3, rng())
    assert out.p[N // 2:].min() >= out.p[: N // 2].max() - 1e-12


def test_infobatch_prunes_only_below_mean_and_rescales():
    pol = get_policy("infobatch", keep=0.7, epochs=8)            # r=0.5, delta=0.875
    s = trained_scores()
    mean = s.ema.mean()
    below = s.ema < mean
    assert below.mean() >= 0.6                                   # lognormal: feasible at r=0.5
    out = pol(s, 3, rng())
    assert out.info["above_mean_candidates"] == 0
    assert (out.p[~below] == 1).all() and (out.weight[~below] == 1).all()
    r_e = (N - budget(0.7, N)) / below.sum()
    assert r_e <= 0.5 and out.info["r_effective"] == pytest.approx(r_e)
    np.testing.assert_allclose(out.p[below], 1 - r_e)
    np.testing.assert_allclose(out.weight[below], 1 / (1 - r_e), rtol=1e-6)
    # epoch 0 (no losses) and the last (1 - delta) of the epochs are full
    assert [e for e in range(8) if pol.num_selected(N, e) == N] == [0, 7]


def test_infobatch_caps_the_prune_rate_when_few_samples_are_below_mean():
    s = Scores(100)
    s.update(np.arange(100), np.r_[np.zeros(20), np.ones(80)])   # 20% below mean
    s.sync()
    out = get_policy("infobatch", keep=0.7, r=0.5)(s, 1, rng())
    assert out.p.sum() == pytest.approx(70)
    assert out.info["r_effective"] <= 0.5
    assert out.info["above_mean_candidates"] == 40                # 60 candidates needed
    assert (out.p[:20] < 1).all()                                 # all below-mean are candidates


def test_ucb_and_eps_greedy_pick_high_scores_and_explore_unseen():
    s = trained_scores(seen=np.arange(N - 100))
    k = budget(0.5, N)
    ucb = get_policy("ucb", keep=0.5)(s, 1, rng())
    assert ucb.hard and (ucb.p[N - 100:] == 1).all()             # unseen first
    bound = s.ema + np.sqrt(s.var)
    sel = ucb.p[: N - 100] == 1
    assert bound[: N - 100][sel].min() >= bound[: N - 100][~sel].max()
    eg = get_policy("eps_greedy", keep=0.5, eps=0.2)(s, 1, rng())
    assert eg.p.sum() == k and (eg.p[N - 100:] == 1).all()
    greedy = int(np.floor(0.8 * k + 0.5))
    top = np.argsort(-np.where(s.seen, s.ema, np.inf), kind="stable")[:greedy]
    assert (eg.p[top] == 1).all()
    # the explored part is random: two generators give different sets
    eg2 = get_policy("eps_greedy", keep=0.5, eps=0.2)(s, 1, np.random.default_rng(7))
    assert (eg.p != eg2.p).any()
