"""Run folders and checkpoints under attack: crafted pickles, changed settings, rebuilt data,
corrupt files, divergence and a full disk. Each refusal is one line on stderr with exit code 2,
and leaves the run folder as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fast_training import FAST_SMALL as DIN
from r2led.cli import app
from r2led.config import load_config
from r2led.errors import CheckpointError, DataError
from r2led.sid.table import SidTable
from r2led.train import trainer as trainer_module
from r2led.train.checkpoint import load_checkpoint
from r2led.train.run_folder import verify_run

R2LED = [*DIN, "model.k=5"]


def train_args(data, out, model="din", *extra, settings=DIN):
    args = ["train", str(data), "--model", model, "--out", str(out)]
    for o in settings:
        args += ["--set", o]
    return args + list(extra)


def cli(*args):
    return CliRunner().invoke(app, list(args))


def assert_refused(res, *phrases):
    """Exit code 2, one short line on stderr naming what is wrong, no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 400, res.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def store(tiny_store, tmp_path):
    """A private copy of the tiny store (these tests rebuild its SID table and manifest)."""
    root = tmp_path / "store"
    shutil.copytree(tiny_store.root, root)
    return root


@pytest.fixture
def din_run(store, tmp_path):
    out = tmp_path / "run"
    res = cli(*train_args(store, out))
    assert res.exit_code == 0, res.output
    return out


# ---- 1. checkpoints never run code -----------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_checkpoints_hold_only_tensors_and_plain_data(din_run):
    for name in ("best.pt", "last.pt"):
        state = torch.load(din_run / name, weights_only=True)  # raises on anything else
        assert "model" in state
    rng = torch.load(din_run / "last.pt", weights_only=True)["rng"]
    assert rng["numpy"]["keys"].shape == (624,) and len(rng["python"]["words"]) == 625


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_a_crafted_pickle_is_refused_and_never_runs(store, din_run, tmp_path, name):
    marker = tmp_path / f"pwned-{name}"
    torch.save({"model": _Payload(marker), "epoch": 0}, din_run / name)
    before = snapshot(din_run)
    args = ["evaluate", str(din_run)] if name == "best.pt" else train_args(store, din_run, "din", "--resume")
    res = cli(*args)
    assert_refused(res, f"refusing {din_run / name}", "other than tensors", "GLOBAL")
    assert not marker.exists()
    assert snapshot(din_run) == before  # config.yaml was not rewritten either


def test_resume_is_byte_identical_mid_epoch(store, tmp_path):
    """Stopped after the first of two evaluations in epoch 1, resumed: the same model and test
    predictions as an uninterrupted run."""
    two = ["train.evals_per_epoch=2", "train.patience=5"]
    full = tmp_path / "full"
    assert cli(*train_args(store, full, settings=[*DIN, *two])).exit_code == 0
    part = tmp_path / "part"
    trainer = trainer_module.Trainer(
        store, load_config(None, [*DIN, *two], base={"model": {"name": "din"}}), part, show_progress=False
    )
    original = trainer._checkpoint

    def stop_after_first_eval(*args):
        original(*args)
        raise KeyboardInterrupt  # killed right after the first checkpoint

    trainer._checkpoint = stop_after_first_eval
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert load_checkpoint(part / "last.pt")["batch"] > 0  # mid-epoch
    res = cli(*train_args(store, part, "din", "--resume", settings=[*DIN, *two]))
    assert res.exit_code == 0, res.output
    assert (part / "test_pred.npy").read_bytes() == (full / "test_pred.npy").read_bytes()
    a, b = load_checkpoint(full / "best.pt")["model"], load_checkpoint(part / "best.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- 2. a run folder is never left half-valid ------------------------------------------------
def test_resume_with_other_settings_names_the_keys_and_changes_nothing(store, din_run):
    before = snapshot(din_run)
    res = cli(*train_args(store, din_run, "din", "--resume", "--set", "model.dim=64", "--set", "train.lr=0.002"))
    assert_refused(res, "model.dim: 16 → 64", "train.lr: 0.01 → 0.002")
    assert snapshot(din_run) == before


def test_nothing_is_written_when_a_check_fails(store, tmp_path):
    no_sid = tmp_path / "no_sid"
    shutil.copytree(store, no_sid)
    shutil.rmtree(no_sid / "sid")
    out = tmp_path / "new"
    assert_refused(cli(*train_args(no_sid, out, "r2led", settings=R2LED)), "SID table")
    assert not out.exists()
    assert_refused(cli(*train_args(tmp_path / "nowhere", out)), "nowhere")
    assert not out.exists()


def test_an_existing_run_needs_resume_or_force(store, din_run, tmp_path):
    before = snapshot(din_run)
    assert_refused(cli(*train_args(store, din_run, "r2led", settings=R2LED)), "already holds a run (din)", "--force")
    assert_refused(cli(*train_args(store, din_run, "din", "--resume", "--force")), "--resume", "--force")
    assert snapshot(din_run) == before
    # different data under --resume: refused by fingerprint
    other = tmp_path / "other"
    shutil.copytree(store, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "prepare_seconds": -1.0}))
    assert_refused(cli(*train_args(other, din_run, "din", "--resume")), "not what", "manifest sha")
    assert snapshot(din_run) == before
    # --force replaces the run: a clean folder, the new settings
    (din_run / "eval_test.json").write_text("{}")
    res = cli(*train_args(other, din_run, "din", "--force", "--set", "model.dim=8"))
    assert res.exit_code == 0, res.output
    assert not (din_run / "eval_test.json").exists()
    saved = yaml.safe_load((din_run / "config.yaml").read_text())
    assert saved["model"]["dim"] == 8 and saved["data"] == str(other.resolve())


def test_force_never_clears_a_folder_that_is_not_a_run(store, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert_refused(cli(*train_args(store, precious, "din", "--force")), "not a run folder")
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_runs_record_fingerprints_and_refuse_a_rebuilt_sid_table(store, tmp_path):
    out = tmp_path / "r2led"
    assert cli(*train_args(store, out, "r2led", settings=R2LED)).exit_code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())["fingerprints"]
    assert saved["data"] == hashlib.sha256((store / "manifest.json").read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for name in sorted(os.listdir(store / "sid")):
        digest.update(name.encode() + b"\0" + (store / "sid" / name).read_bytes() + b"\0")
    assert saved["sid"] == digest.hexdigest()
    assert verify_run(out, require_finished=True)[1].model.name == "r2led"

    n = SidTable.load(store / "sid").n_items
    shutil.copytree(store / "sid", tmp_path / "old_sid")
    SidTable.from_codes(np.stack([np.arange(n) % 2, np.arange(n) % 7], axis=1), {"encoder": "other"}).save(
        store / "sid"
    )
    before = snapshot(out)
    assert_refused(cli("evaluate", str(out)), "SID table", "was rebuilt", "retrain")
    assert_refused(cli(*train_args(store, out, "r2led", "--resume", settings=R2LED)), "was rebuilt")
    with pytest.raises(DataError, match="rebuilt"):
        verify_run(out, require_finished=False)
    assert snapshot(out) == before
    shutil.rmtree(store / "sid")
    shutil.copytree(tmp_path / "old_sid", store / "sid")  # the old table again: the run is usable again
    assert cli("evaluate", str(out)).exit_code == 0


def test_din_runs_record_no_sid_and_refuse_other_data(store, din_run):
    assert yaml.safe_load((din_run / "config.yaml").read_text())["fingerprints"]["sid"] is None
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "prepare_seconds": -1.0}))
    assert_refused(cli("evaluate", str(din_run)), "not what", "was trained on")


def test_a_run_without_fingerprints_or_data_is_refused(store, din_run):
    tree = yaml.safe_load((din_run / "config.yaml").read_text())
    shutil.rmtree(store)
    assert_refused(cli("evaluate", str(din_run)), "no longer exists")
    del tree["fingerprints"]  # as an older r2led wrote it
    (din_run / "config.yaml").write_text(yaml.safe_dump(tree))
    assert_refused(cli("evaluate", str(din_run)), "records no data fingerprints", "retrain")


def test_unfinished_runs_say_how_to_finish(store, din_run):
    (din_run / "metrics.json").unlink()
    with pytest.raises(CheckpointError, match="unfinished.*--resume"):
        verify_run(din_run, require_finished=True)
    verify_run(din_run, require_finished=False)
    (din_run / "best.pt").unlink()
    assert_refused(cli("evaluate", str(din_run)), "no best.pt", "--resume")


@pytest.mark.parametrize(
    "text,phrase",
    [("data: [unclosed\n", "config.yaml is corrupt"), ("- a list\n", "config.yaml is corrupt"), (None, "model.k")],
)
def test_a_corrupt_config_yaml_is_one_line(store, din_run, text, phrase):
    if text is None:  # valid YAML, invalid value
        tree = yaml.safe_load((din_run / "config.yaml").read_text())
        tree["model"]["name"], tree["model"]["k"] = "r2led", -4
        text = yaml.safe_dump(tree)
    (din_run / "config.yaml").write_text(text)
    assert_refused(cli("evaluate", str(din_run)), phrase)
    assert_refused(cli(*train_args(store, din_run, "din", "--resume")), phrase)
    assert (din_run / "config.yaml").read_text() == text


# ---- 3. run files are written atomically -----------------------------------------------------
def test_a_full_disk_leaves_the_previous_run_files_intact(store, din_run, monkeypatch):
    """ENOSPC on flushing any run file after config.yaml: the old files stay, no staging files."""
    import r2led.atomic as atomic

    real_fsync = os.fsync

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isfile(target) and "config.yaml" not in target and str(din_run) in target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    before = snapshot(din_run)
    res = cli(*train_args(store, din_run, "din", "--resume", "--set", "train.epochs=2"))
    assert_refused(res, "No space left on device")
    after = snapshot(din_run)
    assert {k: v for k, v in after.items() if k not in ("config.yaml", "train.log")} == {
        k: v for k, v in before.items() if k not in ("config.yaml", "train.log")
    }
    assert not [p for p in din_run.iterdir() if ".staging-" in p.name]


# ---- 4. divergence stops at once -------------------------------------------------------------
def _after_first_evaluation(monkeypatch, action):
    """Run ``action(trainer, calls)`` on each evaluation after the first."""
    original = trainer_module.Trainer._checkpoint
    calls = []

    def checkpoint(self, *args):
        calls.append(args)
        if len(calls) > 1:
            action(self)
        return original(self, *args)

    monkeypatch.setattr(trainer_module.Trainer, "_checkpoint", checkpoint)
    return calls


def _model_of(path):
    return load_checkpoint(path)["model"]


def test_a_non_finite_loss_stops_training_with_the_setting_to_change(store, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    assert cli(*train_args(store, ref)).exit_code == 0  # epoch 1 alone
    original = trainer_module.Trainer._checkpoint
    armed = []

    def checkpoint(self, *args):
        result = original(self, *args)
        steps = []
        self.model.register_forward_hook(
            lambda mod, inp, out: (steps.append(1), out * float("nan") if mod.training and len(steps) >= 3 else None)[1]
        )
        armed.append(1)
        return result

    monkeypatch.setattr(trainer_module.Trainer, "_checkpoint", checkpoint)
    out = tmp_path / "run"
    res = cli(*train_args(store, out, "din", "--set", "train.epochs=3", "--set", "train.patience=5"))
    assert_refused(res, "diverged at epoch 2, step 3", "the loss is nan", "lower train.lr, now 0.01")
    assert len(armed) == 1 and not (out / "metrics.json").exists()
    # the checkpoints are the ones from epoch 1
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    for name in ("best.pt", "last.pt"):
        a, b = _model_of(ref / name), _model_of(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_non_finite_parameters_stop_before_scikit_learn(store, tmp_path, monkeypatch):
    def poison(trainer):
        with torch.no_grad():
            next(trainer.model.parameters()).fill_(float("inf"))

    _after_first_evaluation(monkeypatch, poison)
    out = tmp_path / "run"
    res = cli(
        *train_args(store, out, "din", "--set", "train.epochs=3", "--set", "train.patience=5", "--set", "train.lr=0.05")
    )
    assert_refused(res, "diverged by epoch 2", "not finite", "lower train.lr, now 0.05")
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert torch.isfinite(torch.cat([t.flatten().float() for t in _model_of(out / "best.pt").values()])).all()
