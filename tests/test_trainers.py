"""Trainers: unit tests (models, schedule, checkpoints, optimizers) and an end-to-end run on a
small real subset (Fashion-MNIST): convert, train two epochs with each policy, report written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers import checkpoint
from trainers.models import build_model
from trainers.optim import build_optimizer, scale_weight_decay
from trainers.schedule import lr_factor_fn, make_scheduler



# ---------------------------------------------------------------- units

@pytest.mark.parametrize("name,shape", [("tiny", (1, 28, 28)), ("tiny", (3, 32, 32)), ("resnet18", (3, 32, 32))])
def test_models_forward_and_seeded_init(name: str, shape: tuple) -> None:
    before = torch.get_rng_state()
    a = build_model(name, 10, shape[0], seed=3)
    assert torch.equal(before, torch.get_rng_state()), "build_model must not touch the global RNG"
    b = build_model(name, 10, shape[0], seed=3)
    c = build_model(name, 10, shape[0], seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.eval()(torch.randn(2, *shape)).shape == (2, 10)


def test_resnet50_builds() -> None:
    m = build_model("resnet50", 1000, 3)
    assert m.fc.out_features == 1000


def test_schedule_uses_known_steps_and_never_overflows() -> None:
    steps = [10, 7, 7, 7, 10]  # pruned epochs shorter, full-data annealing epoch at the end
    f = lr_factor_fn(steps, warmup_epochs=1)
    vals = [f(i) for i in range(sum(steps))]
    assert vals[0] == pytest.approx(0.1) and vals[9] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(vals[10:], vals[11:])), "cosine decays monotonically"
    assert vals[-1] == pytest.approx(0.0, abs=1e-9)
    assert f(sum(steps) + 5) == vals[-1], "stepping past the end clamps"
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    sch = make_scheduler(opt, steps)
    for _ in range(sum(steps) + 3):
        opt.step()
        sch.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_checkpoint_roundtrip_weights_only(tmp_path: Path) -> None:
    m = build_model("tiny", 10, 1)
    opt = build_optimizer("sgd", m, 0.1)
    state = {"model": m.state_dict(), "optimizer": opt.state_dict(),
             "loader": {"ids": np.arange(7, dtype=np.int64), "p": np.linspace(0, 1, 5, dtype=np.float32),
                        "u": np.array([1, 2], dtype=np.uint32), "epoch": np.int64(3), "name": "swdpp",
                        "rng": np.random.default_rng(0).bit_generator.state, "nested": [np.zeros((2, 2))]}}
    checkpoint.save(state, tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)  # must not raise
    assert "model" in raw
    back = checkpoint.load(tmp_path / "c.pt")
    ld = back["loader"]
    assert ld["ids"].dtype == np.int64 and np.array_equal(ld["ids"], np.arange(7))
    assert ld["u"].dtype == np.uint32 and ld["epoch"] == 3 and ld["name"] == "swdpp"
    assert ld["rng"] == state["loader"]["rng"]
    assert all(torch.equal(back["model"][k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_optimizers_reduce_loss(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 28, 28, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    m = build_model("tiny", 2, 1, width=8)
    lr = {"sgd": 0.05, "lars": 1.0, "adamw": 3e-3}[name]
    opt = build_optimizer(name, m, lr)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_scaled_decay_makes_a_loss_weight_a_step_size() -> None:
    """SGD with Nesterov momentum and weight decay: a loss weight c with the decay scaled by
    c (``--scale-decay``) gives the same parameters as the learning rate times c; the weight
    alone (decay unscaled) does not."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    c, lr = 1.6, 0.05

    def run(lr_: float, weight: float, scale: bool) -> list[torch.Tensor]:
        m = build_model("tiny", 2, 1, seed=0, width=8)
        opt = build_optimizer("sgd", m, lr_, weight_decay=5e-2)
        for _ in range(5):
            loss = weight * torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            if scale:
                scale_weight_decay(opt, weight)
            opt.step()
        if scale:  # the base is kept; the decay of the last step is the base times the weight
            assert [(gr["base_weight_decay"], gr["weight_decay"]) for gr in opt.param_groups] == \
                [(5e-2, 5e-2 * weight), (0.0, 0.0)]
        return [p.detach().clone() for p in m.parameters()]

    ref = run(lr * c, 1.0, False)
    scaled = run(lr, c, True)
    unscaled = run(lr, c, False)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(ref, scaled))
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(ref, unscaled))


# ---------------------------------------------------------------- end to end (real data)

@pytest.fixture(scope="module")
def fmnist_small(fmnist_wds, fmnist_test_wds) -> tuple[Path, Path]:
    """(train: the shared 2000-sample fixture, test: 1000 samples of the test split)."""
    pytest.importorskip("pipeline.loader")
    return Path(fmnist_wds), Path(fmnist_test_wds)


@pytest.fixture(scope="module")
def e2e_runs(fmnist_small, tmp_path_factory) -> dict[str, Path]:
    from trainers.classify import POLICIES, main

    train, test = fmnist_small
    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for policy in POLICIES:
        d = runs / policy
        main(["--data", str(train), "--test-data", str(test), "--policy", policy, "--keep", "0.7",
              "--epochs", "2", "--batch-size", "64", "--width", "8", "--workers", "0", "--backend", "torch",
              "--device", "cpu", "--seed", "0", "--warmup-epochs", "0.3", "--out", str(d), "--no-progress"])
        out[policy] = d
    return out


@pytest.mark.parametrize("policy", ["full", "uniform", "rs2", "infobatch", "ucb", "eps_greedy", "swdpp", "swdpp_v1"])
def test_e2e_policy_learns(e2e_runs: dict, policy: str) -> None:
    d = e2e_runs[policy]
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1]
    assert recs[1]["train_loss"] < recs[0]["train_loss"], "the loss decreases"
    assert recs[-1]["test_acc"] > 0.5, "10 classes: chance is 0.1"
    for r in recs:
        assert r["steps"] > 0 and r["samples_read"] > 0 and r["bytes_read"] > 0
        assert r["data_wait_s"] >= 0 and r["compute_s"] > 0
    if policy != "full":
        # a pruning policy reads less than the dataset in at least one epoch
        assert min(r["samples_read"] for r in recs) < recs[0]["full_samples"]
    # the longest a sample went unread before each epoch: none before the first; before the
    # second, the samples epoch 0 did not read (all were read under full data); the last
    # record also counts gaps still open at the end (as tools/visits.py does): uniform's
    # independent draws leave some samples unread in both epochs, SwDPP's credits do not
    if policy in ("full", "uniform", "swdpp"):
        assert [r["unseen_max"] for r in recs] == {"full": [0, 0], "uniform": [0, 2], "swdpp": [0, 1]}[policy]
    assert (d / "summary.json").exists() and (d / "ckpt" / "last.pt").exists()
    torch.load(d / "ckpt" / "last.pt", weights_only=True)


def test_e2e_report_written(e2e_runs: dict, tmp_path: Path) -> None:
    from tools.report import write_report

    res = write_report([str(p) for p in e2e_runs.values()], tmp_path / "rep", quiet=True)
    from trainers.classify import POLICIES
    assert len(res["rows"]) == len(POLICIES) and len(res["files"]) == 5
    full = next(r for r in res["rows"] if r["policy"] == "full")
    sw = next(r for r in res["rows"] if r["policy"] == "swdpp")
    assert sw["samples_read"] < full["samples_read"]
    assert (sw["unseen_max"], full["unseen_max"]) == (1, 0)
    assert "longest unread (epochs)" in res["table"]
    assert (tmp_path / "rep" / "report.md").read_text().count("|") > 20


def test_sigterm_checkpoints_and_resume_completes(fmnist_small, tmp_path: Path) -> None:
    """A real SIGTERM mid-epoch: the run checkpoints and exits 0; --resume finishes the plan."""
    import os
    import signal
    import subprocess
    import sys
    import time

    train, test = fmnist_small
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainers.classify", "--data", str(train), "--policy", "uniform", "--keep", "0.7",
           "--epochs", "2", "--batch-size", "20", "--width", "8", "--backend", "torch", "--device", "cpu",
           "--workers", "0", "--threads", "1", "--log-ids", "--no-progress", "--out", str(out)]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ids = out / "ids-rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ids.exists() and len(ids.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log[-2000:]
    assert "stopped at epoch" in log and not (out / "summary.json").exists()
    ck = checkpoint.load(out / "ckpt" / "last.pt")
    assert ck["global_step"] == len(ids.read_text().splitlines())
    r = subprocess.run(cmd + ["--resume"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    steps = [json.loads(x) for x in ids.read_text().splitlines()]
    assert len(steps) == sum(cfg["steps_per_epoch"]), "same number of steps as planned up front"
    for e in range(2):
        seen = [i for s in steps if s["epoch"] == e for i in s["ids"] if i >= 0]
        assert len(seen) == len(set(seen)), "no sample is read twice in an epoch after resume"
    assert (out / "summary.json").exists()


def test_eval_loader_normalises_like_training(cifar_wds, cifar_test_wds) -> None:
    """Regression: the test set must go through the training preset's normalisation (eval mode)."""
    pytest.importorskip("pipeline.loader")
    import pipeline
    from trainers.classify import _make_loader, build_parser, resolve_augment

    args = build_parser().parse_args(["--data", str(cifar_wds), "--backend", "torch", "--workers", "0"])
    train_ds, test_ds = pipeline.open_dataset(cifar_wds), pipeline.open_dataset(cifar_test_wds)
    args.augment = resolve_augment(args.augment, train_ds)
    assert args.augment == "cifar"
    tr = _make_loader(train_ds, args, 1, 0, "cpu", train=True)
    ev = _make_loader(test_ds, args, 1, 0, "cpu", train=False)
    assert tuple(tr.spec.mean) == tuple(ev.spec.mean) and tuple(tr.spec.std) == tuple(ev.spec.std)
    assert tr.spec.train and not ev.spec.train
    x = next(iter(ev.epoch(0))).images
    assert abs(float(x.mean())) < 1.0 and 0.5 < float(x.std()) < 2.0, "normalised inputs"


def test_bench_train_time_interleaves_the_trainers_epochs(fmnist_small, e2e_runs, tmp_path: Path) -> None:
    """benchmarks/bench_train_time.py trains each policy exactly as the trainer does (same plan,
    same samples), only with the policies' epochs alternating."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train_time", Path(__file__).parents[1] / "benchmarks" /
                                                  "bench_train_time.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    train, _ = fmnist_small
    out = tmp_path / "tt.json"
    assert bench.main(["--data", str(train), "--policies", "full", "uniform", "swdpp", "--keep", "0.7",
                       "--epochs", "2", "--out", str(out), "--", "--batch-size", "64", "--width", "8",
                       "--workers", "0", "--backend", "torch", "--device", "cpu", "--warmup-epochs", "0.3"]) == 0
    res = {r["policy"]: r for r in json.loads(out.read_text())["runs"]}
    assert res["full"]["wall_ratio"] == 1.0 and all(r["wall_s"] > 0 and r["cpu_s"] > 0 for r in res.values())
    for policy, r in res.items():
        recs = [json.loads(line) for line in (e2e_runs[policy] / "metrics.jsonl").read_text().splitlines()]
        # the samples trained on (samples_read also counts the padding rows' fill samples)
        assert r["epoch_samples"] == [x["train_samples"] for x in recs], policy
    assert res["uniform"]["samples"] < res["full"]["samples"]


def _mean_weight_rank(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from trainers.epoch_loop import mean_loss_weight
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        # rank 0: weights 1, 1 and a padding row (mean 1); rank 1: 2, 2, 2 (mean 2)
        w = torch.tensor([1.0, 1.0, 0.0]) if rank == 0 else torch.tensor([2.0, 2.0, 2.0])
        Path(out, f"r{rank}").write_text(repr(mean_loss_weight(w)))
    finally:
        dist.destroy_process_group()


def test_scaled_decay_factor_is_the_same_on_every_rank(tmp_path: Path) -> None:
    """Under DDP the decay factor is the mean positive weight over all ranks' rows: 8/5 on
    both ranks here, where each rank alone would say 1 and 2 (and the replicas would take
    different steps)."""
    import torch.multiprocessing as mp
    mp.spawn(_mean_weight_rank, args=(f"file://{tmp_path}/init", str(tmp_path)), nprocs=2)
    got = [float(Path(tmp_path, f"r{r}").read_text()) for r in (0, 1)]
    assert got == [1.6, 1.6]


def _folder(root: Path, classes: dict, size=(16, 16), mode: str = "RGB") -> Path:
    """An ImageFolder converted to shards: ``classes`` maps class name -> images."""
    from PIL import Image

    from pipeline.formats import convert
    for k, (c, n) in enumerate(classes.items()):
        (root / "src" / c).mkdir(parents=True)
        for i in range(n):
            hw = size[i % len(size)] if isinstance(size[0], tuple) else size
            Image.new(mode, hw[::-1], (40 * k + i) % 255).save(root / "src" / c / f"{i}.png")
    convert(root / "src", root / "wds", format="wds", progress=False)
    return root / "wds"


def test_test_set_that_a_model_cannot_score_is_refused_at_start(tmp_path: Path, capsys) -> None:
    """Before any training: a test set whose labels name other classes, with more classes,
    other channels, or (cifar preset) other sizes is refused naming both datasets; one that
    holds only the first classes is accepted."""
    import pipeline
    from trainers.build import check_test_set
    from trainers.classify import main

    def ds(name, classes, **kw):
        return pipeline.open_dataset(_folder(tmp_path / name, classes, **kw))
    train = ds("train", {"cat": 2, "dog": 2, "zebra": 2})
    cases = {
        "fruit": (ds("fruit", {"apple": 1, "banana": 1, "cherry": 1}),
                  r"label 0 means 'apple' in the test set .*fruit.* and 'cat' in the training set"),
        "more": (ds("more", {"cat": 1, "dog": 1, "zebra": 1, "zoo": 1}),
                 r"has 4 classes .* training set .* 3 .*no output for zoo"),
        "yak": (ds("yak", {"cat": 1, "dog": 1, "yak": 1, "zebra": 1}),
                r"label 2 means 'yak' .* 'zebra'"),
        "order": (ds("order", {"dog": 1, "zebra": 1}), r"label 0 means 'dog' .* 'cat'"),
        "gray": (ds("gray", {"cat": 1, "dog": 1, "zebra": 1}, mode="L"), r"1 channel\(s\) .* 3"),
        "sizes": (ds("sizes", {"cat": 2, "dog": 2, "zebra": 2}, size=((16, 16), (20, 12))),
                  r"holds images of varied sizes, the training set .* 16x16.*--resize 16x16"),
    }
    for name, (test, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            check_test_set(train, test, "cifar", "train", name)
    check_test_set(train, cases["sizes"][0], "imagenet", "train", "sizes")  # resized in eval
    check_test_set(train, ds("first", {"cat": 1, "dog": 1}), "cifar", "train", "first")
    with pytest.raises(SystemExit) as e:
        main(["--data", "x", "--augment", "foo"])
    assert e.value.code == 2 and "invalid choice: 'foo'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:   # the command line says it in one line, before training
        main(["--data", str(tmp_path / "train" / "wds"), "--test-data", str(tmp_path / "fruit" / "wds"),
              "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and "label 0 means 'apple'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
