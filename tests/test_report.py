"""tools/report.py on synthetic run directories (no training needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tools import report
from trainers.metrics import MetricsWriter, loss_histogram, read_jsonl


def _fake_run(d: Path, policy: str, keep: float, seed: int, acc: float, epochs: int = 3, n: int = 1000,
              data: str = "/x/toy", config: dict | None = None) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"policy": policy, "keep": keep, "seed": seed, "epochs": epochs,
                                               "data_name": Path(data).name, "data": data, **(config or {})}))
    w = MetricsWriter(d / "metrics.jsonl")
    k = n if policy == "full" else int(keep * n)
    wall = 0.0
    for e in range(epochs):
        wall += k / 100
        w.write({"epoch": e, "kept": k, "steps": k // 100, "samples_read": k, "bytes_read": k * 1000,
                 "requests": k, "full_samples": n, "full_bytes": n * 1000, "data_wait_s": 0.1,
                 "compute_s": k / 100, "wall_s": wall, "train_loss": 1.0 / (e + 1),
                 "test_acc": acc - 0.01 * (epochs - 1 - e), "loss_hist": loss_histogram(np.random.rand(k))})
    (d / "summary.json").write_text("{}")
    return d


def test_report_table_and_plots(tmp_path: Path) -> None:
    for s in range(3):
        _fake_run(tmp_path / f"full-s{s}", "full", 1.0, s, 0.90 + 0.001 * s)
        _fake_run(tmp_path / f"swdpp-s{s}", "swdpp", 0.7, s, 0.895)
    res = report.write_report([str(tmp_path)], quiet=True)
    rows = {r["policy"]: r for r in res["rows"]}
    assert rows["full"]["seeds"] == 3 and rows["swdpp"]["seeds"] == 3
    assert rows["swdpp"]["time_ratio"] == pytest.approx(0.7)
    assert rows["swdpp"]["bytes_ratio"] == pytest.approx(0.7)
    assert rows["full"]["acc_mean"] == pytest.approx(0.901)
    assert rows["swdpp"]["acc_delta"] == pytest.approx(-0.6, abs=1e-6)
    out = res["out"]
    assert (out / "report.md").exists() and (out / "runs.csv").exists()
    names = sorted(p.name for p in res["files"])
    assert names == ["toy-accuracy_vs_samples.png", "toy-accuracy_vs_time.png", "toy-bytes_per_epoch.png",
                     "toy-kept_fraction.png", "toy-score_distribution.png"]
    for p in res["files"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "swdpp" in res["table"] and "0.70x" in res["table"]


def test_paired_differences_pair_by_seed(tmp_path: Path) -> None:
    """Per-seed differences: full is ahead of swdpp by 0.1 + 0.1 s points at seed s."""
    for s in range(3):
        _fake_run(tmp_path / f"full-s{s}", "full", 1.0, s, 0.90 + 0.001 * s)
        _fake_run(tmp_path / f"swdpp-s{s}", "swdpp", 0.7, s, 0.899)
    _fake_run(tmp_path / "lonely-s9", "uniform", 0.7, 9, 0.5)      # no common seed: no pair
    res = report.write_report([str(tmp_path)], quiet=True)
    pairs = {(r["policy"], r["vs_policy"]): r for r in res["pairs"]}
    assert set(pairs) == {("full", "swdpp"), ("swdpp", "full")}
    d = pairs[("full", "swdpp")]
    assert d["seeds"] == 3 and d["wins"] == 3
    assert d["diff"] == pytest.approx(0.2, abs=1e-9)                 # (0.1 + 0.2 + 0.3) / 3 points
    assert d["se"] == pytest.approx(0.1 / 3 ** 0.5, rel=1e-6)        # std 0.1 over sqrt(3)
    assert pairs[("swdpp", "full")]["diff"] == pytest.approx(-0.2, abs=1e-9)
    assert "Paired differences" in (res["out"] / "report.md").read_text()


def test_report_cli_on_run_dirs(tmp_path: Path, capsys) -> None:
    a = _fake_run(tmp_path / "a", "full", 1.0, 0, 0.9)
    b = _fake_run(tmp_path / "b", "uniform", 0.5, 0, 0.85)
    assert report.main([str(a), str(b), "--out", str(tmp_path / "rep")]) == 0
    assert "uniform" in capsys.readouterr().out
    assert (tmp_path / "rep" / "report.md").exists()


def test_metrics_writer_resume_truncates(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    w = MetricsWriter(p)
    for e in range(4):
        w.write({"epoch": e, "x": float("nan")})
    MetricsWriter(p, resume_epoch=2)
    recs = read_jsonl(p)
    assert [r["epoch"] for r in recs] == [0, 1] and recs[0]["x"] is None


def test_compare_policy_specs_and_labels(tmp_path: Path, capsys) -> None:
    from tools import compare
    assert compare.parse_policy('swdpp:{"weights":"importance"}') == ("swdpp", {"weights": "importance"})
    assert compare.policy_tag("swdpp", {"weights": "importance", "tilt": 0.5}) == "swdpp-tilt_0.5-weights_importance"
    with pytest.raises(SystemExit, match="not JSON"):
        compare.parse_policy("swdpp:{weights}")
    assert report.policy_label("swdpp", '{"weights": "importance"}') == "swdpp{weights=importance}"
    assert report.policy_label("rs2", "{}") == "rs2"
    assert compare.main(["--data", "x", "--policies", 'swdpp:{"floor":0.3}', "--seeds", "4", "--dry-run",
                         "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "swdpp-floor_0.3-k0.7-s4" in out and '--policy-kwargs {"floor": 0.3}' in out


def test_compare_takes_paths_relative_to_where_it_runs(fmnist_wds, tmp_path: Path, monkeypatch) -> None:
    """A user in their own folder gives relative paths: the runs land there, trained on the
    data named there (the trainer ran in the checkout, where neither path meant anything)."""
    import os

    from tools import compare
    monkeypatch.chdir(tmp_path)
    data = os.path.relpath(fmnist_wds, tmp_path)
    assert compare.main(["--data", data, "--policies", "full", "--seeds", "0", "--epochs", "1",
                         "--runs", "mine", "--", "--backend", "torch", "--device", "cpu",
                         "--workers", "0", "--threads", "1", "--width", "8"]) == 0
    summary = json.loads((tmp_path / "mine" / "full-k1-s0" / "summary.json").read_text())
    assert summary["epochs"] == 1 and not summary["stopped"] and summary["policy"] == "full"
    cfg = json.loads((tmp_path / "mine" / "full-k1-s0" / "config.json").read_text())
    assert Path(cfg["data"]).resolve() == Path(fmnist_wds).resolve(), cfg["data"]
    assert (tmp_path / "mine" / "report").is_dir()
    assert not (compare.ROOT / "mine").exists()


def test_datasets_whose_folders_share_a_name_stay_apart(tmp_path: Path, capsys) -> None:
    """CIFAR in /d/cifar/train and Fashion-MNIST in /d/fmnist/train: two datasets, each
    compared with its own full-data run; a path that is not there is said, not dropped."""
    _fake_run(tmp_path / "c-full", "full", 1.0, 0, 0.80, data="/d/cifar/train")
    _fake_run(tmp_path / "f-full", "full", 1.0, 0, 0.90, data="/d/fmnist/train")
    _fake_run(tmp_path / "f-swdpp", "swdpp", 0.7, 0, 0.89, data="/d/fmnist/train/")
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "metrics.jsonl").write_text("")
    res = report.write_report([str(tmp_path), str(tmp_path / "nowhere")], quiet=True)
    rows = {(r["dataset"], r["policy"]): r for r in res["rows"]}
    assert set(rows) == {("cifar/train", "full"), ("fmnist/train", "full"), ("fmnist/train", "swdpp")}
    assert rows[("fmnist/train", "swdpp")]["acc_delta"] == pytest.approx(-1.0, abs=1e-6)
    err = capsys.readouterr().err
    assert "nowhere: no such file or directory" in err and "early: no finished epoch yet" in err


def test_compare_runs_several_trainings_at_a_time(fmnist_wds, tmp_path: Path, capsys) -> None:
    """--jobs 2: both runs finish, each with its own log, and they are the runs one at a
    time would have made (same seed and policy -> the same samples read, same loss)."""
    from tools import compare
    common = ["--data", str(fmnist_wds), "--policies", "full", "rs2", "--seeds", "0", "--epochs", "1"]
    trainer = ["--", "--backend", "torch", "--device", "cpu", "--workers", "0", "--threads", "1", "--width", "8"]
    assert compare.main(common + ["--runs", str(tmp_path / "par"), "--jobs", "2"] + trainer) == 0
    assert compare.main(common + ["--runs", str(tmp_path / "seq")] + trainer) == 0
    for name in ("full-k1-s0", "rs2-k0.7-s0"):
        par = [json.loads(x) for x in (tmp_path / "par" / name / "metrics.jsonl").read_text().splitlines()]
        seq = [json.loads(x) for x in (tmp_path / "seq" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["samples_read"] for r in par] == [r["samples_read"] for r in seq]
        assert par[-1]["train_loss"] == pytest.approx(seq[-1]["train_loss"], rel=1e-5)
        assert "epoch 0" in (tmp_path / "par" / name / "train.log").read_text()
    assert "rs2-k0.7-s0: exit 0" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--jobs 0"):
        compare.main(common + ["--runs", str(tmp_path / "x"), "--jobs", "0"])


def test_one_seed_reports_no_spread(tmp_path: Path) -> None:
    """A sample std needs two seeds: one seed prints its mean alone (was "± 0.00", which
    reads as a measured spread of zero)."""
    _fake_run(tmp_path / "full-s0", "full", 1.0, 0, 0.90)
    _fake_run(tmp_path / "swdpp-s0", "swdpp", 0.7, 0, 0.895)
    _fake_run(tmp_path / "swdpp-s1", "swdpp", 0.7, 1, 0.905)
    res = report.write_report([str(tmp_path)], quiet=True)
    rows = {r["policy"]: r for r in res["rows"]}
    assert rows["full"]["acc_std"] is None and rows["swdpp"]["acc_std"] == pytest.approx(0.00707, abs=1e-4)
    lines = {line.split(" | ")[1]: line for line in report.table(res["rows"]).splitlines()[2:]}
    assert "| 90.00 | " in lines["full"] and "±" not in lines["full"]
    assert "| 90.00 ± 0.71 | " in lines["swdpp"]


def test_runs_of_other_settings_get_their_own_rows(tmp_path: Path, capsys) -> None:
    """Two sweeps at LR 0.2 and 0.28: four rows, each pruned row against the full row of its
    LR; the device, threads or run folder do not split a row."""
    for lr, base in ((0.2, 0.90), (0.28, 0.92)):
        for s in range(2):
            _fake_run(tmp_path / f"lr{lr}" / f"full-s{s}", "full", 1.0, s, base,
                      config={"lr": lr, "device": "cuda" if s else "cpu", "threads": s + 1})
            _fake_run(tmp_path / f"lr{lr}" / f"swdpp-s{s}", "swdpp", 0.7, s, base - 0.01,
                      config={"lr": lr, "out": f"/somewhere/{s}"})
    res = report.write_report([str(tmp_path)], quiet=True)
    rows = {r["policy"]: r for r in res["rows"]}
    assert list(rows) == ["full{lr=0.2}", "full{lr=0.28}", "swdpp{lr=0.2}", "swdpp{lr=0.28}"]
    assert all(r["seeds"] == 2 for r in rows.values())
    assert rows["swdpp{lr=0.28}"]["vs_full"] == "full{lr=0.28}"
    assert rows["swdpp{lr=0.2}"]["acc_delta"] == pytest.approx(-1.0, abs=1e-6)
    assert rows["swdpp{lr=0.28}"]["acc_delta"] == pytest.approx(-1.0, abs=1e-6)
    assert {(p["policy"], p["vs_policy"]) for p in res["pairs"]} >= {("swdpp{lr=0.2}", "full{lr=0.2}")}
    assert "seed" not in capsys.readouterr().err
    # one LR of the pruned policy only, two full rows: the report says which one it used
    _fake_run(tmp_path / "lr0.1" / "swdpp-s0", "swdpp", 0.7, 0, 0.8, config={"lr": 0.1})
    res = report.write_report([str(tmp_path)], quiet=True)
    md = (res["out"] / "report.md").read_text()
    assert "swdpp{lr=0.1} keep 0.7 (toy): vs `full{lr=0.2}` (of 2 full-data rows); settings that differ: " \
        "lr 0.1 vs 0.2" in md


def test_same_seed_at_two_lrs_is_two_rows(tmp_path: Path, capsys) -> None:
    """tools/report.py lr2/swdpp-k0.7-s0 lr28/swdpp-k0.7-s0: two one-seed rows, not one of "2 seeds"."""
    a = _fake_run(tmp_path / "lr2" / "swdpp-k0.7-s0", "swdpp", 0.7, 0, 0.78, config={"lr": 0.2})
    b = _fake_run(tmp_path / "lr28" / "swdpp-k0.7-s0", "swdpp", 0.7, 0, 0.786, config={"lr": 0.28})
    assert report.main([str(a), str(b), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if "swdpp" in line]
    assert len(lines) == 2 and "| swdpp{lr=0.2} | 0.7 | 1 |" in lines[0] and "| swdpp{lr=0.28} | 0.7 | 1 |" in lines[1]
    assert "seed 0" not in out.err


def test_a_repeated_seed_counts_once_with_a_warning(tmp_path: Path, capsys) -> None:
    """The same seed in two runs of one row: counted once, from the later run, and both
    run folders named on stderr; the paired differences do not silently drop one either."""
    import os

    from tools import paired
    for s in range(2):
        _fake_run(tmp_path / f"full-s{s}", "full", 1.0, s, 0.90)
    old = _fake_run(tmp_path / "a" / "swdpp-s0", "swdpp", 0.7, 0, 0.70)
    new = _fake_run(tmp_path / "b" / "swdpp-s0", "swdpp", 0.7, 0, 0.88)
    _fake_run(tmp_path / "b" / "swdpp-s1", "swdpp", 0.7, 1, 0.88)
    os.utime(old / "metrics.jsonl", (1e9, 1e9))
    res = report.write_report([str(tmp_path)], quiet=True)
    row = {r["policy"]: r for r in res["rows"]}["swdpp"]
    assert row["seeds"] == 2 and row["seed_list"] == [0, 1]
    assert row["acc_mean"] == pytest.approx(0.88)
    err = capsys.readouterr().err
    assert "seed 0 is in 2 runs" in err and str(old) in err and str(new) in err
    assert err.count("seed 0 is in") == 1                  # said once, not by every table
    pairs = paired.paired_differences([report.load_run(p) for p in (tmp_path / "full-s0", tmp_path / "full-s1",
                                                                     old, new, tmp_path / "b" / "swdpp-s1")])
    d = {(r["policy"], r["vs_policy"]): r for r in pairs}[("full", "swdpp")]
    assert d["diff"] == pytest.approx(2.0)
    err = capsys.readouterr().err
    assert str(old) in err and str(new) in err


def test_compare_refuses_a_run_of_other_options(fmnist_wds, tmp_path: Path, capsys) -> None:
    """A finished run is skipped only when it was trained with the same command: the same
    sweep again is skipped, one with --epochs 2 into the same folder is refused."""
    from tools import compare
    runs = tmp_path / "runs"
    common = ["--data", str(fmnist_wds), "--policies", "uniform", "--seeds", "0", "--runs", str(runs)]
    trainer = ["--", "--backend", "torch", "--device", "cpu", "--workers", "0", "--threads", "1", "--width", "8"]
    assert compare.main(common + ["--epochs", "1"] + trainer) == 0
    run = runs / "uniform-k0.7-s0"
    cmd = json.loads((run / "compare.json").read_text())["command"]
    assert cmd[cmd.index("--data") + 1] == str(Path(fmnist_wds).resolve()) and "--resume" not in cmd
    summary = (run / "summary.json").read_text()
    with pytest.raises(SystemExit, match=r"uniform-k0.7-s0 was trained with --epochs 1, this sweep asks for "
                                         r"--epochs 2: use another --runs folder or remove that run"):
        compare.main(common + ["--epochs", "2"] + trainer)
    with pytest.raises(SystemExit, match=r"was trained with --width 8, this sweep asks for --width 16"):
        compare.main(common + ["--epochs", "1"] + trainer[:-1] + ["16"])
    capsys.readouterr()
    assert compare.main(common + ["--epochs", "1"] + trainer) == 0
    assert "uniform-k0.7-s0: done, skipped" in capsys.readouterr().out
    assert (run / "summary.json").read_text() == summary


def test_compare_checks_older_runs_by_their_config(tmp_path: Path, capsys) -> None:
    """A run folder from before compare.json: its config.json is compared."""
    from tools import compare
    _fake_run(tmp_path / "full-k1-s0", "full", 1.0, 0, 0.9, epochs=3, data="/x/toy")
    base = ["--data", "/x/toy", "--policies", "full", "--seeds", "0", "--runs", str(tmp_path), "--dry-run"]
    with pytest.raises(SystemExit, match=r"full-k1-s0 was trained with --epochs 3, this sweep asks for --epochs 5"):
        compare.main(base + ["--epochs", "5"])
    assert compare.main(base + ["--epochs", "3"]) == 0
    assert "full-k1-s0: done, skipped" in capsys.readouterr().out
