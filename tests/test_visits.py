"""tools/visits.py on an ids log written as the trainer writes it (`--log-ids`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import visits


def _log(d: Path, rank: int, epochs: list[list[list[int]]]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"ids-rank{rank}.jsonl", "w") as f:
        for e, steps in enumerate(epochs):
            for s, ids in enumerate(steps, 1):
                f.write(json.dumps({"epoch": e, "step": s, "ids": ids}) + "\n")


def test_worst_gap_visits_and_ranks_together(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    # 6 samples, 5 epochs, two ranks; sample 5 is read in epoch 0 only (an open gap of 4),
    # sample 4 in epochs 0 and 4 (a gap of 3), -1 is padding
    _log(run, 0, [[[0, 1]], [[0, -1]], [[0]], [[0]], [[0, 4]]])
    _log(run, 1, [[[2, 3, 4, 5]], [[1, 2]], [[1, 3]], [[2, 3]], [[1, 2, 3]]])
    v = visits.load(run, samples=6)
    assert v.taken.shape == (5, 6)
    assert v.visits.tolist() == [5, 4, 4, 4, 2, 1]
    assert v.longest_gaps().tolist() == [0, 1, 1, 1, 3, 4]
    assert visits.main([str(run), "--samples", "6", "--plot", str(tmp_path / "v.png")]) == 0
    out = capsys.readouterr().out
    assert "worst gap 4 epochs (2 samples unread 3 or more epochs in a row)" in out
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_logs_are_named(tmp_path: Path, capsys) -> None:
    assert visits.main([str(tmp_path)]) == 1
    assert "no ids-rank*.jsonl (train with --log-ids)" in capsys.readouterr().err
    run = tmp_path / "run"
    _log(run, 0, [[[0, 7]]])
    with pytest.raises(ValueError, match="epoch 0 logs sample id 7 of a 3-sample dataset"):
        visits.load(run, samples=3)
    (run / "ids-rank0.jsonl").write_text('{"epoch": 0, "ids": [1]}\nnot json\n')
    with pytest.raises(ValueError, match=r"ids-rank0.jsonl:2: not an ids record"):
        visits.load(run, samples=3)


def test_a_run_killed_before_its_first_epoch_ended(tmp_path: Path) -> None:
    """Steps logged, metrics.jsonl still empty: the dataset size comes from config.json
    (not from the largest id seen, which undercounts the samples never read)."""
    run = tmp_path / "run"
    _log(run, 0, [[[0, 3], [5, -1]]])
    (run / "metrics.jsonl").write_text("")
    assert visits.load(run).taken.shape == (1, 6)          # largest id + 1: all it knows
    (run / "config.json").write_text(json.dumps({"dataset_size": 10}))
    v = visits.load(run)
    assert v.taken.shape == (1, 10) and v.visits.tolist() == [1, 0, 0, 1, 0, 1, 0, 0, 0, 0]
