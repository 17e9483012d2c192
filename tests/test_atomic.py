"""Atomic publication (r2led.atomic): a failure part-way never leaves a half-written artifact.

Each failure (ENOSPC on the second of several files, ENOSPC inside one file, an interrupt in the
body or during the swap, a process killed outright) must leave the previous artifact byte for
byte and no staging copy beside it. The SID table is published through the same helper, and
``r2led sid build`` refuses to replace one without ``--force``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from r2led import atomic
from r2led.atomic import (
    staged_file,
    staged_folder,
    staging_leftovers,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from r2led.cli import app
from r2led.sid.table import SidTable

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def old_folder(out: Path) -> dict[str, bytes]:
    with staged_folder(out) as tmp:
        (tmp / "a.bin").write_bytes(b"old-a" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text('{"old": true}\n')
    return snapshot(out)


def save_fails_on_call(n: int):
    """An ``np.save`` that writes half of the ``n``-th array it is given, then raises ENOSPC."""
    real_save = np.save
    calls = {"n": 0}

    def save(file, arr, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < n:
            return real_save(file, arr, *args, **kwargs)
        data = np.ascontiguousarray(arr).tobytes()
        with open(file, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise ENOSPC

    return save, calls


# ---- folders -------------------------------------------------------------------------------------
def test_staged_folder_publishes_a_new_folder_and_replaces_an_old_one(tmp_path):
    out = tmp_path / "art"
    before = old_folder(out)
    assert before == {"a.bin": b"old-a" * 100, "sub/b.json": b'{"old": true}\n'}
    with staged_folder(out) as tmp:
        assert tmp.parent == out.parent and tmp.name != out.name and list(tmp.iterdir()) == []
        (tmp / "c.txt").write_text("new")
        assert snapshot(out) == before  # nothing visible until the block ends
    assert snapshot(out) == {"c.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "rename-aside"])
def test_enospc_on_the_second_file_keeps_the_old_folder_byte_for_byte(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", None)  # the portable path (no RENAME_EXCHANGE)
    out = tmp_path / "art"
    before = old_folder(out)
    save, calls = save_fails_on_call(2)
    with pytest.raises(OSError) as info, staged_folder(out) as tmp:
        save(tmp / "one.npy", np.arange(100))
        save(tmp / "two.npy", np.arange(10_000))  # half-written, then ENOSPC
        (tmp / "three.json").write_text("{}")
    assert info.value.errno == errno.ENOSPC and calls["n"] == 2
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"] and staging_leftovers(tmp_path) == []
    # and the next publication goes through normally, on either path
    with staged_folder(out) as tmp:
        (tmp / "x").write_bytes(b"new")
    assert snapshot(out) == {"x": b"new"} and staging_leftovers(tmp_path) == []


def test_sid_table_save_failing_on_its_second_file_keeps_the_old_table(tmp_path, monkeypatch):
    path = tmp_path / "sid"
    SidTable.from_codes(np.arange(30).reshape(10, 3) % 4, {"encoder": "old"}).save(path)
    before = snapshot(path)
    assert set(before) == {"codes.npy", "prefix_tokens.npy", "quality.json", "meta.json"}
    save, calls = save_fails_on_call(2)
    monkeypatch.setattr(np, "save", save)
    new = SidTable.from_codes(np.arange(600).reshape(200, 3) % 7, {"encoder": "new"})
    with pytest.raises(OSError) as info:
        new.save(path)
    assert info.value.errno == errno.ENOSPC and calls["n"] == 2
    assert snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sid"]
    monkeypatch.undo()
    assert SidTable.load(path).settings == {"encoder": "old"}


@pytest.mark.parametrize("existing", [True, False], ids=["over-old", "fresh"])
def test_keyboard_interrupt_inside_staged_folder_leaves_nothing_behind(tmp_path, existing):
    out = tmp_path / "art"
    before = old_folder(out) if existing else None
    with pytest.raises(KeyboardInterrupt), staged_folder(out) as tmp:
        (tmp / "part.bin").write_bytes(b"x" * 4096)
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == (["art"] if existing else [])
    if existing:
        assert snapshot(out) == before


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "rename-aside"])
def test_an_interrupt_or_error_during_the_swap_puts_the_old_folder_back(tmp_path, monkeypatch, exchange):
    out = tmp_path / "art"
    before = old_folder(out)
    if exchange:

        def interrupted(a, b):
            raise KeyboardInterrupt

        monkeypatch.setattr(atomic, "_exchange", interrupted)
        expected = KeyboardInterrupt
    else:
        monkeypatch.setattr(atomic, "_renameat2", None)
        real_rename = Path.rename

        def rename(self, target):  # the old folder goes aside, then moving the new one in fails
            if atomic.STAGING_MARK in self.name:
                raise OSError(errno.EIO, "I/O error")
            return real_rename(self, target)

        monkeypatch.setattr(Path, "rename", rename)
        expected = OSError
    with pytest.raises(expected), staged_folder(out) as tmp:
        (tmp / "new.bin").write_bytes(b"new")
    monkeypatch.undo()
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_rename_exchange_is_used_where_the_os_has_it(tmp_path):
    if atomic._renameat2 is None:
        pytest.skip("no renameat2 here (not Linux/glibc)")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "f").write_text("A")
    b.mkdir()
    (b / "f").write_text("B")
    ino_a = a.stat().st_ino
    assert atomic._exchange(a, b) is True
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A" and b.stat().st_ino == ino_a


def test_a_process_killed_mid_write_leaves_a_copy_that_the_next_publication_removes(tmp_path):
    out = tmp_path / "art"
    before = old_folder(out)
    script = textwrap.dedent(
        """
        import os, signal, sys
        from r2led.atomic import staged_folder
        with staged_folder(sys.argv[1]) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10_000)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(out)], timeout=60)
    assert done.returncode == -9
    assert len(staging_leftovers(tmp_path)) == 1 and snapshot(out) == before  # kill -9 cannot clean up
    # a copy from a live process (this one) is never touched
    mine = atomic._staging_name(out)
    mine.mkdir()
    with staged_folder(out) as tmp:
        (tmp / "x").write_text("new")
    assert staging_leftovers(tmp_path) == [mine] and snapshot(out) == {"x": b"new"}


def test_an_artifact_set_aside_by_a_killed_swap_is_put_back(tmp_path):
    dead = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )
    out = tmp_path / "art"
    before = old_folder(out)
    aside = out.with_name(f".art.aside-{atomic._HOST}-{dead}-0123abcd")
    out.rename(aside)  # what a kill -9 between the two renames of the portable swap leaves
    with pytest.raises(KeyboardInterrupt), staged_folder(out):
        raise KeyboardInterrupt
    assert snapshot(out) == before and staging_leftovers(tmp_path) == []


def test_concurrent_publications_of_one_folder_never_mix_and_leave_nothing(tmp_path):
    out = tmp_path / "art"
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def writer(k: int) -> None:
        try:
            start.wait()
            for i in range(15):
                with staged_folder(out) as tmp:
                    (tmp / "id").write_text(f"{k}-{i}")
                    (tmp / "payload").write_bytes(f"{k}-{i}".encode() * 500)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    ident = (out / "id").read_text()
    assert (out / "payload").read_bytes() == ident.encode() * 500 and ident.endswith("-14")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ---- single files --------------------------------------------------------------------------------
def test_write_helpers_write_bytes_text_and_json(tmp_path):
    write_bytes_atomic(tmp_path / "deep" / "b.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "t.md", "é\n")
    write_json_atomic(tmp_path / "r.json", {"auc": np.float32(0.75)}, default=float)
    assert (tmp_path / "deep" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.md").read_bytes() == "é\n".encode()
    assert (tmp_path / "r.json").read_text() == '{\n  "auc": 0.75\n}\n'
    write_json_atomic(tmp_path / "r.json", [1, 2], indent=None)
    assert json.loads((tmp_path / "r.json").read_text()) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "r.json", "t.md"]


def test_enospc_while_flushing_one_file_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "old\n")

    def no_space(fd):
        raise ENOSPC

    monkeypatch.setattr(atomic.os, "fsync", no_space)  # the bytes are in the staging file by then
    with pytest.raises(OSError) as info:
        write_bytes_atomic(path, b"new" * 10_000)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_enospc_part_way_through_a_writer_keeps_the_old_file(tmp_path):
    path = tmp_path / "emb.npy"
    np.save(path, np.zeros(3))
    before = path.read_bytes()
    save, _ = save_fails_on_call(1)
    with pytest.raises(OSError) as info, staged_file(path) as tmp:
        save(tmp, np.arange(50_000))
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy"]
    with pytest.raises(KeyboardInterrupt), staged_file(path) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy"]


def test_staged_file_keeps_the_suffix_for_writers_that_infer_a_format(tmp_path):
    with staged_file(tmp_path / "codes.npy") as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path
        np.save(tmp, np.arange(4))  # np.save would append ".npy" to any other name
    assert np.load(tmp_path / "codes.npy").tolist() == [0, 1, 2, 3]
    with pytest.raises(FileNotFoundError, match="nothing was written"), staged_file(tmp_path / "empty.png"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy"]


def test_concurrent_writes_of_one_file_each_land_whole(tmp_path):
    path = tmp_path / "r.bin"
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def writer(k: int) -> None:
        try:
            start.wait()
            for _ in range(30):
                write_bytes_atomic(path, bytes([k]) * 65_536)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = path.read_bytes()
    assert len(data) == 65_536 and len(set(data)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.bin"]


def test_plots_go_through_the_helper(tmp_path, monkeypatch):
    from r2led.bench.plots import line_plot

    path = tmp_path / "latency.png"
    line_plot({"a": [(1, 2.0), (2, 3.0)]}, path, xlabel="x", ylabel="y")
    before = path.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"

    def no_space(fd):
        raise ENOSPC

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    with pytest.raises(OSError):
        line_plot({"b": [(1, 5.0)]}, path, xlabel="x", ylabel="y")
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["latency.png"]


def test_an_interrupted_embedding_cache_write_is_a_miss_never_stale_vectors(tmp_path, monkeypatch):
    from r2led.sid import encoders

    calls = []

    def fake_encoder(texts):  # (N, 4): the call number, so stale vectors are recognisable
        calls.append(list(texts))
        return np.full((len(texts), 4), len(calls), dtype=np.float32)

    monkeypatch.setattr(encoders, "minilm_embeddings", fake_encoder)
    encoders.cached_minilm_embeddings(["a", "b"], tmp_path)

    def no_space(*args, **kwargs):
        raise ENOSPC

    with monkeypatch.context() as m:  # the new vectors are in place, their hash never lands
        m.setattr(encoders, "write_json_atomic", no_space)
        with pytest.raises(OSError):
            encoders.cached_minilm_embeddings(["x", "y"], tmp_path)
    vectors, hit = encoders.cached_minilm_embeddings(["a", "b"], tmp_path)
    assert hit is False and vectors[0, 0] == 3 and len(calls) == 3  # re-encoded, not call 2's vectors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minilm.json", "minilm.npy"]


# ---- a real full filesystem ----------------------------------------------------------------------
REAL_ENOSPC = """
import errno, json, sys
from pathlib import Path
import numpy as np
from r2led.atomic import write_bytes_atomic
from r2led.sid.table import SidTable

root = Path(sys.argv[1])
snap = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}
SidTable.from_codes(np.arange(30).reshape(10, 3) % 4, {"encoder": "old"}).save(root / "sid")
write_bytes_atomic(root / "f.bin", b"old")
before = snap(root / "sid")
res = {}
# 20,000 x 3 int64: codes.npy (469 KiB) fits in the 768 KiB filesystem, prefix_tokens.npy does not
big = SidTable.from_codes(np.random.default_rng(0).integers(0, 16, (20_000, 3)), {"encoder": "new"})
writers = [("sid", lambda: big.save(root / "sid")), ("file", lambda: write_bytes_atomic(root / "f.bin", b"x" * 2**20))]
for name, write in writers:
    try:
        write()
        res[name] = "written"
    except OSError as exc:
        res[name] = errno.errorcode.get(exc.errno) or str(exc)
res["sid_intact"] = snap(root / "sid") == before
res["file_intact"] = (root / "f.bin").read_bytes() == b"old"
res["entries"] = sorted(p.name for p in root.iterdir())
print(json.dumps(res))
"""


def test_a_really_full_filesystem_keeps_the_old_artifacts(tmp_path):
    """On a 768 KiB tmpfs (private mount namespace; skipped where user namespaces are off)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(REAL_ENOSPC)
    probe = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", f"mount -t tmpfs -o size=768k tmpfs '{mnt}'"],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.decode().strip()[:200]}")
    done = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c",
         f"mount -t tmpfs -o size=768k tmpfs '{mnt}' && exec '{sys.executable}' '{script}' '{mnt}'"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    # numpy reports a short write without an errno: "60003 requested and 35312 written"
    sid = res.pop("sid")
    assert sid == "ENOSPC" or re.fullmatch(r"\d+ requested and \d+ written", sid), sid
    assert res == {"file": "ENOSPC", "sid_intact": True, "file_intact": True, "entries": ["f.bin", "sid"]}


# ---- sid build --force ---------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "r2led", *args], capture_output=True, text=True, env=env, timeout=300)


def test_sid_build_refuses_to_replace_a_table_unless_forced(tiny_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(tiny_store.root, root)
    before = snapshot(root / "sid")
    refused = run_cli("sid", "build", str(root), "--encoder", "tfidf", "--levels", "2", "--codebook", "4")
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    err = refused.stderr.strip()
    assert (
        f"SID table {root / 'sid'} already exists; pass --force" in err
        and "runs trained on it would be invalidated" in err
    )
    assert snapshot(root / "sid") == before and not (root / "embeddings").exists()  # refused before encoding

    forced = CliRunner().invoke(
        app, ["sid", "build", str(root), "--encoder", "tfidf", "--levels", "2", "--codebook", "4", "--force"]
    )
    assert forced.exit_code == 0, forced.output
    table = SidTable.load(root / "sid")
    assert table.settings["encoder"] == "tfidf" and table.codes.shape == (tiny_store.n_items + 1, 2)
    assert staging_leftovers(root) == []
    # --force replaces SID tables only, never a store file or the embedding cache
    manifest = (root / "manifest.json").read_bytes()
    clash = run_cli(
        "sid", "build", str(root), "--encoder", "tfidf", "--codebook", "4", "--out", "manifest.json", "--force"
    )
    assert clash.returncode == 2 and "is not a SID table" in clash.stderr and "Traceback" not in clash.stderr
    assert (root / "manifest.json").read_bytes() == manifest
    # another name is a second table, no --force needed
    other = CliRunner().invoke(
        app, ["sid", "build", str(root), "--encoder", "tfidf", "--levels", "2", "--codebook", "4", "--out", "sid2"]
    )
    assert other.exit_code == 0, other.output
    assert np.array_equal(SidTable.load(root / "sid2").codes, table.codes)
