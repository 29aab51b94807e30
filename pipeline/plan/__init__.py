"""The plan stage: learning dynamics -> which samples each rank reads, in which order.

    scores       `Scores`: per-sample EMA loss, variance, count, last epoch. Updated from the
                 training loop, applied (and gathered across ranks) only at `sync()`, so the
                 plan of an epoch is fixed once it starts.
    policies     `get_policy(name, ...)`: scores + epoch -> `PolicyOutput` (inclusion
                 probabilities summing to exactly K, loss weights, mixup probabilities);
                 K of every epoch is known up front (`num_selected`).
    sampling     systematic PPS selection: exactly K ids, each with probability p_i.
    planner      `make_plan` / `EpochPlanner`: policy output + seed + epoch -> `Plan`, a
                 deterministic, shard-aware order cut into equal per-rank rows; `eval_plan`:
                 every sample once, in byte order, through the same slicing; `reslice` /
                 `remaining_plan`: what is left of an epoch, cut for another world size.
    elastic      `combine_states`: the ranks' saved loader states -> one rank's resume
                 point on any world size (position, scores with pending losses, bad ids).
    distributed  `dist_env()` (rank, world size, local rank), the collectives `Scores.sync`
                 needs, and `check_plan_digest` (every rank must hold the same plan).

Pure numpy: nothing here imports torch at import time, and this package imports none of
its modules eagerly. Randomness comes only from `pipeline.streams.rng`.
"""
