"""Multi-process training with torch.distributed, started by torchrun (gloo on CPU)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from r2led.train.checkpoint import load_checkpoint


@pytest.mark.slow
def test_torchrun_two_processes_train_one_model(tiny_store, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        torchrun = shutil.which("torchrun")
    out = tmp_path / "ddp"
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "r2led",
        "train",
        str(tiny_store.root),
        "--model",
        "r2led",
        "--out",
        str(out),
        "--set",
        "train.epochs=4",
        "--set",
        "train.batch_size=64",
        "--set",
        "train.lr=0.01",
        "--set",
        "train.threads=1",
        "--set",
        "model.k=5",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["valid"]["auc"] > 0.75
    # one model: the checkpoint written by rank 0 loads and has trained weights
    state = load_checkpoint(out / "best.pt")
    assert torch.isfinite(state["model"]["items.id.weight"]).all()
    # each process took every other batch: an epoch is half the single-process step count
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1.0, 2.0, 3.0, 4.0]
    # the global batch stays train.batch_size: each rank steps on half of it (logged)
    assert "DDP: 2 ranks x 32 samples = global batch 64" in (out / "train.log").read_text()
    # every rank scored its shard; the metrics cover the whole split, gathered in split order
    assert all(h["samples"] == len(tiny_store.split_indices("valid")) for h in history)
    test_pred = np.load(out / "test_pred.npy")
    assert len(test_pred) == len(tiny_store.split_indices("test")) and np.isfinite(test_pred).all()


# ---- the rules, without launching processes ----------------------------------------------------


def test_shards_cover_each_split_once_and_train_shards_are_equal(tmp_path):
    import numpy as np
    import polars as pl

    from r2led.data.protocol import Protocol
    from r2led.data.sources.synthetic import load_synthetic
    from r2led.data.store import build_store
    from r2led.train.distributed import Distributed, shard, shard_store

    assert [shard(10, 20, Distributed(r, 3)) for r in range(3)] == [(10, 13), (13, 16), (16, 20)]
    assert [shard(10, 20, Distributed(r, 3), equal=True) for r in range(3)] == [(10, 13), (13, 16), (16, 19)]
    store = build_store(load_synthetic(users=40, length=30, items=200, seed=1), tmp_path / "s", Protocol(min_history=1))
    views = [shard_store(store, Distributed(r, 3)) for r in range(3)]
    for split in ("valid", "test"):  # every sample of the split once, in split order
        ranks = np.concatenate([v.sample_arrays["rank"][v.split_indices(split)] for v in views])
        assert ranks.tolist() == store.sample_arrays["rank"][store.split_indices(split)].tolist()
    train = [len(v.split_indices("train")) for v in views]
    assert len(set(train)) == 1 and sum(train) == len(store.split_indices("train")) // 3 * 3
    cut = shard_store(store, Distributed(1, 2), max_train=100, max_eval=10)
    assert len(cut.split_indices("train")) == 50 and len(cut.split_indices("valid")) == 5
    first_valid = store.samples.filter(pl.col("split") == 1)["rank"].to_list()[5:10]
    assert cut.sample_arrays["rank"][cut.split_indices("valid")].tolist() == first_valid


def test_global_batch_and_threads_do_not_depend_on_the_rank_count(monkeypatch):
    import r2led.train.distributed as d

    assert d.local_batch_size(512, d.Distributed(0, 1)) == 512
    assert d.local_batch_size(512, d.Distributed(1, 2)) == 256
    assert d.local_batch_size(512, d.Distributed(0, 4)) * 4 == 512
    monkeypatch.setattr(d, "usable_cores", lambda: 8)
    assert d.configure_threads(None, d.Distributed(0, 4, local_world=4)) == 2
    assert d.configure_threads(None, d.Distributed(0, 1)) == 8
    assert d.configure_threads(3, d.Distributed(0, 4, local_world=4)) == 3
    torch.set_num_threads(1)


def test_the_openmp_wait_policy_is_passive_by_default():
    import os

    import r2led  # noqa: F401

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", "import os, r2led, torch; print(os.environ['OMP_WAIT_POLICY'])"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # a user's choice is kept
    done = subprocess.run(
        [sys.executable, "-c", "import os, r2led; print(os.environ['OMP_WAIT_POLICY'])"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.stdout.strip() == "ACTIVE"
