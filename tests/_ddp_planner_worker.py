"""Worker for tests/test_ddp_planner.py, run as 2 processes by torch.distributed.run (gloo).

Each rank reports different losses; after Scores.sync() all ranks must hold identical
scores, compute identical plans whose rank slices are disjoint, and a rank fed different
scores must make check_plan_digest raise on every rank. Results go to OUT/rank<r>.npz.
"""
import sys

import numpy as np
import torch.distributed as dist

from pipeline.plan.distributed import check_plan_digest, dist_env
from pipeline.plan.planner import EpochPlanner
from pipeline.plan.policies import get_policy
from pipeline.plan.scores import Scores

out_dir = sys.argv[1]
dist.init_process_group("gloo")
env = dist_env()
rank, world = env.rank, env.world_size
n = 3000
file = (np.arange(n) // 250).astype(np.uint32)
offset = (np.arange(n) % 250 * 1024).astype(np.uint64)
scores = Scores(n)
planner = EpochPlanner(get_policy("swdpp", keep=0.7, epochs=6), scores, file, offset, seed=7, world_size=world)
# keep 0.5: the default staggers the credits (random phases from the first epoch's seeded
# generator); every rank must still plan the same
staggered = EpochPlanner(get_policy("swdpp", keep=0.5, epochs=6), scores, file, offset, seed=7, world_size=world)

res = {}
for epoch in range(3):
    scores.sync(epoch)
    plan = planner.plan(epoch)
    check_plan_digest(plan)                       # must pass: same scores everywhere
    plan5 = staggered.plan(epoch)
    check_plan_digest(plan5)
    res[f"staggered{epoch}"] = plan5.ids
    ids, w, _ = plan.rank(rank)
    real = ids[ids >= 0]
    rng = np.random.default_rng([rank, epoch])    # rank-specific losses, different per rank
    losses = rng.lognormal(size=real.size).astype(np.float32)
    if rank == 1 and epoch == 1:
        losses[:3] = np.nan                       # counted on every rank after the sync
    # uneven buffers: rank 0 reports in two calls, rank 1 in one
    half = real.size // 2
    if rank == 0:
        scores.update(real[:half], losses[:half])
        scores.update(real[half:], losses[half:])
    else:
        scores.update(real, losses)
    res[f"plan{epoch}"] = plan.ids
    res[f"mine{epoch}"] = ids
scores.sync(3)
res.update(ema=scores.ema.copy(), var=scores.var.copy(), count=scores.count.copy(), last=scores.last_epoch.copy(),
           nonfinite=np.array([scores.num_nonfinite]))

# divergence: rank 1 plans from different scores -> every rank must raise
if rank == 1:
    scores.ema[:50] += 5.0
err = ""
try:
    check_plan_digest(planner.plan(3))
except RuntimeError as e:
    err = str(e)
res["error"] = np.array(err)
np.savez(f"{out_dir}/rank{rank}.npz", **res)
dist.destroy_process_group()
