"""SimHash: packed sign signatures of embeddings and their Hamming distance by popcount.

``b(v) = sign(W_hash e(v))`` with ``m`` fixed random hyperplanes; two signatures' Hamming
distance estimates the angle between the embeddings: ``cos ~ cos(pi * hamming / m)``.
Signatures are packed 64 bits per int64 word, so scoring a behaviour costs ``m / 64`` XORs and
popcounts instead of a ``d``-dimensional dot product; nothing here carries a gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from r2led.models.layers import seeded_normal

_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_H01 = 0x0101010101010101


def popcount64(x: torch.Tensor) -> torch.Tensor:
    """Bits set in each int64 (SWAR popcount; arithmetic shifts are safe with these masks).

    Two working buffers updated in place (``x`` itself is not modified): over (B, T) words
    the cost is memory passes, and fresh temporaries per step tripled it.
    """
    y = torch.bitwise_right_shift(x, 1)
    y &= _M1
    x = x - y  # x - ((x >> 1) & M1), a new tensor from here on
    torch.bitwise_right_shift(x, 2, out=y)
    y &= _M2
    x &= _M2
    x += y  # (x & M2) + ((x >> 2) & M2)
    torch.bitwise_right_shift(x, 4, out=y)
    x += y
    x &= _M4  # (x + (x >> 4)) & M4
    x *= _H01  # wraps mod 2^64; the top byte holds the count (<= 64)
    x >>= 56
    return x


class SimHash(nn.Module):
    """Fixed random hyperplanes (a buffer, never trained) and packed signatures."""

    def __init__(self, dim: int, bits: int = 64, seed: int = 1234):
        super().__init__()
        if bits % 64:
            raise ValueError(f"hash bits must be a multiple of 64, got {bits}")
        self.bits, self.words = bits, bits // 64
        self.register_buffer("planes", seeded_normal((dim, bits), seed))
        self.register_buffer("powers", torch.tensor([1 << i for i in range(63)] + [-(1 << 63)], dtype=torch.int64))

    @torch.no_grad()
    def signatures(self, emb: torch.Tensor) -> torch.Tensor:
        """(..., d) float -> (..., words) int64 packed sign bits."""
        bits = (emb.detach() @ self.planes > 0).long()  # (..., m)
        bits = bits.view(*bits.shape[:-1], self.words, 64)
        return (bits * self.powers).sum(-1)  # (..., words); bit 63 carries the sign

    @staticmethod
    def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(..., words) x (..., words) broadcast -> (...,) int64 Hamming distance."""
        return popcount64(torch.bitwise_xor(a, b)).sum(-1)

    def cosine(self, hamming: torch.Tensor) -> torch.Tensor:
        """The SimHash estimate of the cosine similarity for a Hamming distance."""
        return torch.cos(math.pi * hamming.float() / self.bits)
