"""Multi-process training with torch.distributed, started by torchrun (gloo on CPU)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

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
        str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "r2led", "train", str(tiny_store.root),
        "--model", "r2led", "--out", str(out),
        "--set", "train.epochs=4", "--set", "train.batch_size=64", "--set", "train.lr=0.01",
        "--set", "train.threads=1", "--set", "model.k=5",
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
