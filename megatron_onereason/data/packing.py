"""Sequence packing: documents → fixed-length packs with per-document attention and loss (OneReason §4.4).

All pre-training stages pack samples into 48K-token sequences, with individual samples capped at 4K tokens
(stages 1–2) or 32K (stage 3). Packing runs in two phases so that planning 10M documents is fast:

1. :func:`plan_packs` works on document *lengths* only. Documents longer than the cap are split into cap-sized
   chunks, truncated or dropped (``overlong_policy``, all counted); every chunk is then a document of its own and
   is never split across two packs. Chunks are shuffled (seeded) and packed window by window with first-fit
   decreasing (see :func:`_fill_window`). The result is a :class:`PackPlan`: per pack, a list of
   ``(document, start, length)`` chunks.
2. :func:`assemble_pack` materialises one pack from the chunks' tokens and target masks: tokens, labels, loss
   mask, position ids restarting per document, ``cu_seqlens`` for block-diagonal attention and per-token source
   ids for per-source loss logging.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np

OVERLONG_POLICIES = ("split", "truncate", "drop")
PAD_SOURCE_ID = -1  # source id of padding positions


@dataclass(frozen=True)
class PackingConfig:
    seq_length: int = 49152
    max_sample_length: Optional[int] = 4096  # per-sample cap; None → seq_length
    overlong_policy: str = "split"  # what happens to a document longer than the cap: split | truncate | drop
    window: int = 65536  # chunks packed together by one first-fit-decreasing pass (bounds reordering and memory)
    shuffle: bool = True  # shuffle chunks (seeded) before windowing and shuffle the final pack order
    seed: int = 0

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {self.seq_length}")
        if self.max_sample_length is not None and not 1 <= self.max_sample_length <= self.seq_length:
            raise ValueError(
                f"max_sample_length must be in [1, seq_length={self.seq_length}], got {self.max_sample_length}"
            )
        if self.overlong_policy not in OVERLONG_POLICIES:
            raise ValueError(f"overlong_policy must be one of {OVERLONG_POLICIES}, got {self.overlong_policy!r}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    @property
    def cap(self) -> int:
        return self.seq_length if self.max_sample_length is None else self.max_sample_length


@dataclass
class PackingStats:
    documents: int  # documents given to the planner
    input_tokens: int  # their total length
    packed_tokens: int  # tokens placed in packs (input minus truncated and dropped)
    chunks: int  # documents as packed (a split document counts once per chunk)
    packs: int
    split_documents: int  # longer than the cap, split into chunks (policy "split")
    truncated_documents: int  # longer than the cap, cut to the cap (policy "truncate")
    truncated_tokens: int
    dropped_documents: int  # longer than the cap, left out (policy "drop")
    dropped_tokens: int
    empty_documents: int  # length 0: nothing to pack
    fill_rate: float  # packed_tokens / (packs * seq_length)

    def to_dict(self) -> Dict:
        return asdict(self)


@dataclass
class PackPlan:
    """Chunks grouped by pack (CSR layout): pack ``i`` holds chunks ``pack_offsets[i]:pack_offsets[i+1]``.

    Chunk ``c`` is tokens ``chunk_start[c] : chunk_start[c] + chunk_length[c]`` of document ``chunk_doc[c]``.
    """

    chunk_doc: np.ndarray  # [chunks], int32 or int64 (planned: int32 below 2**31 documents; saved: narrowest)
    chunk_start: np.ndarray  # [chunks], integer
    chunk_length: np.ndarray  # [chunks], integer
    pack_offsets: np.ndarray  # int64 [packs + 1]
    seq_length: int
    stats: PackingStats

    def __len__(self) -> int:
        return len(self.pack_offsets) - 1

    def pack_slice(self, pack: int) -> slice:
        if not 0 <= pack < len(self):
            raise IndexError(f"pack {pack} out of range [0, {len(self)})")
        return slice(int(self.pack_offsets[pack]), int(self.pack_offsets[pack + 1]))


def _index_dtype(bound: int):
    """int32 when every value is below ``bound`` < 2**31 (half the memory of int64 at billions of chunks)."""
    return np.int32 if bound < 2**31 else np.int64


def split_overlong(lengths: np.ndarray, config: PackingConfig):
    """Documents → chunks no longer than the cap. Returns ``(doc, start, length, counts)``, counts a dict of stats.

    ``doc`` is int32 below 2**31 documents (else int64); ``start`` and ``length`` take the lengths' integer width.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"negative document length at index {int(np.argmin(lengths))}")
    lengths = lengths.astype(_index_dtype(int(lengths.max()) + 1 if lengths.size else 0), copy=False)
    cap = config.cap
    overlong = lengths > cap
    empty = lengths == 0
    counts = dict(split_documents=0, truncated_documents=0, truncated_tokens=0, dropped_documents=0,
                  dropped_tokens=0, empty_documents=int(empty.sum()))
    if config.overlong_policy == "split":
        per_doc = np.where(empty, 0, -(-lengths // cap))  # ceil division
        counts["split_documents"] = int(overlong.sum())
    else:
        per_doc = np.where(empty, 0, 1)
        if config.overlong_policy == "drop":
            per_doc = np.where(overlong, 0, per_doc)
            counts["dropped_documents"] = int(overlong.sum())
            counts["dropped_tokens"] = int(lengths[overlong].sum(dtype=np.int64))
        else:
            counts["truncated_documents"] = int(overlong.sum())
            counts["truncated_tokens"] = int((lengths[overlong] - cap).sum(dtype=np.int64))
    del overlong, empty
    doc = np.repeat(np.arange(lengths.size, dtype=_index_dtype(lengths.size)), per_doc)
    if np.all(per_doc == 1):  # one chunk per document (nothing split, dropped or empty): starts are all 0
        return doc, np.zeros_like(lengths), np.minimum(lengths, cap), counts
    first_chunk = np.cumsum(per_doc) - per_doc
    index_in_doc = (np.arange(doc.size, dtype=np.int64) - np.repeat(first_chunk, per_doc)).astype(lengths.dtype)
    del first_chunk, per_doc
    start = index_in_doc * lengths.dtype.type(cap)
    length = np.minimum(lengths[doc] - start, cap)
    return doc, start, length, counts


def _stable_argsort(keys: np.ndarray, bound: int) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for keys in ``[0, bound]``: as uint16 when they fit, which numpy sorts
    by radix sort in linear time."""
    if bound < 2**16:
        keys = keys.astype(np.uint16)
    return np.argsort(keys, kind="stable")


def _fill_window(lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """First-fit decreasing over one window: pack number (0, 1, ...) for each item; the last pack may be partial.

    Computed pack by pack, which gives exactly FFD's assignment: FFD's first pack receives, scanning the items
    longest first, every item that still fits; the second pack does the same over the rest, and so on. Items are
    bucketed by length, so the longest fitting length is one bisect over the distinct lengths and all
    ``room // length`` items of that length go in at once: a pack costs a handful of Python steps, not one per
    item. Items of equal length keep their (shuffled) input order, which makes the fill deterministic.
    """
    order = _stable_argsort(seq_length - lengths.astype(np.int64), seq_length)  # longest first
    sorted_lengths = lengths[order]
    run_start = np.flatnonzero(np.diff(sorted_lengths, prepend=sorted_lengths[:1] + 1))  # runs of equal length
    run_count = np.diff(np.append(run_start, lengths.size))
    available = sorted_lengths[run_start][::-1].tolist()  # ascending lengths that still have items
    bucket = {length: j for j, length in enumerate(available)}
    next_item = run_start[::-1].tolist()  # next unplaced position in `order` of each length's run
    left = run_count[::-1].tolist()
    pack_of_sorted = np.empty(lengths.size, dtype=np.int64)
    pack = 0
    while available:
        room = seq_length
        while True:
            i = bisect_right(available, room) - 1
            if i < 0:
                break
            length = available[i]
            j = bucket[length]
            take = min(left[j], room // length)
            pack_of_sorted[next_item[j]:next_item[j] + take] = pack
            next_item[j] += take
            left[j] -= take
            room -= take * length
            if left[j] == 0:
                del available[i]
        pack += 1
    pack_of = np.empty_like(pack_of_sorted)
    pack_of[order] = pack_of_sorted
    return pack_of


def plan_packs(lengths: np.ndarray, config: PackingConfig) -> PackPlan:
    """Plan packs over document lengths (deterministic given ``config.seed``).

    Memory is linear in the number of chunks (about 50 bytes each at the peak) and time linear too: the chunks of
    each window are grouped by pack as the window is filled, and the final pack shuffle moves whole packs.
    """
    doc, start, length, counts = split_overlong(lengths, config)
    rng = np.random.default_rng(config.seed)
    n = doc.size
    order = rng.permutation(n) if config.shuffle else np.arange(n)
    seq = config.seq_length
    chunk_ids, pack_sizes = [], []
    num_packs = 0
    carry = np.empty(0, dtype=np.int64)
    for begin in range(0, n, config.window):
        ids = np.concatenate([carry, order[begin:begin + config.window]])
        pack_of = _fill_window(length[ids], seq)
        packs_here = int(pack_of.max()) + 1
        last_window = begin + config.window >= n
        if not last_window:
            # The last pack of a window is usually partial: its chunks go into the next window instead, so only
            # the very last pack of the plan can be partly padding.
            in_last = pack_of == packs_here - 1
            carry = ids[in_last]
            ids, pack_of, packs_here = ids[~in_last], pack_of[~in_last], packs_here - 1
        by_pack = _stable_argsort(pack_of, packs_here)  # a pack's chunks keep their (shuffled) window order
        chunk_ids.append(ids[by_pack])
        pack_sizes.append(np.bincount(pack_of, minlength=packs_here))
        num_packs += packs_here
    del order
    chunk_ids_all = np.concatenate(chunk_ids) if chunk_ids else np.empty(0, dtype=np.int64)
    sizes = np.concatenate(pack_sizes) if pack_sizes else np.empty(0, dtype=np.int64)
    del chunk_ids, pack_sizes
    if config.shuffle:
        # FFD fills packs longest-first: shuffle the pack order so pack index does not track sample length.
        # Pack q moves to position perm[q]; whole packs move, so this is a gather of chunk ranges.
        first_chunk = np.cumsum(sizes) - sizes
        old_pack_at = np.argsort(rng.permutation(num_packs))
        sizes = sizes[old_pack_at]
        new_first = np.cumsum(sizes) - sizes
        chunk_ids_all = chunk_ids_all[np.repeat(first_chunk[old_pack_at] - new_first, sizes)
                                      + np.arange(n, dtype=np.int64)]
    pack_offsets = np.zeros(num_packs + 1, dtype=np.int64)
    np.cumsum(sizes, out=pack_offsets[1:])
    lengths = np.asarray(lengths)
    packed_tokens = int(length.sum(dtype=np.int64))
    stats = PackingStats(
        documents=int(lengths.size),
        input_tokens=int(lengths.sum(dtype=np.int64)),
        packed_tokens=packed_tokens,
        chunks=int(n),
        packs=num_packs,
        fill_rate=packed_tokens / (num_packs * seq) if num_packs else 0.0,
        **counts,
    )
    return PackPlan(
        chunk_doc=doc[chunk_ids_all],
        chunk_start=start[chunk_ids_all],
        chunk_length=length[chunk_ids_all],
        pack_offsets=pack_offsets,
        seq_length=seq,
        stats=stats,
    )


@dataclass
class Pack:
    """One packed sequence, ready for the model's packed attention (micro-batch of one sequence)."""

    tokens: np.ndarray  # int64 [S]
    labels: np.ndarray  # int64 [S]: labels[t] = tokens[t+1] inside a document, pad id at a document's last position
    loss_mask: np.ndarray  # float32 [S]: see packed_loss_mask
    position_ids: np.ndarray  # int64 [S], restarting at 0 per document (and in the padding segment)
    cu_seqlens: np.ndarray  # int32 [segments + 1], 0 ... S; trailing padding is its own last segment
    source_ids: np.ndarray  # int64 [S], source index per token, PAD_SOURCE_ID on padding
    num_documents: int  # documents in the pack (not counting the padding segment)


def packed_loss_mask(target_mask: np.ndarray, cu_seqlens: np.ndarray) -> np.ndarray:
    """Per-position loss weight of a packed sequence.

    Position ``t`` has loss iff ``t + 1`` is in the same segment and token ``t + 1`` is a target token
    (``target_mask[t + 1] == 1``). So no position predicts the next document's first token, and padding (whose
    target mask is 0) carries none.
    """
    target_mask = np.asarray(target_mask)
    cu_seqlens = np.asarray(cu_seqlens)
    if cu_seqlens.ndim != 1 or cu_seqlens.size < 2 or cu_seqlens[0] != 0 or cu_seqlens[-1] != target_mask.size:
        raise ValueError(f"cu_seqlens must run from 0 to {target_mask.size}, got {cu_seqlens.tolist()}")
    if np.any(np.diff(cu_seqlens) <= 0):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cu_seqlens.tolist()}")
    loss = np.zeros(target_mask.size, dtype=np.float32)
    loss[:-1] = target_mask[1:] != 0
    loss[cu_seqlens[1:] - 1] = 0.0  # a segment's last position predicts nothing
    return loss


def assemble_pack(
    tokens: Sequence[np.ndarray],
    target_masks: Sequence[np.ndarray],
    source_ids: Sequence[int],
    seq_length: int,
    pad_id: int,
) -> Pack:
    """Materialise one pack from its documents' tokens, target masks (1 = token is a loss target) and sources."""
    if not len(tokens) == len(target_masks) == len(source_ids):
        raise ValueError(f"got {len(tokens)} token arrays, {len(target_masks)} masks, {len(source_ids)} source ids")
    doc_lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    for i, (t, m) in enumerate(zip(tokens, target_masks)):
        if len(t) == 0:
            raise ValueError(f"document {i} of the pack is empty")
        if len(m) != len(t):
            raise ValueError(f"document {i}: {len(t)} tokens but {len(m)} target-mask entries")
    used = int(doc_lengths.sum())
    if used > seq_length:
        raise ValueError(f"documents hold {used} tokens, more than seq_length={seq_length}")
    segment_lengths = doc_lengths if used == seq_length else np.append(doc_lengths, seq_length - used)
    cu_seqlens = np.zeros(segment_lengths.size + 1, dtype=np.int32)
    np.cumsum(segment_lengths, out=cu_seqlens[1:])

    flat_tokens = np.full(seq_length, pad_id, dtype=np.int64)
    target = np.zeros(seq_length, dtype=np.uint8)
    sources = np.full(seq_length, PAD_SOURCE_ID, dtype=np.int64)
    if tokens:
        flat_tokens[:used] = np.concatenate(tokens)
        target[:used] = np.concatenate(target_masks)
        sources[:used] = np.repeat(np.asarray(source_ids, dtype=np.int64), doc_lengths)
    segment_starts = cu_seqlens[:-1].astype(np.int64)
    position_ids = np.arange(seq_length, dtype=np.int64) - np.repeat(segment_starts, segment_lengths)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    labels[:-1] = flat_tokens[1:]
    labels[cu_seqlens[1:] - 1] = pad_id
    return Pack(
        tokens=flat_tokens,
        labels=labels,
        loss_mask=packed_loss_mask(target, cu_seqlens),
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        source_ids=sources,
        num_documents=len(tokens),
    )
