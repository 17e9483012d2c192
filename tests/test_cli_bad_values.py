"""Every command refuses a bad value with exit code 2, a short message and no traceback.

The table drives the real command line (``typer.testing.CliRunner`` on ``r2led.cli.app``) with a
bad value for each command and option. Each case names a phrase its message must contain, so
that a case cannot pass by failing for some other reason. Usage errors (typer's own: a missing
argument, a number out of an option's ``min``/``max``) are allowed their short box; every other
refusal is exactly one line on stderr.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fast_training import FAST_SMALL as FAST
from r2led.cli import app
from r2led.cli.common import MAX_MESSAGE, error_line, one_line
from r2led.config import load_config
from r2led.errors import DataError
from r2led.train.trainer import Trainer


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(res, phrase: str) -> None:
    """Exit code 2, under 2 KB, no traceback, the phrase named; one line unless a usage box."""
    out = res.output
    assert res.exit_code == 2, f"exit {res.exit_code}: {out[-2000:]} {res.exception!r}"
    assert len(out.encode()) < 2048, out
    assert "Traceback" not in out
    assert phrase.lower() in " ".join(out.split()).lower(), out
    if res.stderr.startswith("error:"):
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.fixture(scope="module")
def din_run(tiny_store, tmp_path_factory) -> Path:
    """A finished tiny DIN run (for evaluate, export and diagnose)."""
    out = tmp_path_factory.mktemp("bad_values") / "din"
    cfg = load_config(None, FAST, base={"model": {"name": "din"}})
    Trainer(tiny_store.root, cfg, out, show_progress=False).fit()
    return out


# (arguments with {data} for the tiny store, {run} for a finished run, {tmp} for a scratch folder;
#  a phrase the message must contain)
CASES = [
    # data prepare / info
    (
        ["data", "prepare", "synthetic", "--out", "{tmp}/s", "--min-history", "-3"],
        "--min-history = -3 is out of range: must be >= 0",
    ),
    (["data", "prepare", "synthetic", "--out", "{tmp}/s", "--samples-last-n", "0"], "--samples-last-n"),
    (["data", "prepare", "synthetic", "--out", "{tmp}/s", "--label-threshold", "nan"], "--label-threshold"),
    (["data", "prepare", "synthetic", "--out", "{tmp}/s", "--users", "0"], "--users"),
    (["data", "prepare", "synthetic", "--out", "{tmp}/s", "--length", "-4"], "--length"),
    (["data", "prepare", "synthetic", "--out", "{tmp}/s", "--items", "3"], "items=3"),
    (["data", "prepare", "synthetic", "--out", "{tmp}/s", "--seed", "-1"], "--seed"),
    (["data", "prepare", "nosuch", "--out", "{tmp}/s"], "unknown dataset 'nosuch'"),
    (["data", "prepare", "taobao", "--out", "{tmp}/s"], "--path"),
    (["data", "prepare", "taobao", "--out", "{tmp}/s", "--path", "{tmp}/missing.csv"], "missing.csv"),
    (["data", "prepare", "synthetic", "--out", "{data}", "--users", "20"], "already holds a prepared store"),
    (["data", "info", "{tmp}/nothing"], "not a prepared store"),
    (["data", "info"], "Missing argument"),
    # sid build / info
    (["sid", "build", "{data}", "--levels", "0", "--out", "x"], "levels = 0 is out of range: must be in [1, 64]"),
    (["sid", "build", "{data}", "--codebook", "abc", "--out", "x"], "codebook: expected one size (16)"),
    (["sid", "build", "{data}", "--codebook", "1", "--out", "x"], "codebook.0 = 1 is out of range: must be >= 2"),
    (["sid", "build", "{data}", "--encoder", "bogus", "--out", "x"], "encoder: Input should be 'minilm'"),
    (["sid", "build", "{data}", "--quantizer", "bogus", "--out", "x"], "(got 'bogus')"),
    (["sid", "build", "{data}", "--seed", "-1", "--out", "x"], "seed = -1 is out of range"),
    (["sid", "build", "{data}", "--set", "levles=2", "--out", "x"], "levles: Extra inputs are not permitted"),
    (["sid", "build", "{data}", "--config", "{tmp}/missing.yaml"], "config file not found"),
    (["sid", "build", "{data}", "--out", "../escape"], "plain folder name"),
    (["sid", "build", "{tmp}/nothing"], "not a prepared store"),
    (["sid", "info", "{data}", "--name", "nope"], "no SID table"),
    # train
    (["train", "{data}", "--out", "{tmp}/r", "--set", "model=3"], "model: expected a section of model settings"),
    (
        ["train", "{data}", "--out", "{tmp}/r", "--set", "train.lr=1e6"],
        "train.lr = 1e6 is out of range: must be in (0, 1]",
    ),
    (
        ["train", "{data}", "--out", "{tmp}/r", "--set", "model.rho=1.5"],
        "model.rho = 1.5 is out of range: must be in [0, 1]",
    ),
    (["train", "{data}", "--out", "{tmp}/r", "--set", "train.batch_size=0"], "train.batch_size = 0 is out of range"),
    (["train", "{data}", "--out", "{tmp}/r", "--set", "train.epochs=-2"], "train.epochs"),
    (["train", "{data}", "--out", "{tmp}/r", "--set", "train.seed=-1"], "train.seed"),
    (["train", "{data}", "--out", "{tmp}/r", "--set", "train.t_max=0"], "train.t_max"),
    (
        ["train", "{data}", "--out", "{tmp}/r", "--set", "model.dim=30", "--set", "model.heads=4"],
        "heads (4) must divide dim (30)",
    ),
    (["train", "{data}", "--out", "{tmp}/r", "--set", "model.mlp=[0]"], "model.mlp"),
    (["train", "{data}", "--out", "{tmp}/r", "--set", "model.dropout=1"], "model.dropout"),
    (["train", "{data}", "--out", "{tmp}/r", "--set", "train.lr=.nan"], "train.lr"),
    (["train", "{data}", "--out", "{tmp}/r", "--set", "train.lr=abc"], "train.lr"),
    (["train", "{data}", "--out", "{tmp}/r", "--set", "train.lr=["], "cannot read value"),
    (["train", "{data}", "--out", "{tmp}/r", "--set", "train..lr=1"], "empty key"),
    (["train", "{data}", "--out", "{tmp}/r", "--set", "rho"], "KEY=VALUE"),
    (["train", "{data}", "--out", "{tmp}/r", "--set", "model.name=3"], "model.name"),
    (["train", "{data}", "--out", "{tmp}/r", "--model", "bogus"], "unknown model 'bogus'"),
    (["train", "{data}", "--out", "{tmp}/r", "--config", "{tmp}/missing.yaml"], "config file not found"),
    (["train", "{data}", "--out", "{tmp}/r", "--config", "{tmp}/bad.yaml"], "not valid YAML"),
    (["train", "{data}", "--out", "{tmp}/r", "--max-memory", "12XB"], "--max-memory '12XB'"),
    (["train", "{data}", "--out", "{tmp}/r", "--max-memory", "0"], "positive size"),
    (["train", "{tmp}/nothing", "--out", "{tmp}/r"], "not a prepared store"),
    # evaluate
    (["evaluate", "{tmp}/nothing"], "not a run folder"),
    (["evaluate", "{run}", "--split", "bogus"], "bogus"),
    # bench
    (["bench", "accuracy", "{data}", "--out", "{tmp}/b", "--seeds", "0"], "bench.seeds = 0 is out of range"),
    (["bench", "accuracy", "{data}", "--out", "{tmp}/b", "--set", "bench.replicates=0"], "bench.replicates = 0"),
    (["bench", "accuracy", "{data}", "--out", "{tmp}/b", "--set", "bench.sedes=2"], "bench.sedes: Extra inputs"),
    (["bench", "accuracy", "{data}", "--out", "{tmp}/b", "--models", "bogus"], "unknown model 'bogus'"),
    (
        ["bench", "accuracy", "{data}", "--out", "{tmp}/b", "--models", "din", "--set", "train.lr=5"],
        "train.lr = 5 is out of range",
    ),
    (["bench", "accuracy", "{tmp}/nothing", "--out", "{tmp}/b", "--models", "din"], "not a prepared store"),
    (["bench", "speed", "--out", "{tmp}/b", "--lengths", "abc"], "--lengths"),
    (["bench", "speed", "--out", "{tmp}/b", "--lengths", "-5"], "lengths"),
    (["bench", "speed", "--out", "{tmp}/b", "--lengths", "100", "--candidates", "0"], "candidates"),
    (["bench", "speed", "--out", "{tmp}/b", "--lengths", "100", "--repeats", "0"], "repeats"),
    (["bench", "speed", "--out", "{tmp}/b", "--lengths", "100", "--items", "0"], "items"),
    (["bench", "speed", "--out", "{tmp}/b", "--lengths", "100", "--models", "bogus"], "bogus"),
    (["bench", "speed", "--out", "{tmp}/b", "--lengths", "100", "--threads", "0"], "--threads"),
    (["bench", "diagnose", "{tmp}/nothing", "--out", "{tmp}/d"], "nothing"),
    (["bench", "diagnose", "{run}", "--out", "{tmp}/d", "--every", "0"], "--every"),
    # export / serve / models
    (["export", "{tmp}/nothing", "--out", "{tmp}/e"], "not a run folder"),
    (["serve", "{tmp}/nothing", "--port", "99999"], "--port"),
    (["serve", "{tmp}/nothing", "--port", "0"], "--port"),
    (["serve", "{tmp}/nothing"], "nothing"),
    (["models", "extra"], "unexpected extra argument"),
    (["nosuchcommand"], "No such command"),
]


@pytest.mark.parametrize("args,phrase", CASES, ids=[" ".join(a[:2] + a[-2:]) for a, _ in CASES])
def test_bad_value_is_refused_with_exit_2_and_one_short_message(args, phrase, tiny_store, din_run, tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    fill = {"{data}": str(tiny_store.root), "{run}": str(din_run), "{tmp}": str(tmp_path)}
    real = []
    for a in args:
        for key, value in fill.items():
            a = a.replace(key, value)
        real.append(a)
    assert_refused(invoke(*real), phrase)


def _corrupt(root: Path, what: str) -> None:
    if what == "truncated npy":
        f = root / "seq_items.npy"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif what == "npy header":
        (root / "seq_offsets.npy").write_bytes(b"\x93NUMPY\x01\x00")
    elif what == "pickled npy":
        np.save(root / "seq_ts.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif what == "offsets shape":
        np.save(root / "seq_offsets.npy", np.arange(3))
    elif what in ("garbage samples", "garbage items", "garbage users"):
        (root / f"{what.split()[1]}.parquet").write_bytes(b"PAR1 this is not parquet")
    elif what == "manifest not json":
        (root / "manifest.json").write_text("{not json")
    elif what == "manifest binary":
        (root / "manifest.json").write_bytes(bytes(range(128, 256)))
    elif what == "manifest list":
        (root / "manifest.json").write_text("[1, 2]")
    elif what == "manifest keys":
        (root / "manifest.json").write_text('{"format": 1}')
    elif what == "sid truncated":
        f = root / "sid" / "codes.npy"
        f.write_bytes(f.read_bytes()[:-40])
    elif what == "sid meta list":
        (root / "sid" / "meta.json").write_text("[]")
    elif what == "sid quality":
        (root / "sid" / "quality.json").write_text("{{")
    elif what == "sid rows":
        np.save(root / "sid" / "codes.npy", np.zeros((3, 3), dtype=np.int64))
        np.save(root / "sid" / "prefix_tokens.npy", np.zeros((3, 3), dtype=np.int64))
    elif what == "sid tokens":
        tokens = np.load(root / "sid" / "prefix_tokens.npy")
        tokens[1, 0] = 10**6
        np.save(root / "sid" / "prefix_tokens.npy", tokens)
    else:  # pragma: no cover
        raise AssertionError(what)


CORRUPTIONS = [
    ("truncated npy", "seq_items.npy is corrupt"),
    ("npy header", "seq_offsets.npy is corrupt"),
    ("pickled npy", "seq_ts.npy is corrupt"),
    ("offsets shape", "seq_offsets has 3 entries"),
    ("garbage samples", "samples.parquet is corrupt"),
    ("garbage items", "items.parquet is corrupt"),
    ("garbage users", "users.parquet is corrupt"),
    ("manifest not json", "manifest.json is corrupt"),
    ("manifest binary", "manifest.json is corrupt"),
    ("manifest list", "expected a JSON object"),
    ("manifest keys", "manifest.json is corrupt: no name"),
    ("sid truncated", "is corrupt"),
    ("sid meta list", "must hold JSON objects"),
    ("sid quality", "is corrupt"),
    ("sid rows", "covers 2 items but the store has"),
    ("sid tokens", "prefix tokens outside the vocabulary"),
]


@pytest.mark.parametrize("what,phrase", CORRUPTIONS, ids=[w for w, _ in CORRUPTIONS])
def test_an_unreadable_store_or_sid_file_is_one_line(what, phrase, tiny_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(tiny_store.root, root)
    _corrupt(root, what)
    # R2LED reads the SID table; every corruption is caught before training starts
    res = invoke("train", root, "--out", tmp_path / "run", *[x for o in FAST for x in ("--set", o)])
    assert_refused(res, phrase)
    assert not (tmp_path / "run" / "config.yaml").exists()
    if what.startswith("sid"):
        assert_refused(invoke("sid", "info", root), phrase)
    else:
        assert_refused(invoke("data", "info", root), phrase)


def test_messages_are_capped_and_kept_on_one_line():
    long = DataError("bad quote in row 7: " + "x" * 50_000 + "\nsecond line")
    line = error_line(long)
    assert line is not None and len(line) <= MAX_MESSAGE and "\n" not in line
    assert line.startswith("bad quote in row 7: xxx") and "more characters" in line
    assert one_line("a\n  b\tc") == "a b c"


@pytest.mark.parametrize(
    "exc,expected",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/data/x"), "Permission denied: /data/x"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (MemoryError("Unable to allocate 763. GiB"), "out of memory: Unable to allocate 763. GiB"),
    ],
)
def test_expected_os_and_memory_errors_are_one_line(exc, expected):
    assert error_line(exc).startswith(expected)


def test_a_bug_keeps_its_traceback(tiny_store, monkeypatch):
    """An unexpected exception is a bug: not turned into a neat line (exit code 1, exception kept)."""
    assert error_line(KeyError("x")) is None and error_line(OSError("no errno, no path")) is None
    import r2led.cli.data_cmd as data_cmd

    def broken(manifest):
        raise KeyError("a bug")

    monkeypatch.setattr(data_cmd, "print_manifest", broken)
    res = invoke("data", "info", tiny_store.root)
    assert res.exit_code == 1 and isinstance(res.exception, KeyError)


def test_comma_lists_keep_commas_inside_brackets():
    from r2led.cli.bench_cmd import _csv

    assert _csv("r2led, r2led:unit=[32,16]+k=30,sim-hard,r2led[mha]") == [
        "r2led",
        "r2led:unit=[32,16]+k=30",
        "sim-hard",
        "r2led[mha]",
    ]
    assert _csv("100,1000,") == ["100", "1000"] and _csv("") == []
