"""Pack an item's code tuple (or a prefix of it) into one int64 key, so sets of codes are sorted integer arrays.

With ``K`` codes per level, the key of a length-``l`` prefix is ``sum(codes[i] * K**(l-1-i))``: keys sort in
lexicographic code order, and every full code under a prefix ``p`` of length ``l`` lies in the half-open key range
``[p * K**(L-l), (p + 1) * K**(L-l))``. That range property is what the collision resolver and the trie rely on.
"""
from __future__ import annotations

import numpy as np

_MAX_KEY_BITS = 62  # keep keys and ``(p + 1) * K**m`` range ends inside int64


def check_key_space(levels: int, codebook_size: int) -> None:
    """Raise if ``codebook_size ** levels`` codes do not fit an int64 key."""
    if levels < 1 or codebook_size < 1:
        raise ValueError(f"levels and codebook_size must be >= 1, got {levels}, {codebook_size}")
    if levels * np.log2(max(codebook_size, 2)) > _MAX_KEY_BITS:
        raise ValueError(
            f"{levels} levels x {codebook_size} codes need more than {_MAX_KEY_BITS} bits per packed key"
        )


def pack_codes(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """Keys of ``codes`` [n, l] (any prefix length ``l``): int64 [n]."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [n, levels], got shape {codes.shape}")
    check_key_space(max(codes.shape[1], 1), codebook_size)
    keys = np.zeros(codes.shape[0], dtype=np.int64)
    for level in range(codes.shape[1]):
        keys = keys * codebook_size + codes[:, level].astype(np.int64)
    return keys


def unpack_keys(keys: np.ndarray, levels: int, codebook_size: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: int64 [n] -> int64 [n, levels]."""
    keys = np.asarray(keys, dtype=np.int64)
    codes = np.empty((keys.shape[0], levels), dtype=np.int64)
    for level in range(levels - 1, -1, -1):
        codes[:, level] = keys % codebook_size
        keys = keys // codebook_size
    return codes
