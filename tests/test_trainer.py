"""The training recipe on the tiny store: metrics, determinism, resume, errors, CLI."""

import json

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from r2led.cli import app
from r2led.config import load_config
from r2led.data.batches import BatchIterator
from r2led.errors import CheckpointError, ConfigError
from r2led.train.checkpoint import TrainState, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from r2led.train.metrics import ctr_metrics, gauc
from r2led.train.trainer import Trainer, TrainingDiverged, predict, train_step

FAST = [
    "train.lr=0.01",
    "train.batch_size=64",
    "train.eval_batch_size=256",
    "train.t_max=64",
    "model.k=5",
    "model.dim=16",
    "train.threads=1",
]


def fit(store, out, *overrides, resume=False):
    cfg = load_config(None, [*FAST, *overrides])
    return Trainer(store.root, cfg, out, resume=resume, show_progress=False).fit()


def test_gauc_equals_weighted_mean_of_per_user_auc():
    rng = np.random.default_rng(0)
    user = rng.integers(0, 20, 2000)
    label = rng.integers(0, 2, 2000)
    score = np.round(rng.random(2000) + 0.3 * label, 2)  # rounded: ties inside users
    num = den = 0.0
    for u in np.unique(user):
        m = user == u
        if 0 < label[m].sum() < m.sum():
            num += roc_auc_score(label[m], score[m]) * m.sum()
            den += m.sum()
    assert gauc(user, label, score) == pytest.approx(num / den, abs=1e-12)


def test_ctr_metrics_values():
    m = ctr_metrics(np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.8, 0.3]), np.array([0, 0, 1, 1]))
    assert m["auc"] == 1.0 and m["gauc"] == 1.0
    assert m["logloss"] == pytest.approx(-np.mean(np.log([0.9, 0.9, 0.8, 0.7])))


def test_training_learns_the_tiny_task_and_writes_the_run_folder(tiny_store, tmp_path):
    result = fit(tiny_store, tmp_path / "run", "train.epochs=3")
    for name in ("config.yaml", "train.log", "history.json", "best.pt", "last.pt", "metrics.json"):
        assert (tmp_path / "run" / name).is_file(), name
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["test"]) == {"auc", "logloss", "gauc"} and metrics["seconds"] > 0
    # users rate their preferred item group high: the history makes this learnable
    assert metrics["valid"]["auc"] > 0.75 and metrics["test"]["auc"] > 0.75
    assert metrics == result


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_store, tmp_path):
    a = fit(tiny_store, tmp_path / "a", "train.epochs=1", "train.seed=3")
    b = fit(tiny_store, tmp_path / "b", "train.epochs=1", "train.seed=3")
    c = fit(tiny_store, tmp_path / "c", "train.epochs=1", "train.seed=4")
    assert a["test"] == b["test"]
    assert a["test"]["auc"] != c["test"]["auc"]


def test_resume_continues_to_the_same_result(tiny_store, tmp_path):
    full = fit(tiny_store, tmp_path / "full", "train.epochs=2", "train.patience=5")
    fit(tiny_store, tmp_path / "part", "train.epochs=1", "train.patience=5")
    state = load_checkpoint(tmp_path / "part" / "last.pt")
    assert state["epoch"] == 1 and state["batch"] == 0
    resumed = fit(tiny_store, tmp_path / "part", "train.epochs=2", "train.patience=5", resume=True)
    assert resumed["test"] == full["test"]
    assert len(json.loads((tmp_path / "part" / "history.json").read_text())) == 2


def test_interrupted_run_resumed_mid_epoch_equals_the_uninterrupted_run(tiny_store, tmp_path):
    """Killed after the first of three evaluations of epoch 1 (of 2), then resumed: the same
    final weights, optimiser state, history and metrics as a run that was never stopped."""
    settings = ["train.epochs=2", "train.evals_per_epoch=3", "train.patience=5"]
    full = fit(tiny_store, tmp_path / "full", *settings)
    trainer = Trainer(tiny_store.root, load_config(None, [*FAST, *settings]), tmp_path / "part", show_progress=False)
    original = trainer._checkpoint

    def killed_after_first_evaluation(*args):
        original(*args)
        raise KeyboardInterrupt

    trainer._checkpoint = killed_after_first_evaluation
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    part = load_checkpoint(tmp_path / "part" / "last.pt")
    assert part["epoch"] == 0 and 0 < part["batch"] < len(trainer.train_idx) / 64  # mid-epoch
    resumed = fit(tiny_store, tmp_path / "part", *settings, resume=True)
    assert {k: resumed[k] for k in ("valid", "test", "best_epoch")} == {
        k: full[k] for k in ("valid", "test", "best_epoch")
    }
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["batch"] == b["batch"] == 0
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    adam_a, adam_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert adam_a.keys() == adam_b.keys()
    assert all(torch.equal(adam_a[i][n], adam_b[i][n]) for i in adam_a for n in adam_a[i])
    strip = [{k: v for k, v in m.items() if k not in ("train_seconds", "samples_per_s")} for m in a["history"]]
    assert strip == [{k: v for k, v in m.items() if k not in ("train_seconds", "samples_per_s")} for m in b["history"]]
    assert len(a["history"]) == 6 and a["samples_seen"] == b["samples_seen"] == 2 * len(trainer.train_idx)


def test_train_state_is_saved_and_restored_as_a_unit(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = TrainState(epoch=2, step=7, best_auc=0.81, bad_evals=1, history=[{"auc": 0.81}], samples_seen=448)
    state.save(tmp_path / "last.pt", model, opt, {"model": {"name": "x"}})
    expected_draw, expected_weight = torch.rand(2), model.weight.detach().clone()
    other = torch.nn.Linear(3, 1)
    other_opt = torch.optim.Adam(other.parameters(), lr=0.1)
    torch.manual_seed(5)
    loaded = TrainState.load(tmp_path / "last.pt", other, other_opt)
    assert (loaded.epoch, loaded.step, loaded.best_auc, loaded.bad_evals) == (2, 7, 0.81, 1)
    assert loaded.history == [{"auc": 0.81}] and loaded.samples_seen == 448
    assert torch.equal(other.weight, expected_weight) and torch.equal(torch.rand(2), expected_draw)  # RNG as saved
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert load_checkpoint(tmp_path / "last.pt")["batch"] == 7  # the key earlier runs' files use
    save_checkpoint({"model": model.state_dict(), "epoch": 1}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=r"best.pt is not resumable: it has no batch, best_auc"):
        TrainState.load(tmp_path / "best.pt", other, other_opt)
    wider = torch.nn.Linear(5, 1)  # the right keys, another model's weights: one line, not a traceback
    with pytest.raises(CheckpointError, match=r"last.pt does not fit this run: Error\(s\) in loading state_dict"):
        TrainState.load(tmp_path / "last.pt", wider, torch.optim.Adam(wider.parameters()))


def test_a_non_finite_loss_stops_before_the_step(tiny_store, tmp_path):
    trainer = Trainer(tiny_store.root, load_config(None, FAST), tmp_path / "run", show_progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.loss = lambda batch, logits: logits.sum() * float("nan")
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1: the loss is nan"):
        trainer.fit()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_step_after_evaluation_trains_the_model_inside_a_wrapper(tiny_store, tmp_path):
    # DDP wraps the model: evaluation puts the model in eval mode, not the wrapper, whose own
    # flag stays True. The next step must still train the model (dropout on, kept values cleared).
    trainer = Trainer(tiny_store.root, load_config(None, FAST), tmp_path / "run", show_progress=False)
    model = trainer.model
    wrapper = torch.nn.Sequential(model)  # stands in for DistributedDataParallel(model)
    valid = tiny_store.split_indices("valid")[:50]
    predict(model, tiny_store, valid, 64, 64)
    assert wrapper.training and not model.training
    batch = next(iter(BatchIterator(tiny_store, tiny_store.split_indices("train")[:64], 64, 64)))
    train_step(wrapper, model, torch.optim.Adam(model.parameters()), batch)
    assert model.training and all(m.training for m in model.modules())


def test_early_stopping_stops_on_valid_auc(tiny_store, tmp_path):
    # lr 0 never improves: the first evaluation is the best, patience 0 stops at the second
    result = fit(tiny_store, tmp_path / "run", "train.epochs=5", "train.patience=0", "train.lr=1e-12")
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 2 and result["best_epoch"] == 1.0


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="last.pt is corrupt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="no model state"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_checkpoints_are_plain_data_both_ways(tmp_path):
    """save_checkpoint refuses what a weights-only load would refuse; load_checkpoint refuses
    (without running it) a pickled object, naming the file."""
    with pytest.raises(TypeError, match=r"state\['valid'\]\['auc'\] is a float64"):
        save_checkpoint({"model": {}, "valid": {"auc": np.float64(0.5)}}, tmp_path / "best.pt")
    assert not list(tmp_path.iterdir())  # nothing written
    torch.save({"model": {}, "when": __import__("datetime").date(2026, 1, 1)}, tmp_path / "object.pt")
    with pytest.raises(
        CheckpointError, match=r"refusing .*object.pt: it holds objects other than tensors.*GLOBAL datetime.date"
    ):
        load_checkpoint(tmp_path / "object.pt")
    state = {"model": {"w": torch.ones(2)}, "rng": rng_state(), "history": [{"auc": 0.5}], "pair": (1, "a", None)}
    save_checkpoint(state, tmp_path / "plain.pt")
    loaded = load_checkpoint(tmp_path / "plain.pt")
    assert torch.equal(loaded["model"]["w"], torch.ones(2)) and loaded["pair"] == (1, "a", None)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    import random

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    save_checkpoint({"model": {}, "rng": rng_state()}, tmp_path / "last.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.standard_normal(3), expected[1]) and random.random() == expected[2]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.rho=1.5"], "model.rho"),
        (["model.rhoo=0.5"], "model.rhoo"),
        (["model.name=nope"], "unknown model 'nope'"),
        (["train.lr=-1"], "train.lr"),
        (["model.route_fusion=max"], "model.route_fusion"),
        (["model.k=0.5"], "model.k"),
        (["model.name=din", "model.rho=0.5"], "model.rho"),  # a field din does not have
        (["rho"], "KEY=VALUE"),
    ],
)
def test_invalid_config_values_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: r2led\n  rho: 0.25\n  gate: off\ntrain:\n  lr: 0.01\n")
    cfg = load_config([path], ["train.lr=0.002"])
    assert cfg.model.rho == 0.25 and cfg.model.gate is False and cfg.train.lr == 0.002


def test_cli_train_and_evaluate(tiny_store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["train", str(tiny_store.root), "--model", "din", "--out", str(out), "--seed", "1"]
    for o in [*FAST[:-3], "train.epochs=1"]:
        args += ["--set", o]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "AUC" in res.output
    res = runner.invoke(app, ["evaluate", str(out), "--split", "test"])
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "eval_test.json").read_text())
    assert saved["auc"] == pytest.approx(json.loads((out / "metrics.json").read_text())["test"]["auc"])


def test_each_run_logs_to_its_own_file(tiny_store, tmp_path):
    fit(tiny_store, tmp_path / "one", "train.epochs=1")
    fit(tiny_store, tmp_path / "two", "train.epochs=1")
    one = (tmp_path / "one" / "train.log").read_text()
    two = (tmp_path / "two" / "train.log").read_text()
    assert one.count("test auc") == 1 and two.count("test auc") == 1


def test_run_folder_keeps_model_specific_settings(tiny_store, tmp_path):
    """config.yaml and the checkpoints hold the model's own fields (rho, gate, ...), so that
    load_run rebuilds the ablation that was trained, not the default model."""
    from r2led.train.trainer import load_run

    fit(tiny_store, tmp_path / "run", "train.epochs=1", "model.rho=0.25", "model.gate=off", "model.routes=2")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert saved["rho"] == 0.25 and saved["gate"] is False and saved["routes"] == 2
    assert load_checkpoint(tmp_path / "run" / "best.pt")["config"]["model"]["rho"] == 0.25
    model, _, cfg = load_run(tmp_path / "run")
    assert cfg.model.rho == 0.25 and model.gate.proj is None and model.n_routes == 2


def test_default_config_is_the_r2led_config():
    cfg = load_config(None, [])
    assert type(cfg.model).__name__ == "R2ledConfig" and cfg.model.rho == 0.75 and cfg.model.disjoint_routes
