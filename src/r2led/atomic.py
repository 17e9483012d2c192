"""Atomic publication of an artifact folder: write under a temporary name, then swap it in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish_folder(tmp: Path, out: Path) -> None:
    """Move the complete folder ``tmp`` to ``out``, replacing what ``out`` held.

    An existing ``out`` is renamed aside first and put back if the swap fails, so a reader
    sees either the old artifact or the new one, never a half-written folder.
    """
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # put the previous artifact back
        raise
    shutil.rmtree(old)
