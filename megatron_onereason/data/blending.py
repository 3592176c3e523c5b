"""Blending preprocessed corpora by token ratio (OneReason appendix C.2), with per-source loss accounting.

:func:`blend_documents` picks, for each source, whole documents until the source's share of the total token budget
is reached (full shuffled passes first, then a shuffled prefix of one more pass), so the realised token ratios match
the weights to within one document per source. The blended documents are then packed together
(:mod:`megatron_onereason.data.packing`), so a pack mixes sources; every token carries its source index
(``Pack.source_ids``) and :func:`loss_by_source` turns per-token losses into per-source sums for logging.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


@dataclass(frozen=True)
class BlendComponent:
    name: str  # what per-source losses are logged under
    prefix: str  # output prefix given to tools/preprocess_data.py
    weight: float  # relative token share


@dataclass(frozen=True)
class BlendConfig:
    components: Tuple[BlendComponent, ...]
    total_tokens: Optional[int] = None  # None: the largest budget that repeats no source
    seed: int = 0


def parse_blend(spec: Sequence[str]) -> Tuple[BlendComponent, ...]:
    """Megatron-style ``["0.3", "path/a", "0.7", "path/b"]`` → components named after the prefixes' basenames."""
    if len(spec) % 2 or not spec:
        raise ValueError(f"blend needs weight/prefix pairs, got {list(spec)}")
    components = []
    for weight, prefix in zip(spec[::2], spec[1::2]):
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"blend weight {weight!r} (before {prefix!r}) is not a number") from None
        components.append(BlendComponent(os.path.basename(prefix), prefix, w))
    names = [c.name for c in components]
    if len(set(names)) != len(names):
        raise ValueError(f"blend prefixes need distinct basenames, got {names}")
    return tuple(components)


@dataclass
class BlendPlan:
    """The blended document list: document ``k`` is document ``doc_of[k]`` of source ``source_of[k]``."""

    source_of: np.ndarray  # [docs], integer (int16 as planned)
    doc_of: np.ndarray  # [docs], integer (int32 as planned below 2**31 documents per source)
    lengths: np.ndarray  # [docs], the sources' integer type
    names: List[str]
    tokens_per_source: np.ndarray  # int64 [sources], tokens taken
    epochs_per_source: np.ndarray  # float64 [sources], tokens taken / tokens the source has

    def stats(self) -> Dict:
        total = max(int(self.tokens_per_source.sum()), 1)
        return {name: {"tokens": int(t), "ratio": int(t) / total, "epochs": float(e)}
                for name, t, e in zip(self.names, self.tokens_per_source, self.epochs_per_source)}


def blend_documents(
    lengths_per_source: Sequence[np.ndarray],
    weights: Sequence[float],
    names: Sequence[str],
    total_tokens: Optional[int] = None,
    seed: int = 0,
) -> BlendPlan:
    """Choose documents from each source so that source ``i`` gets ``weights[i] / sum(weights)`` of the tokens."""
    if not len(lengths_per_source) == len(weights) == len(names) or not weights:
        raise ValueError(f"need one weight and name per source, got {len(lengths_per_source)} sources, "
                         f"{len(weights)} weights, {len(names)} names")
    if len(weights) > np.iinfo(np.int16).max:
        raise ValueError(f"at most {np.iinfo(np.int16).max} blend sources, got {len(weights)}")
    weights = np.asarray(weights, dtype=np.float64)
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights.tolist()}")
    lengths_per_source = [np.asarray(lengths) for lengths in lengths_per_source]  # no copy: may be memory maps
    available = np.array([lengths.sum(dtype=np.int64) for lengths in lengths_per_source], dtype=np.int64)
    share = weights / weights.sum()
    for name, s, a in zip(names, share, available):
        if s > 0 and a == 0:
            raise ValueError(f"blend source {name!r} has weight > 0 but no tokens")
    if total_tokens is None:
        total_tokens = int(min(a / s for a, s in zip(available, share) if s > 0))
    if total_tokens < 0:
        raise ValueError(f"total_tokens must be >= 0, got {total_tokens}")
    rng = np.random.default_rng(seed)
    sources, docs = [], []
    taken = np.zeros(len(weights), dtype=np.int64)
    for i, lengths in enumerate(lengths_per_source):
        want = int(round(share[i] * total_tokens))
        while want > 0:
            order = rng.permutation(lengths.size)
            if want >= available[i]:  # a whole pass
                chosen = order
            else:  # the shortest shuffled prefix reaching the remaining budget
                cumulative = np.cumsum(lengths[order], dtype=np.int64)
                chosen = order[:int(np.searchsorted(cumulative, want)) + 1]
                del cumulative
            tokens = int(lengths[chosen].sum(dtype=np.int64))
            want -= tokens
            taken[i] += tokens
            docs.append(chosen.astype(np.int32) if lengths.size < 2**31 else chosen)
            sources.append(np.full(chosen.size, i, dtype=np.int16))
            del order, chosen
    doc_of = np.concatenate(docs) if docs else np.empty(0, np.int64)
    del docs
    source_of = np.concatenate(sources) if sources else np.empty(0, np.int16)
    del sources
    lengths = _lengths_of(lengths_per_source, source_of, doc_of)
    return BlendPlan(source_of, doc_of, lengths, list(names), taken,
                     np.divide(taken, available, out=np.zeros(len(weights)), where=available > 0))


def _lengths_of(lengths_per_source: Sequence[np.ndarray], source_of: np.ndarray, doc_of: np.ndarray) -> np.ndarray:
    out = np.empty(doc_of.size, dtype=np.result_type(*lengths_per_source) if lengths_per_source else np.int64)
    for i, lengths in enumerate(lengths_per_source):
        sel = source_of == i
        out[sel] = lengths[doc_of[sel]]
    return out


def loss_by_source(
    token_loss: torch.Tensor, loss_mask: torch.Tensor, source_ids: torch.Tensor, num_sources: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-source ``(sum of masked token losses, sum of mask)`` — divide after reducing across ranks.

    Positions with a negative source id (padding) are ignored.
    """
    if not token_loss.shape == loss_mask.shape == source_ids.shape:
        raise ValueError(f"shapes differ: loss {tuple(token_loss.shape)}, mask {tuple(loss_mask.shape)}, "
                         f"sources {tuple(source_ids.shape)}")
    valid = source_ids >= 0
    index = source_ids[valid].long()
    weight = loss_mask[valid].to(token_loss.dtype)
    sums = torch.zeros(num_sources, dtype=token_loss.dtype, device=token_loss.device)
    counts = torch.zeros(num_sources, dtype=token_loss.dtype, device=token_loss.device)
    sums.index_add_(0, index, token_loss[valid].detach() * weight)
    counts.index_add_(0, index, weight)
    return sums, counts
