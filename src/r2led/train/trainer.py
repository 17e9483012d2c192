"""The training recipe: data + model + optimiser + early stopping + checkpoints (+ DDP).

A run folder holds::

    config.yaml     the resolved configuration (with the data folder)
    train.log       the log
    history.json    valid metrics at every evaluation
    last.pt         resumable state (model, optimiser, position, RNG, early-stopping state)
    best.pt         the model with the best valid AUC, reloaded before the test split
    metrics.json    {"valid": {auc, logloss, gauc}, "test": {...}, "seconds": ..., ...}
    test_pred.npy   the best model's test probabilities, in split order (for paired tests)

Everything is checked before anything is written (see ``r2led.train.run_folder``): the data,
the SID table, the model, and what training into ``out`` means (new, ``resume``, ``force``).
``config.yaml`` (with the data's fingerprints) is written when training starts; every file
but the log is written atomically; checkpoints hold only tensors and plain data. Training
that diverges (a non-finite loss or parameters) stops at once with :class:`TrainingDiverged`;
the checkpoints from before stay as they were.

Started by ``torchrun --nproc_per_node N``, each process trains on its shard of the sample table
under DistributedDataParallel with ``batch_size / N`` samples a step (the global batch and the
learning rate do not depend on N), evaluates its shard (predictions gathered for the metrics);
rank 0 checkpoints and writes the run folder. See ``r2led.train.distributed``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from r2led.atomic import staged_file, write_json_atomic
from r2led.config import RunConfig
from r2led.data.batches import BatchIterator
from r2led.data.store import LifelongStore
from r2led.errors import R2ledError
from r2led.models.registry import build_model, model_class
from r2led.models.spec import DataSpec
from r2led.sid.table import SidTable
from r2led.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from r2led.train.distributed import Distributed, configure_threads, local_batch_size, shard_store
from r2led.train.memory import EVAL_TOKENS, check_memory, tune_allocator
from r2led.train.metrics import ctr_metrics
from r2led.train.run_folder import (  # noqa: F401  (read_run_config: re-exported for callers)
    check_run_folder,
    clear_run_folder,
    fingerprints,
    read_run_config,
    verify_run,
    write_run_config,
)

log = logging.getLogger("r2led.train")


class TrainingDiverged(R2ledError):
    """The loss or the parameters became non-finite; the setting to change is in the message."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, train) -> torch.optim.Optimizer:
    """The trainer's optimiser for ``model`` under the ``train`` settings (``TrainConfig``)."""
    return torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)


def train_step(net: torch.nn.Module, model, optimizer: torch.optim.Optimizer, batch) -> float:
    """One optimisation step on ``batch``: forward, loss, backward, optimiser step; returns the
    loss. A non-finite loss is returned before anything is updated (the caller stops).

    ``net`` is the module called (``model`` or its DistributedDataParallel wrapper), ``model``
    the one whose ``loss`` is used. The trainer, ``r2led bench train-speed`` and ``bench speed``
    all time this.
    """
    # after an evaluation (train() clears the models' kept values). Evaluation puts ``model``
    # in eval mode, not a DDP wrapper around it, whose own flag stays True: check the model.
    if not (net.training and model.training):
        net.train()
    loss = model.loss(batch, net(batch))
    value = loss.item()
    if not math.isfinite(value):
        return value
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return value


def load_sid(store: LifelongStore, cfg: RunConfig) -> SidTable | None:
    """The run's SID table when its model uses one."""
    if not model_class(cfg.model.name).wants_sid(cfg.model):
        return None
    return SidTable.load(store.root / cfg.sid, n_items=store.n_items)


@torch.no_grad()
def predict(
    model: torch.nn.Module, store: LifelongStore, sample_idx: np.ndarray, batch_size: int, t_max: int
) -> np.ndarray:
    """Click probabilities for samples, in the order given (batched by history length)."""
    model.eval()
    order = np.argsort(store.history_lengths(sample_idx, t_max), kind="stable")
    out = np.empty(len(sample_idx), dtype=np.float64)
    it = BatchIterator(store, sample_idx[order], batch_size, t_max, max_tokens=EVAL_TOKENS)
    pos = 0
    for batch in it:
        n = len(batch)
        out[order[pos : pos + n]] = torch.sigmoid(model(batch)).double().numpy()
        pos += n
    return out


def evaluate_split(
    model,
    store: LifelongStore,
    split: str,
    cfg: RunConfig,
    limit: int | None = None,
    predictions: Path | None = None,
    d: Distributed | None = None,
) -> dict:
    """AUC / LogLoss / GAUC of ``model`` on a whole split (or its first ``limit`` samples).

    ``predictions``: also save the probabilities there (``.npy``, in split order), so that
    runs can be compared row by row (significance tests).
    """
    d = d or Distributed()
    idx = store.split_indices(split)
    if d.world == 1 and limit is not None and limit < len(idx):  # with ranks, the shards are cut already
        idx = idx[:limit]
    t0 = time.perf_counter()
    prob = predict(model, store, idx, cfg.train.eval_batch_size, cfg.train.t_max)
    seconds = time.perf_counter() - t0
    s = store.sample_arrays
    # every rank scored its shard; all predictions, in split order, for the metrics
    prob, label, user = d.gather(prob, s["label"][idx], s["user"][idx])
    bad = int(np.count_nonzero(~np.isfinite(prob)))
    if bad:  # scikit-learn would fail later with a less helpful message
        raise TrainingDiverged(f"the model's predictions on {split} are not finite ({bad:,} of {len(prob):,} samples)")
    if not d.main:  # every rank checked the predictions (they stop together); only rank 0 uses the metrics
        return {}
    if predictions is not None:
        with staged_file(predictions) as tmp:
            np.save(tmp, prob.astype(np.float32))
    metrics = ctr_metrics(label, prob, user)
    metrics["samples"] = int(len(prob))
    metrics["samples_per_s"] = round(len(prob) / max(seconds, 1e-9), 1)
    return metrics


class Trainer:
    """Fits one model on one store; see the module docstring for what it writes."""

    def __init__(
        self,
        data: str | Path,
        cfg: RunConfig,
        out: str | Path,
        resume: bool = False,
        show_progress: bool = True,
        force: bool = False,
        max_memory: str | int | None = None,
    ):
        """Check the data, the SID table and the run folder, and build the model; writes nothing.

        ``resume``: continue ``out`` (same settings and data; ``train.epochs`` may grow).
        ``force``: replace the run in ``out`` (cleared when training starts).
        ``max_memory``: memory to allow (``"8GB"``) instead of what is available now; a run
        estimated to need more is refused before anything is allocated (``train.memory``).
        """
        self.cfg, self.out, self.resume = cfg, Path(out), resume
        self.show_progress = show_progress
        self.dist = Distributed.from_env()
        self.threads = configure_threads(cfg.train.threads, self.dist)
        tune_allocator()  # training reuses its step buffers instead of faulting them in each step
        seed_everything(cfg.train.seed)
        self.store = LifelongStore(data)
        self.fingerprints = fingerprints(self.store.root, cfg)
        # every rank checks (read-only); building DDP below syncs the ranks before rank 0 writes
        self.action = check_run_folder(self.out, self.store.root, cfg, self.fingerprints, resume=resume, force=force)
        self.sid = load_sid(self.store, cfg)
        check_memory(
            cfg,
            self.store.manifest,
            self.sid.vocab_sizes if self.sid else None,
            max_memory,
            world=self.dist.world,
            local=self.dist.local_world,
        )
        self.spec = DataSpec.from_store(self.store)
        self.model = build_model(cfg.model, self.spec, self.sid)
        self.ddp = None
        if self.dist.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = make_optimizer(self.model, cfg.train)
        if self.dist.world > 1:  # this rank's shard of each split (train cut to equal shards)
            self.store = shard_store(self.store, self.dist, cfg.train.max_train_samples, cfg.train.max_eval_samples)
        self.train_idx = self.store.split_indices("train")
        if cfg.train.max_train_samples and self.dist.world == 1:
            self.train_idx = self.train_idx[: cfg.train.max_train_samples]
        self._log_handler: logging.Handler | None = None

    def _start_run_folder(self) -> None:
        """Training starts: clear the folder (``force``), write ``config.yaml``, open the log."""
        if not self.dist.main:
            return
        if self.action == "replace":
            clear_run_folder(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        write_run_config(self.out, self.store.root, self.cfg, self.fingerprints)
        self._log_handler = logging.FileHandler(self.out / "train.log")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.setLevel(logging.INFO)

    def _evaluate(self, split: str, predictions: Path | None = None) -> dict:
        return evaluate_split(
            self.model, self.store, split, self.cfg, self.cfg.train.max_eval_samples, predictions, self.dist
        )

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> dict:
        """Train, early-stop on valid AUC, evaluate the best checkpoint on test; returns metrics."""
        last = self.out / "last.pt"
        resumed = self.action == "resume" and last.is_file()
        state = TrainState.load(last, self.model, self.optimizer) if resumed else TrainState()  # before writing
        self._start_run_folder()
        handler = self._log_handler
        if handler is not None:  # this run's log file, for this fit only (several runs per process)
            log.addHandler(handler)
        try:
            if resumed:
                log.info(
                    "resumed from %s at epoch %d batch %d (best valid AUC %.4f)",
                    last,
                    state.epoch,
                    state.step,
                    state.best_auc,
                )
            return self._fit(state)
        finally:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()

    def _fit(self, state: TrainState) -> dict:
        tc = self.cfg.train
        t_start = time.perf_counter()
        net = self.ddp or self.model
        batches = BatchIterator(
            self.store,
            self.train_idx,
            local_batch_size(tc.batch_size, self.dist),
            tc.t_max,
            shuffle=True,
            seed=tc.seed,
            bucket=tc.bucket,  # the store is this rank's shard (equal sizes: equal step counts)
        )
        stop = state.bad_evals > tc.patience
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not (self.show_progress and self.dist.main),
            transient=False,
        )
        with progress:
            while state.epoch < tc.epochs and not stop:
                batches.epoch = state.epoch
                n_batches = len(batches)
                eval_points = {round(n_batches * (i + 1) / tc.evals_per_epoch) for i in range(tc.evals_per_epoch)}
                task = progress.add_task(
                    f"epoch {state.epoch + 1}/{tc.epochs}", total=n_batches, completed=state.step, info=""
                )
                running, t_seg = None, time.perf_counter()
                for batch in batches.iter_from(state.step):  # the data position: batches before it are not built
                    value = train_step(net, self.model, self.optimizer, batch)
                    if not math.isfinite(value):  # stopped before the step: the checkpoints stay as they were
                        raise TrainingDiverged(
                            f"training diverged at epoch {state.epoch + 1}, step {state.step + 1}: the loss is "
                            f"{value}; lower train.lr, now {tc.lr:g}"
                        )
                    state.step += 1
                    state.samples_seen += len(batch) * self.dist.world
                    running = value if running is None else 0.98 * running + 0.02 * value
                    progress.update(task, advance=1, info=f"loss {running:.4f}")
                    if state.step in eval_points:
                        state.train_seconds += time.perf_counter() - t_seg
                        stop = self._checkpoint(state, n_batches)
                        t_seg = time.perf_counter()
                        if stop:
                            break
                if state.step >= n_batches:  # an epoch without batches (the checkpoint moves on otherwise)
                    state.epoch, state.step = state.epoch + 1, 0
        return self._finish(
            state.best_auc, state.history, state.train_seconds, state.samples_seen, time.perf_counter() - t_start
        )

    def _checkpoint(self, state: TrainState, n_batches: int) -> bool:
        """Evaluate on valid (rank 0), keep the best model, save the resumable state (at the end
        of an epoch: the start of the next), decide to stop. Returns whether to stop."""
        epoch, batch = state.epoch, state.step
        # every rank: the replicas are identical, so all ranks stop together
        broken = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if broken:
            raise TrainingDiverged(
                f"training diverged by epoch {epoch + 1}, step {batch}: {len(broken)} parameter tensors are not "
                f"finite (first {broken[0]}); lower train.lr, now {self.cfg.train.lr:g}"
            )
        metrics = self._evaluate("valid")  # every rank scores its shard; rank 0 gets the metrics
        if batch >= n_batches:  # the epoch is done: the position is the next epoch's start
            state.epoch, state.step = epoch + 1, 0
        stop = False
        if self.dist.main:
            metrics.update(epoch=epoch + batch / n_batches, train_seconds=round(state.train_seconds, 1))
            state.history.append(metrics)
            improved = metrics["auc"] > state.best_auc
            if improved:
                state.best_auc, state.bad_evals = metrics["auc"], 0
                save_checkpoint(
                    {
                        "model": self.model.state_dict(),
                        "config": self.cfg.model_dump(),
                        "spec": self.spec.to_dict(),
                        "valid": metrics,
                    },
                    self.out / "best.pt",
                )
            else:
                state.bad_evals += 1
            stop = state.bad_evals > self.cfg.train.patience
            state.save(self.out / "last.pt", self.model, self.optimizer, self.cfg.model_dump())
            write_json_atomic(self.out / "history.json", state.history)
            log.info(
                "epoch %.2f valid auc %.4f logloss %.4f gauc %.4f%s",
                metrics["epoch"],
                metrics["auc"],
                metrics["logloss"],
                metrics["gauc"],
                " (best)" if improved else "",
            )
        self.dist.barrier()
        return self.dist.broadcast_flag(stop)

    def _finish(self, best, history, train_seconds, seen, seconds) -> dict:
        result: dict = {}
        valid = None
        if self.dist.main:
            state = load_checkpoint(self.out / "best.pt")
            self.model.load_state_dict(state["model"])
            valid = state["valid"]
        self.dist.broadcast_module(self.model)  # the best model on every rank, for its test shard
        test = self._evaluate("test", predictions=self.out / "test_pred.npy" if self.dist.main else None)
        if self.dist.main:
            result = {
                "model": self.cfg.model.name,
                "seed": self.cfg.train.seed,
                "valid": {k: valid[k] for k in ("auc", "logloss", "gauc")},
                "test": {k: test[k] for k in ("auc", "logloss", "gauc")},
                "seconds": round(seconds, 1),
                "train_seconds": round(train_seconds, 1),
                "train_samples_per_s": round(seen / max(train_seconds, 1e-9), 1),
                "eval_samples_per_s": test["samples_per_s"],
                "best_epoch": max(history, key=lambda m: m["auc"])["epoch"] if history else None,
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "processes": self.dist.world,
            }
            write_json_atomic(self.out / "metrics.json", result)
            log.info("test auc %.4f logloss %.4f gauc %.4f", test["auc"], test["logloss"], test["gauc"])
        self.dist.barrier()
        return result


def load_run(run: str | Path) -> tuple[torch.nn.Module, LifelongStore, RunConfig]:
    """A run's best model, its store and its configuration (for evaluate / export).

    The run is verified first (:func:`verify_run`): a readable ``config.yaml``, a ``best.pt``,
    and the data and SID table it was trained on, unchanged.
    """
    run = Path(run)
    data, cfg = verify_run(run, require_finished=False)
    store = LifelongStore(data)
    model = build_model(cfg.model, DataSpec.from_store(store), load_sid(store, cfg))
    state = load_checkpoint(run / "best.pt")
    model.load_state_dict(state["model"])
    return model, store, cfg
