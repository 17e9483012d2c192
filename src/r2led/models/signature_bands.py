"""Banded LSH over packed SimHash signatures: the collaborative view's sublinear index.

A signature of m bits is cut into ``bands`` bands of m / bands bits; two items collide in a
band when those bits are equal. Items close in Hamming distance collide in some band with high
probability (distance h, b bits a band: 1 - (1 - C(m-h, b) / C(m, b))^bands), so a candidate
scores only the items it collides with instead of every distinct item of the history.

Per band, the user's items sorted by their band value (``values`` (bands, U), ``slots``
(bands, U)): a candidate's bucket is one ``searchsorted`` range. A new item is inserted in
every band (a memmove of U slots per band, as the SID rank order is). Approximate: the
recall against exact search is measured (``tests/test_retrieval.py``, ``bench speed``'s
``r2led[lsh]``); exact search stays the default (``R2LED.collaborative_bands = 0``).
"""

from __future__ import annotations

import numpy as np


def band_values(sig: np.ndarray, bands: int) -> np.ndarray:
    """(n, W) uint64 signatures -> (bands, n) uint64: each band's bits as an integer."""
    n, words = sig.shape
    bits = 64 * words // bands
    if bits < 1 or 64 * words % bands or 64 % bits:
        raise ValueError(f"{bands} bands do not cut {64 * words}-bit signatures into equal bands within a word")
    per_word = 64 // bits
    mask = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
    out = np.empty((bands, n), np.uint64)
    for b in range(bands):
        out[b] = (sig[:, b // per_word] >> np.uint64((b % per_word) * bits)) & mask
    return out


class SignatureBands:
    """The bands of one user's distinct items (slots 0..U-1), kept sorted per band."""

    def __init__(self, slot_sig: np.ndarray, bands: int):
        self.bands = bands
        vals = band_values(slot_sig, bands)  # (bands, U)
        order = np.argsort(vals, axis=1, kind="stable")
        self.slots = np.ascontiguousarray(order.astype(np.int64))  # (bands, U) slots by band value
        self.values = np.ascontiguousarray(np.take_along_axis(vals, order, axis=1))  # (bands, U) sorted

    def __len__(self) -> int:
        return self.slots.shape[1]

    def insert(self, slot: int, sig: np.ndarray) -> None:
        """Add slot ``slot`` with signature ``sig`` (W,) to every band: O(bands U) (memmoves)."""
        vals = band_values(sig.reshape(1, -1), self.bands)[:, 0]  # (bands,)
        u = len(self)
        slots, values = np.empty((self.bands, u + 1), np.int64), np.empty((self.bands, u + 1), np.uint64)
        for b in range(self.bands):
            at = int(np.searchsorted(self.values[b], vals[b], side="right"))
            slots[b] = np.insert(self.slots[b], at, slot)
            values[b] = np.insert(self.values[b], at, vals[b])
        self.slots, self.values = slots, values

    def queries(self, target_sig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each candidate's bucket in every band, as ranges: lo, hi (C, bands)."""
        vals = band_values(target_sig, self.bands)  # (bands, C)
        lo, hi = np.empty(vals.T.shape, np.int64), np.empty(vals.T.shape, np.int64)
        for b in range(self.bands):
            lo[:, b] = np.searchsorted(self.values[b], vals[b], side="left")
            hi[:, b] = np.searchsorted(self.values[b], vals[b], side="right")
        return lo, hi

    def nbytes(self) -> int:
        return self.slots.nbytes + self.values.nbytes
