"""Real DDP: two processes under torch.distributed.run (gloo, CPU); see _ddp_planner_worker.py."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("_ddp_planner_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(WORKER.parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]


def test_plans_identical_and_rank_slices_disjoint_and_covering(ranks):
    a, b = ranks
    for epoch in range(3):
        np.testing.assert_array_equal(a[f"plan{epoch}"], b[f"plan{epoch}"])
        plan = a[f"plan{epoch}"]
        mine0, mine1 = a[f"mine{epoch}"], b[f"mine{epoch}"]
        np.testing.assert_array_equal(mine0, plan[0])
        np.testing.assert_array_equal(mine1, plan[1])
        r0, r1 = mine0[mine0 >= 0], mine1[mine1 >= 0]
        assert not set(r0) & set(r1)
        assert set(r0) | set(r1) == set(plan[plan >= 0].tolist())
        assert mine0.size == mine1.size
    # swdpp: K = round(0.7 * 3000) = 2100 in every epoch; the carry-over credits are equal on
    # both ranks, so are the plans (checked above for every epoch)
    assert (a["plan0"] >= 0).sum() == 2100 == (a["plan2"] >= 0).sum()
    # keep 0.5, staggered credits (the default there): the same plan on both ranks, K each
    for epoch in range(3):
        np.testing.assert_array_equal(a[f"staggered{epoch}"], b[f"staggered{epoch}"])
        assert (a[f"staggered{epoch}"] >= 0).sum() == 1500


def test_scores_identical_after_sync_and_include_both_ranks(ranks):
    a, b = ranks
    for k in ("ema", "var", "count", "last"):
        np.testing.assert_array_equal(a[k], b[k])
    # every sample of epoch 0's full plan got a loss from one of the two ranks
    assert (a["count"] >= 1).all()
    assert a["nonfinite"][0] == b["nonfinite"][0] == 3


def test_divergent_scores_raise_on_every_rank(ranks):
    for r in ranks:
        msg = str(r["error"])
        assert "differs across ranks" in msg and "[0]" in msg and "[1]" in msg
