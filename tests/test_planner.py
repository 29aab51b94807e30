"""Planner: exact K, exact inclusion probabilities, shard-aware order, rank slices, resume."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pipeline.plan.planner import EpochPlanner, make_plan, num_steps, worker_batches
from pipeline.plan.policies import PolicyOutput, budget, capped_probabilities, get_policy
from pipeline.plan.sampling import sampling_order, select
from pipeline.plan.scores import Scores


def manifest(sizes, shuffled=False, seed=0):
    """file/offset columns for shards of the given sizes (optionally ids not in byte order)."""
    file = np.repeat(np.arange(len(sizes)), sizes).astype(np.uint32)
    offset = np.concatenate([np.arange(s, dtype=np.uint64) * 1536 + 512 for s in sizes])
    if shuffled:
        perm = np.random.default_rng(seed).permutation(file.size)
        file, offset = file[perm], offset[perm]
    return file, offset


def soft_output(n, k, seed=0, p_min=0.05):
    w = np.random.default_rng(seed).lognormal(0, 1.5, n).astype(np.float32)
    p, _ = capped_probabilities(w, k, p_min)
    return PolicyOutput(p, ((k / n) / p).astype(np.float32), (1 - p).astype(np.float32))


def flat(plan):
    ids = plan.ids.reshape(-1)
    return ids[ids >= 0]


def test_exact_k_determinism_and_epochs_differ():
    file, offset = manifest([100] * 10)
    out = soft_output(1000, 700)
    a = make_plan(out, seed=3, epoch=1, file=file, offset=offset)
    b = make_plan(out, seed=3, epoch=1, file=file, offset=offset)
    c = make_plan(out, seed=3, epoch=2, file=file, offset=offset)
    d = make_plan(out, seed=4, epoch=1, file=file, offset=offset)
    for p in (a, b, c, d):
        assert p.num_selected == 700 and np.unique(flat(p)).size == 700
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.digest == b.digest
    assert set(flat(a)) != set(flat(c)) and set(flat(a)) != set(flat(d))
    assert a.digest != c.digest
    e = make_plan(PolicyOutput(out.p, out.weight * 2, out.mixup), seed=3, epoch=1, file=file, offset=offset)
    np.testing.assert_array_equal(a.ids, e.ids)
    assert e.digest != a.digest                                    # weights are hashed too


def _binomial_check(counts, p, runs, z_max, lo=0.0):
    """Every sample's count is Binomial(runs, p_i): |z| bound and the sum of z^2, for
    lo < p_i < 1 - lo (near 0 or 1 the normal approximation of a z-score is poor)."""
    assert (counts[p == 1] == runs).all() and (counts[p == 0] == 0).all()
    inner = (p > lo) & (p < 1 - lo)
    z = (counts[inner] - runs * p[inner]) / np.sqrt(runs * p[inner] * (1 - p[inner]))
    m = z.size
    assert np.abs(z).max() < z_max, np.abs(z).max()
    # E[z^2] = 1 exactly; allow 6 standard deviations of a chi-square with m dof
    assert abs((z ** 2).sum() - m) < 6 * np.sqrt(2 * m)


def test_inclusion_frequencies_match_p_small_n():
    """3000 epochs of a 60-sample plan: counts vs Binomial(3000, p_i)."""
    n, k, runs = 60, 25, 3000
    w = np.r_[np.zeros(5), np.full(5, 1e3), np.random.default_rng(1).random(50)].astype(np.float32)
    p, _ = capped_probabilities(w, k, 0.1)
    assert (p == 1).sum() == 5 and np.isclose(p.min(), 0.1)
    out = PolicyOutput(p, np.ones(n, np.float32), np.zeros(n, np.float32))
    file, offset = manifest([20, 20, 20])
    counts = np.zeros(n)
    for epoch in range(runs):
        plan = make_plan(out, seed=11, epoch=epoch, file=file, offset=offset, world_size=2)
        ids = flat(plan)
        assert ids.size == k
        counts[ids] += 1
    # Bonferroni over 55 samples at z=4.5: false-alarm probability < 4e-4 (and seeds are fixed)
    _binomial_check(counts, p, runs, 4.5)


def test_inclusion_frequencies_match_p_blocked_order():
    """Large-n path (blocked affine sampling order + tail): 150 epochs of 140k samples."""
    n = 2 * 65536 + 8000
    order = sampling_order(n, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(order), np.arange(n))   # a permutation
    k = budget(0.6, n)
    w = np.random.default_rng(2).lognormal(0, 1, n).astype(np.float32)
    p, _ = capped_probabilities(w, k, 0.1)
    counts = np.zeros(n)
    runs = 150
    for epoch in range(runs):
        ids = select(p, np.random.default_rng([5, epoch]))
        assert ids.size == k
        counts[ids] += 1
    _binomial_check(counts, p, runs, 6.0, lo=0.15)
    # pooled by probability decile the relative error is small
    bins = np.minimum((p * 10).astype(int), 9)
    for b in np.unique(bins):
        sel = bins == b
        assert counts[sel].sum() / (runs * p[sel].sum()) == pytest.approx(1, abs=0.01)


@pytest.mark.parametrize("chunk", [1, 2, 32])
def test_sampling_order_is_a_permutation_wherever_the_tail_lands(monkeypatch, chunk):
    import pipeline.plan.sampling as sampling
    monkeypatch.setattr(sampling, "_CHUNK_BLOCKS", chunk)
    for n in (4 * 65536, 4 * 65536 + 777):
        for seed in range(12):                     # the tail's position is random in 0..4
            order = sampling_order(n, np.random.default_rng(seed))
            assert order.size == n and np.unique(order).size == n and order.max() == n - 1


def test_hard_selection_takes_exactly_the_chosen_ids():
    file, offset = manifest([50] * 4)
    p = np.zeros(200)
    chosen = np.random.default_rng(0).choice(200, 80, replace=False)
    p[chosen] = 1
    out = PolicyOutput(p, np.ones(200, np.float32), np.zeros(200, np.float32), hard=True)
    plan = make_plan(out, seed=0, epoch=0, file=file, offset=offset)
    assert sorted(flat(plan)) == sorted(chosen)


@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("window", [1, 3])
def test_shard_aware_order(shuffled, window):
    sizes = [37, 80, 5, 64, 64, 64, 1, 90, 50, 45]
    file, offset = manifest(sizes, shuffled=shuffled)
    n = file.size
    plan = make_plan(soft_output(n, budget(0.7, n)), seed=1, epoch=2, file=file, offset=offset, window=window)
    ids = flat(plan)
    f = file[ids].astype(np.int64)
    # each shard's samples in byte order
    for s in np.unique(f):
        assert np.all(np.diff(offset[ids[f == s]].astype(np.int64)) > 0)
    # shards are visited window by window: rank of first appearance // window never decreases
    _, first = np.unique(f, return_index=True)
    visit = np.unique(f)[np.argsort(first)]
    rank = np.empty(len(sizes), np.int64)
    rank[visit] = np.arange(visit.size)
    group = rank[f] // window
    assert np.all(np.diff(group) >= 0)
    runs = 1 + np.count_nonzero(np.diff(f))
    if window == 1:
        assert runs == visit.size                                  # every shard contiguous
    else:
        assert runs > 3 * visit.size                               # shards interleaved inside windows
    # the shard visiting order changes between epochs
    other = make_plan(soft_output(n, budget(0.7, n)), seed=1, epoch=3, file=file, offset=offset, window=window)
    f2 = file[flat(other)]
    assert not np.array_equal(visit, f2[np.sort(np.unique(f2, return_index=True)[1])])


@pytest.mark.parametrize("pad", [True, False])
def test_rank_slices_are_equal_disjoint_and_cover_the_plan(pad):
    file, offset = manifest([100] * 10)
    out = soft_output(1000, 701)
    single = make_plan(out, seed=9, epoch=4, file=file, offset=offset)
    plan = make_plan(out, seed=9, epoch=4, file=file, offset=offset, world_size=4, pad=pad)
    assert plan.ids.shape == (4, 176 if pad else 175)
    rows = [plan.rank(r)[0] for r in range(4)]
    real = np.concatenate([r[r >= 0] for r in rows])
    assert np.unique(real).size == real.size                       # disjoint
    # slicing happens after the global plan: ranks are consecutive pieces of it
    np.testing.assert_array_equal(real, flat(single)[: real.size])
    if pad:
        assert real.size == 701 and (plan.ids == -1).sum() == 3
        assert (plan.weights[plan.ids == -1] == 0).all() and (plan.mixup[plan.ids == -1] == 0).all()
    else:
        assert real.size == 700 and plan.num_selected == 701
    np.testing.assert_allclose(plan.weights[plan.ids >= 0], out.weight[plan.ids[plan.ids >= 0]])


def test_num_steps_and_worker_batches():
    assert num_steps(701, 4, 16, drop_last=False) == 11            # ceil(176 / 16)
    assert num_steps(701, 4, 16, drop_last=True) == 11             # 176 // 16
    assert num_steps(701, 4, 16, drop_last=True, pad=False) == 10  # 175 // 16
    assert num_steps(700, 1, 100, drop_last=True) == 7
    parts = [worker_batches(11, w, 3) for w in range(3)]
    assert sorted(np.concatenate(parts)) == list(range(11)) and parts[1].tolist() == [1, 4, 7, 10]


def test_epoch_planner_steps_known_up_front_and_planning_is_pure():
    file, offset = manifest([64] * 16)
    n = file.size
    scores = Scores(n)
    pol = get_policy("swdpp_v1", keep=0.6, epochs=8)
    planner = EpochPlanner(pol, scores, file, offset, seed=5, world_size=2)
    schedule = planner.schedule(batch_size=32, drop_last=True)
    rng = np.random.default_rng(0)
    for epoch in range(8):
        scores.sync(epoch)
        plan = planner.plan(epoch)
        assert plan.per_rank // 32 == schedule[epoch]
        again = planner.plan(epoch)
        scores.update(flat(plan), rng.random(plan.num_planned))    # pending: must not change the plan
        assert planner.plan(epoch).digest == again.digest == plan.digest
    assert schedule[0] == schedule[7] == (n // 2) // 32             # warm-up and annealing: full
    assert schedule[3] == (budget((0.6 * 8 - 2) / 6, n) // 2) // 32  # pruned epochs pay for the full ones
    assert sum(schedule) * 32 * 2 <= 0.6 * n * 8


@pytest.mark.parametrize("name, past_k", [("infobatch", 1024), ("swdpp", 717)])
def test_planning_past_the_runs_epochs_warns_once(name, past_k):
    """A Loader left at its default epochs=1, or a run trained longer than it said: a policy
    that spreads its budget over the run then plans outside it (InfoBatch reads every
    sample, silently losing the savings): said once, with what the epoch reads."""
    import warnings

    file, offset = manifest([64] * 16)
    scores = Scores(file.size)
    planner = EpochPlanner(get_policy(name, keep=0.7, epochs=3), scores, file, offset, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(3):
            scores.sync(epoch)
            plan = planner.plan(epoch)
            scores.update(flat(plan), np.linspace(0.1, 2.0, plan.num_planned))
    with pytest.warns(RuntimeWarning, match=rf"epoch 3 is past the 3 epoch\(s\) the policy '{name}' was "
                                            rf"made for .* reads {past_k} of 1024 samples") as caught:
        for epoch in (3, 4):
            scores.sync(epoch)
            planner.plan(epoch)
    assert len([w for w in caught if "is past" in str(w.message)]) == 1
    for other in ("rs2", "uniform", "full"):  # the run's length does not shape their plans
        scores = Scores(file.size)
        planner = EpochPlanner(get_policy(other, keep=0.7, epochs=1), scores, file, offset, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for epoch in range(3):
                scores.sync(epoch)
                planner.plan(epoch)


def test_a_score_driven_policy_without_losses_warns_once():
    """A user who never calls update(): swdpp, InfoBatch and the bandits planned every epoch
    from empty scores, i.e. pruned blind, without a word."""
    import warnings

    file, offset = manifest([64] * 16)
    for name, fed in (("swdpp", False), ("infobatch", False), ("swdpp", True), ("uniform", False)):
        scores = Scores(file.size)
        planner = EpochPlanner(get_policy(name, keep=0.7, epochs=4), scores, file, offset, seed=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for epoch in range(4):
                scores.sync(epoch)
                plan = planner.plan(epoch)
                if fed:
                    scores.update(flat(plan), np.linspace(0.1, 2.0, plan.num_planned))
        blind = [w for w in caught if "no losses have been reported" in str(w.message)]
        assert len(blind) == (0 if fed or name == "uniform" else 1), (name, fed, blind)
        if blind:
            assert f"epoch 1: " in str(blind[0].message) and repr(name) in str(blind[0].message)


RESUME_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    from pipeline.plan.planner import EpochPlanner
    from pipeline.plan.policies import get_policy
    from pipeline.plan.scores import Scores
    d = sys.argv[1]
    state = torch.load(d + "/state.pt", weights_only=True)
    file, offset = np.load(d + "/file.npy"), np.load(d + "/offset.npy")
    scores = Scores(len(file))
    scores.load_state_dict(state["scores"])
    policy = get_policy("swdpp", keep=0.7, epochs=10)
    policy.load_state_dict(state["policy"])        # the carry-over credits of the run
    planner = EpochPlanner(policy, scores, file, offset, seed=state["seed"], world_size=2)
    plan = planner.plan(state["epoch"])            # no sync: the epoch's plan is recomputed
    ids, w, _ = plan.rank(state["rank"])
    start = state["batches_done"] * state["batch_size"]
    np.save(d + "/rest_ids.npy", ids[start:]); np.save(d + "/rest_w.npy", w[start:])
    scores.update(ids[start:][ids[start:] >= 0], np.ones((ids[start:] >= 0).sum()))
    scores.sync()
    np.save(d + "/ema_after.npy", scores.ema)
""")


def test_mid_epoch_resume_in_a_new_process_replays_the_rest(tmp_path):
    file, offset = manifest([128] * 12, shuffled=True)
    n, bs, epoch, rank = file.size, 16, 3, 1
    np.save(tmp_path / "file.npy", file)
    np.save(tmp_path / "offset.npy", offset)
    scores = Scores(n)
    planner = EpochPlanner(get_policy("swdpp", keep=0.7, epochs=10), scores, file, offset, seed=42, world_size=2)
    rng = np.random.default_rng(0)
    for e in range(epoch):                              # a few epochs of training history
        scores.sync(e)
        ids = flat(planner.plan(e))
        scores.update(ids, rng.lognormal(size=ids.size))
    scores.sync(epoch)
    plan = planner.plan(epoch)
    ids, w, _ = plan.rank(rank)
    half = (plan.per_rank // bs) // 2
    done = ids[: half * bs]
    scores.update(done, rng.lognormal(size=done.size))  # losses of the consumed half stay pending
    torch.save({"epoch": epoch, "batches_done": half, "batch_size": bs, "rank": rank, "seed": 42,
                "scores": scores.state_dict(), "policy": planner.policy.state_dict()}, tmp_path / "state.pt")
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path)], check=True, timeout=120)
    rest = np.load(tmp_path / "rest_ids.npy")
    assert rest.size == ids.size - half * bs > 0
    np.testing.assert_array_equal(rest, ids[half * bs:])
    np.testing.assert_array_equal(np.load(tmp_path / "rest_w.npy"), w[half * bs:])
    # and the pending losses of the first half survived: same scores after the epoch sync
    rest_real = ids[half * bs:][ids[half * bs:] >= 0]
    scores.update(rest_real, np.ones(rest_real.size))
    scores.sync()
    np.testing.assert_array_equal(np.load(tmp_path / "ema_after.npy"), scores.ema)
