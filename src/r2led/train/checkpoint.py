"""Checkpoints: tensors and plain containers only, written atomically, read without running code.

A checkpoint is a dict of tensors, numbers, strings, ``None`` and lists/tuples/dicts of them
(the model's and the optimiser's state dicts, positions, metrics, the configuration). The
random-number states are stored in that form too (:func:`rng_state`). Files are read with
``torch.load(..., weights_only=True)``, which refuses any other object: a crafted pickle
cannot run code under ``r2led evaluate`` or ``r2led train --resume``.

A run's resumable state is one :class:`TrainState` (epoch, data position, early-stopping state,
history, RNG and optimiser states), saved with the model's weights as one checkpoint
(``last.pt``) and restored as a unit.
"""

from __future__ import annotations

import pickle
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from r2led.atomic import staged_file
from r2led.errors import CheckpointError, one_line

# Exact types: numpy scalars subclass float/int but would be refused on loading.
_SCALARS = (bool, int, float, str, type(None))
_MAPPINGS = (dict, OrderedDict)  # state_dict() returns an OrderedDict
_SEQUENCES = (list, tuple)


def _check_plain(obj: object, where: str = "state") -> None:
    """Raise TypeError at the first value that ``weights_only`` loading would refuse."""
    if type(obj) in _SCALARS or isinstance(obj, torch.Tensor):
        return
    if type(obj) in _MAPPINGS:
        for key, value in obj.items():
            _check_plain(key, f"{where} key")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if type(obj) in _SEQUENCES:
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint value {where} is a {type(obj).__name__}: only tensors and plain containers are saved")


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` (tensors and plain containers only) to ``path`` atomically."""
    _check_plain(state)
    with staged_file(path) as tmp:  # straight to disk: no second in-memory copy of model + Adam state
        torch.save(state, tmp)


def _reason(exc: BaseException) -> str:
    """The informative line of a loading error (torch's weights-only errors span many lines)."""
    text = str(exc)
    for line in text.splitlines():
        if "GLOBAL" in line:  # "Unsupported global: GLOBAL x.y was not ..." / "... unsupported GLOBAL posix.system ..."
            return line.strip().split(" was not an allowed global")[0][:160]
    return one_line(text, 160) or type(exc).__name__


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint safely (``weights_only=True``); one-line ``CheckpointError`` on failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused an object: never run it
        reason = _reason(exc)
        if "GLOBAL" in reason:
            raise CheckpointError(
                f"refusing {path}: it holds objects other than tensors and plain data ({reason}); "
                "retrain if an older r2led wrote it"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a r2led checkpoint ({reason})") from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a r2led checkpoint ({_reason(exc)})") from None
    if not isinstance(state, dict) or "model" not in state:
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} has no model state (keys: {keys})")
    return state


# ---- random-number states as plain data ---------------------------------------------------
def rng_state() -> dict:
    """torch's, numpy's (legacy global) and python's RNG states as tensors and plain lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),  # (5056,) uint8
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # (624,) MT19937 words
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "words": [int(w) for w in words], "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    """Restore the states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"]), py["gauss_next"]))


# ---- the trainer's resumable state ----------------------------------------------------------
# last.pt key -> TrainState attribute (``batch``: the name the files have always used)
_STATE_KEYS = {
    "epoch": "epoch",
    "batch": "step",
    "best_auc": "best_auc",
    "bad_evals": "bad_evals",
    "history": "history",
    "train_seconds": "train_seconds",
    "samples_seen": "samples_seen",
    "rng": "rng",
    "optimizer": "optimizer",
}


@dataclass
class TrainState:
    """Everything a training run needs to continue exactly where it stopped.

    The data position is (``epoch``, ``step``): the batch order of an epoch is a function of the
    seed and the epoch (``data.batches``), so the next batch is batch ``step`` of epoch
    ``epoch``. ``rng`` and ``optimizer`` are filled by :meth:`save` (the states at that moment)
    and applied by :meth:`load`.
    """

    epoch: int = 0  # epochs finished
    step: int = 0  # batches of ``epoch`` done
    best_auc: float = -1.0  # best valid AUC so far (-1: none yet)
    bad_evals: int = 0  # evaluations since the best one (early stopping's patience counter)
    history: list = field(default_factory=list)  # valid metrics at every evaluation
    train_seconds: float = 0.0  # time in training steps (evaluations excluded)
    samples_seen: int = 0  # training samples over all ranks
    rng: dict = field(default_factory=dict)  # rng_state() when saved
    optimizer: dict = field(default_factory=dict)  # the optimiser's state_dict when saved

    def save(self, path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict) -> None:
        """Capture the RNG and optimiser states now and write this state with the model's
        weights and ``config`` as one checkpoint (atomically, plain data only)."""
        self.rng, self.optimizer = rng_state(), optimizer.state_dict()
        state = {key: getattr(self, attr) for key, attr in _STATE_KEYS.items()}
        save_checkpoint({"model": model.state_dict(), **state, "config": config}, path)

    @classmethod
    def load(cls, path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
        """Read ``path`` (safely), restore the model's weights, the optimiser's state and the
        RNG states from it, and return the state; a one-line ``CheckpointError`` when it is not
        a resumable checkpoint."""
        ckpt = load_checkpoint(path)
        missing = [key for key in _STATE_KEYS if key not in ckpt]
        if missing:
            raise CheckpointError(f"checkpoint {path} is not resumable: it has no {', '.join(missing)}")
        state = cls(**{attr: ckpt[key] for key, attr in _STATE_KEYS.items()})
        try:  # the right keys with foreign contents: another model's weights, a mangled state
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(state.optimizer)
            set_rng_state(state.rng)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {one_line(exc, 160)}") from None
        return state
