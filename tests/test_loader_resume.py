"""Mid-epoch resume in a new process replays the rest of the epoch exactly
(ids, weights, mixup partners and lambdas, images)."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch, pipeline
    data, mode, state, out, backend = sys.argv[1:6]
    ds = pipeline.open_dataset(data)
    L = pipeline.Loader(ds, batch_size=128, keep=0.7, policy="swdpp", epochs=4, seed=3,
                        backend=backend, device="cpu", augment="cifar", mixup=True,
                        num_workers=1)
    def losses(ids):
        return ((ids.float() * 0.618).remainder(1.0) * 3).clamp_min(0.01)
    rec = []
    def record(b):
        mix = b.mix
        rec.append(np.concatenate([b.ids.numpy(), b.weights.numpy(),
            (mix.lam.numpy() if mix is not None else np.ones(len(b), np.float32)),
            (mix.partner.numpy() if mix is not None else np.arange(len(b))),
            b.images.double().sum((1, 2, 3)).numpy()]))
    if mode == "first":
        for b in L.epoch(0):
            L.update(b.ids, losses(b.ids))
        for i, b in enumerate(L.epoch(1)):
            L.update(b.ids, losses(b.ids))
            if i == 2:
                torch.save(L.state_dict(), state)  # after consuming 3 batches
            if i >= 3:
                record(b)
        for b in L.epoch(2):
            L.update(b.ids, losses(b.ids)); record(b)
    else:
        L.load_state_dict(torch.load(state, weights_only=True))
        for b in L.epoch(1):
            L.update(b.ids, losses(b.ids)); record(b)
        for b in L.epoch(2):
            L.update(b.ids, losses(b.ids)); record(b)
    np.save(out, np.stack(rec))
""")


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_resume_mid_epoch_new_process(cifar_wds, tmp_path, backend, repo_root):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    state = tmp_path / "state.pt"
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    for mode, out in (("first", a), ("resume", b)):
        subprocess.run([sys.executable, str(script), str(cifar_wds), mode, str(state), str(out),
                        backend], check=True, cwd=repo_root, timeout=300)
    ra, rb = np.load(a), np.load(b)
    assert ra.shape == rb.shape and ra.shape[0] > 5
    np.testing.assert_allclose(ra, rb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("change, msg", [(dict(batch_size=128), "batch_size 64 -> 128"),
                                         (dict(keep=0.7), "keep 0.5 -> 0.7"),
                                         (dict(policy="uniform"), "policy 'swdpp' -> 'uniform'"),
                                         (dict(epochs=10), "epochs 3 -> 10")])
def test_state_of_another_plan_is_refused(cifar_test_wds, change, msg):
    """A state counts its position in batches of its own plan: loaded into a Loader with
    another batch size, keep, policy or run length it skipped (batch 128: 192 of 500 never
    delivered) or repeated samples without a word."""
    import pipeline
    import torch
    ds = pipeline.open_dataset(cifar_test_wds)
    kw = dict(batch_size=64, keep=0.5, policy="swdpp", epochs=3, seed=1, backend="torch",
              device="cpu", num_workers=0, augment=None)
    with pipeline.Loader(ds, **kw) as L:
        for b in L.epoch(0):
            L.update(b.ids, torch.rand(len(b)))
            if b.step == 2:
                sd = L.state_dict()
                break
    with pipeline.Loader(ds, **kw) as same:
        same.load_state_dict(sd)
        assert same.state_dict()["step"] == 3
    with pipeline.Loader(ds, **{**kw, **change}) as other:
        with pytest.raises(ValueError, match=f"other plans .*{msg}.*skip or repeat"):
            other.load_state_dict(sd)
