"""The attention structure of a pack: host-side metadata, built with the micro-batch (no megatron import).

A *pack* is one sequence of ``S`` positions cut into contiguous *segments*. A segment is a causal *trunk* followed by
zero or more *children*; each child sees the first ``prefix`` trunk positions and itself (causally), never the rest
of the trunk nor another child, and nothing crosses segments:

* a pre-training document is a segment without children (trailing padding is one more document, as
  :mod:`megatron_onereason.data.packing` writes ``cu_seqlens``);
* an RL tree (:mod:`megatron_onereason.rl.tree_pack`) has ``prompt + trace`` as the trunk and its K item completions
  as children with ``prefix = trunk − 1`` (each child starts with a copy of the trunk's last token).

Every query row therefore sees at most two contiguous key ranges (:meth:`PackLayout.key_ranges`), which is all that
the kernels of :mod:`megatron_onereason.model.packed_attention` need; its ``pack_params`` turns a layout into the
``packed_seq_params`` that the model takes (this module imports nothing of it: no import circle).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch


@dataclass(frozen=True)
class Segment:
    """``trunk`` causal positions, then ``children`` (lengths) that each see the first ``prefix`` trunk positions."""

    trunk: int
    prefix: int = 0
    children: Tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return self.trunk + sum(self.children)


@dataclass(frozen=True)
class PackLayout:
    """The segments of one pack, in order, covering positions ``[0, length)``. Plain integers: cheap to build on
    the host, to pickle to another process, and to read without touching a device."""

    segments: Tuple[Segment, ...]

    def __post_init__(self):
        if not self.segments:
            raise ValueError("a pack layout needs at least one segment")
        for i, s in enumerate(self.segments):
            if s.trunk < 1 or not 0 <= s.prefix <= s.trunk or any(c < 1 for c in s.children):
                raise ValueError(f"segment {i}: need trunk >= 1, 0 <= prefix <= trunk and children >= 1, got {s}")

    @classmethod
    def documents(cls, lengths: Sequence[int]) -> "PackLayout":
        """Causal documents of the given lengths (host integers, e.g. a numpy array)."""
        return cls(tuple(Segment(int(n)) for n in lengths))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens) -> "PackLayout":
        """Documents from host-side boundaries ``[0, e_1, ..., S]`` (numpy or a CPU tensor; never a device tensor,
        whose read would wait for the device)."""
        if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device.type != "cpu":
            raise ValueError("cu_seqlens must be host-side (numpy or a CPU tensor): build the pack layout with the "
                             "micro-batch, before it moves to the device")
        cu = np.asarray(cu_seqlens, dtype=np.int64)
        if cu.ndim != 1 or cu.size < 2 or cu[0] != 0 or np.any(np.diff(cu) <= 0):
            raise ValueError(f"cu_seqlens must start at 0 and strictly increase, got {cu}")
        return cls.documents(np.diff(cu))

    @functools.cached_property
    def boundaries(self) -> Tuple[int, ...]:
        """Segment starts and the end: the segments' ``cu_seqlens``."""
        return tuple(itertools.accumulate((s.length for s in self.segments), initial=0))

    @property
    def length(self) -> int:
        return self.boundaries[-1]

    @functools.cached_property
    def has_children(self) -> bool:
        return any(s.children for s in self.segments)

    def position_ids(self) -> np.ndarray:
        """RoPE positions int64 ``[S]``: trunks count from 0, a child continues from its trunk's ``prefix``."""
        parts = []
        for s in self.segments:
            parts.append(np.arange(s.trunk))
            parts += [s.prefix + np.arange(c) for c in s.children]
        return np.concatenate(parts).astype(np.int64)

    def key_ranges(self) -> np.ndarray:
        """int32 ``[4, S]``: row ``q`` attends to keys ``lo1..hi1`` and ``lo2..hi2`` (rows 0–3; inclusive; an empty
        range is ``0..-1``). Trunk rows: ``start..q``; child rows: ``start..start+prefix-1`` and ``child_start..q``."""
        ranges = np.zeros((4, self.length), dtype=np.int32)
        ranges[3] = -1
        for s, start in zip(self.segments, self.boundaries):
            rows = np.arange(start, start + s.trunk)
            ranges[0, rows], ranges[1, rows] = start, rows
            child_start = start + s.trunk
            for c in s.children:
                rows = np.arange(child_start, child_start + c)
                if s.prefix:
                    ranges[0, rows], ranges[1, rows] = start, start + s.prefix - 1
                else:
                    ranges[0, rows], ranges[1, rows] = 0, -1
                ranges[2, rows], ranges[3, rows] = child_start, rows
                child_start += c
        return ranges

    def dense_mask(self) -> torch.Tensor:
        """bool ``[S, S]``, True where row ``q`` may attend to column ``k``. ``S × S``: only for references (the
        ``dense`` oracle, transformers models that take a 4-D mask), never on the training path."""
        return allowed_keys(torch.from_numpy(self.key_ranges()), torch.arange(self.length))


def allowed_keys(ranges: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """bool ``[rows, len(cols)]``: which of the key columns ``cols`` each row of key ranges ``[4, rows]`` sees."""
    lo1, hi1, lo2, hi2 = (r[:, None] for r in ranges)
    return ((cols >= lo1) & (cols <= hi1)) | ((cols >= lo2) & (cols <= hi2))
