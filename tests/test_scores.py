"""Scores: EMA/variance maths, input validation, NaN handling, checkpoints."""
import io

import numpy as np
import pytest
import torch

from pipeline.plan.scores import Scores


def test_first_update_sets_ema_then_ema_and_variance_follow_the_formula():
    s = Scores(4, decay=0.5)
    s.update(np.array([0, 2]), np.array([2.0, 4.0]))
    assert s.count.tolist() == [0, 0, 0, 0]          # buffered, not yet applied
    assert s.sync() == 2
    assert s.ema.tolist() == [2.0, 0.0, 4.0, 0.0] and s.var.tolist() == [0, 0, 0, 0]
    assert s.count.tolist() == [1, 0, 1, 0] and s.last_epoch.tolist() == [0, -1, 0, -1]
    assert s.epoch == 1                                # advanced because something was applied
    s.update([0], [4.0])
    s.sync()
    # alpha = 0.5: ema = 2 + 0.5*2 = 3; var = (1-0.5)*(0 + 0.5*2^2) = 1
    assert s.ema[0] == pytest.approx(3.0) and s.var[0] == pytest.approx(1.0)
    assert s.count[0] == 2 and s.last_epoch[0] == 1


def test_duplicates_in_one_sync_are_averaged_and_weights_scale_the_step():
    s = Scores(3, decay=0.0)
    s.update([1, 1, 2], [1.0, 3.0, 5.0])
    s.sync()
    assert s.ema[1] == pytest.approx(2.0) and s.count[1] == 1  # one step with the mean loss
    s.update([2], [1.0], weights=[0.5])
    s.sync()
    # decay 0 -> alpha = min(w, 1) = 0.5: ema = 5 + 0.5*(1-5) = 3
    assert s.ema[2] == pytest.approx(3.0)


def test_update_order_does_not_change_the_result():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, 400)
    losses = rng.random(400).astype(np.float32)
    a, b = Scores(50), Scores(50)
    a.update(ids, losses)
    perm = rng.permutation(400)
    b.update(ids[perm][:200], losses[perm][:200])
    b.update(ids[perm][200:], losses[perm][200:])
    a.sync(), b.sync()
    np.testing.assert_allclose(a.ema, b.ema, rtol=1e-6)


def test_nonfinite_losses_are_ignored_and_counted_padding_is_skipped():
    s = Scores(5)
    s.update(np.array([0, 1, 2, -1]), np.array([np.nan, np.inf, 1.0, 7.0]))
    s.sync()
    assert s.num_nonfinite == 2
    assert s.count.tolist() == [0, 0, 1, 0, 0]
    assert np.isfinite(s.ema).all()


def test_torch_inputs_are_accepted():
    s = Scores(4)
    s.update(torch.tensor([3, 1]), torch.tensor([0.5, 1.5], requires_grad=True))
    s.update(torch.tensor([2]), torch.tensor([2.5], dtype=torch.bfloat16))   # autocast losses
    s.sync()
    assert s.ema[3] == pytest.approx(0.5) and s.ema[1] == pytest.approx(1.5) and s.ema[2] == 2.5


@pytest.mark.parametrize("ids, losses, msg", [
    ([0, 9], [1.0, 1.0], "out of range"),
    ([-2], [1.0], "out of range"),
    ([0, 1], [1.0], "does not match"),
    ([[0, 1]], [[1.0, 1.0]], "1-D"),
    ([0.5], [1.0], "integers"),
])
def test_bad_inputs_raise_clear_errors(ids, losses, msg):
    with pytest.raises(ValueError, match=msg):
        Scores(5).update(np.array(ids), np.array(losses))


def test_state_dict_roundtrip_through_torch_save_weights_only_keeps_pending():
    s = Scores(6, decay=0.3)
    s.update([0, 1], [1.0, 2.0])
    s.sync()
    s.update([1, 5], [4.0, np.nan])                    # pending at checkpoint time
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    r = Scores(6)
    r.load_state_dict(torch.load(buf, weights_only=True))
    assert r.decay == pytest.approx(0.3) and r.epoch == s.epoch and r.num_pending == 1
    for k in ("ema", "var", "count", "last_epoch"):
        np.testing.assert_array_equal(getattr(r, k), getattr(s, k))
    s.sync(), r.sync()
    for k in ("ema", "var", "count", "last_epoch"):
        np.testing.assert_array_equal(getattr(r, k), getattr(s, k))
    assert r.num_nonfinite == s.num_nonfinite == 1


def test_load_state_dict_rejects_wrong_size():
    with pytest.raises(ValueError, match="n=3"):
        Scores(4).load_state_dict(Scores(3).state_dict())


def test_relative_scores_divide_each_loss_by_the_mean_of_its_epoch():
    """`Scores.relative` (swdpp's `relative` option): every loss enters a second EMA as its
    share of the mean loss of the sync (epoch) that measured it, so an old loss from an
    epoch when every loss was higher does not outrank a recent one; it survives a
    checkpoint, and a state without it (saved before) loads the absolute scores in its place."""
    s = Scores(4, decay=0.5)
    s.update([0, 1, 2], [2.0, 4.0, 6.0])        # epoch 0: mean 4
    s.sync()
    s.update([0, 1], [1.0, 1.0])                # epoch 1: per-sample means 1 and 2 ...
    s.update([1], [3.0])                        # ... (sample 1 twice): epoch mean 1.5
    s.sync()
    ema, std = s.relative()
    r0, r1 = (0.5 + 1.0 / 1.5) / 2, (1.0 + 2.0 / 1.5) / 2    # EMA of the shares, decay 0.5
    np.testing.assert_allclose(ema, [r0, r1, 6.0 / 4.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(std, [0.5 * abs(1.0 / 1.5 - 0.5), 0.5 * abs(2.0 / 1.5 - 1.0), 0, 0], rtol=1e-6)
    assert s.ema[2] > s.ema[1] and ema[2] > ema[1]          # sample 2 was the hardest then
    assert s.ema[1] > s.ema[0] and ema[1] > ema[0]
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    t = Scores(4)
    t.load_state_dict(torch.load(buf, weights_only=True))
    np.testing.assert_array_equal(t.relative()[0], ema)
    old = {k: v for k, v in s.state_dict().items() if not k.startswith("rel_")}
    u = Scores(4)
    u.load_state_dict(old)
    np.testing.assert_array_equal(u.relative()[0], s.ema)
