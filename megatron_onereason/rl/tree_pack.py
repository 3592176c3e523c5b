"""Shared-prefix ("tree") packing of two-stage rollouts: each reasoning trace is forwarded once (OneReason §6.1).

A two-stage rollout has, per trace, ``prompt + trace`` followed by K item completions. Materialising the K
sequences repeats the trace K times; instead one pack holds ``prompt + trace`` once and then K short child
segments. Child ``j`` is ``[x_last, c_j1, ..., c_jT]``: a copy of the trace's last token (same RoPE position,
``L − 1``) followed by the completion at positions ``L, L+1, ...``. Child tokens attend to ``prompt + trace``
without its last token (the copy stands in for it, so no key appears twice) and causally within the child.
Every attention row and every RoPE angle is then exactly that of the materialised sequence ``prompt + trace +
child_j``, so log-probs are identical, while the copy's logits give child ``j`` its own first-token prediction.
Several trees are packed block-diagonally; trailing padding is one causal segment of its own.

The structure is a :class:`~megatron_onereason.model.pack_layout.PackLayout` (one segment per tree: trunk = prompt +
trace, children = the copies + completions, ``prefix = trunk − 1``), built here on the host with the pack. The
megatron actor passes ``pack_params(pack.layout, device)`` as ``packed_seq_params`` (RoPE positions and the tree attention
of :mod:`megatron_onereason.model.packed_attention`, no ``S × S`` mask); transformers references take
:attr:`TreePack.allowed` and :attr:`TreePack.position_ids`. :func:`tree_logprobs_layout` maps per-position log-probs
back to the ``[N, Tr]`` / ``[N, K, Tc]`` layout of :func:`megatron_onereason.rl.losses.shared_prefix_policy_loss`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_onereason.model.pack_layout import PackLayout, Segment


@dataclass(frozen=True)
class TreeSequence:
    prompt: Sequence[int]  # at least one token
    trace: Sequence[int]  # reasoning tokens (may be empty: non-thinking mode)
    children: Sequence[Sequence[int]]  # K item completions (each at least one token)


@dataclass
class TreePack:
    tokens: torch.Tensor  # int64 [S]
    layout: PackLayout  # attention structure (host-side)
    labels: torch.Tensor  # int64 [S]: the token whose log-prob position t gives (0 where none)
    trace_index: torch.Tensor  # int64 [N, Tr]: pack position predicting trace token j (-1 = padding)
    child_index: torch.Tensor  # int64 [N, K, Tc]: pack position predicting child token i (-1 = padding)
    # Constrained sampling (rl/sampling.py): pack positions whose label was sampled from a renormalised
    # distribution ([P]) and the allowed token ids there ([P, A], -1 padded); the actor scores them renormalised.
    item_allowed: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def position_ids(self) -> torch.Tensor:
        """int64 ``[S]`` RoPE positions."""
        return torch.from_numpy(self.layout.position_ids())

    @property
    def allowed(self) -> torch.Tensor:
        """bool ``[S, S]``, True where a query row may attend a key column: for transformers references only."""
        return self.layout.dense_mask()

    @property
    def trace_mask(self) -> torch.Tensor:
        return self.trace_index >= 0

    @property
    def child_mask(self) -> torch.Tensor:
        return self.child_index >= 0


def pack_trees(trees: Sequence[TreeSequence], length: Optional[int] = None) -> TreePack:
    """Pack trees into one sequence (padded to ``length``; the padding is one causal segment)."""
    if not trees:
        raise ValueError("pack_trees needs at least one tree")
    k = len(trees[0].children)
    if k == 0 or any(len(t.children) != k for t in trees):
        raise ValueError(f"every tree needs the same K >= 1 children, got {[len(t.children) for t in trees]}")
    tokens: List[int] = []
    labels: List[int] = []
    segments: List[Segment] = []
    t_trace = max(len(t.trace) for t in trees)
    t_child = max(len(c) for t in trees for c in t.children)
    trace_index = torch.full((len(trees), t_trace), -1, dtype=torch.long)
    child_index = torch.full((len(trees), k, t_child), -1, dtype=torch.long)
    for i, tree in enumerate(trees):
        if len(tree.prompt) == 0 or any(len(c) == 0 for c in tree.children):
            raise ValueError(f"tree {i}: empty prompt or child")
        main = list(tree.prompt) + list(tree.trace)
        start = len(tokens)
        tokens += main
        labels += main[1:] + [0]
        # Trace token j is predicted at main position len(prompt) - 1 + j.
        trace_index[i, : len(tree.trace)] = torch.arange(len(tree.trace)) + start + len(tree.prompt) - 1
        for j, child in enumerate(tree.children):
            child_index[i, j, : len(child)] = torch.arange(len(child)) + len(tokens)
            tokens += [main[-1]] + list(child)
            labels += list(child) + [0]
        segments.append(Segment(len(main), len(main) - 1, tuple(len(c) + 1 for c in tree.children)))
    total = len(tokens)
    size = total if length is None else length
    if size < total:
        raise ValueError(f"trees need {total} positions, more than length={length}")
    if size > total:
        segments.append(Segment(size - total))
        tokens += [0] * (size - total)
        labels += [0] * (size - total)
    return TreePack(torch.tensor(tokens), PackLayout(tuple(segments)), torch.tensor(labels), trace_index, child_index)


def tree_logprobs_layout(logp: torch.Tensor, pack: TreePack):
    """Per-position log-probs ``[S]`` → ``(trace_logp [N, Tr], child_logp [N, K, Tc])`` (0 at padding)."""
    trace = torch.where(pack.trace_mask, logp[pack.trace_index.clamp(min=0)], torch.zeros((), dtype=logp.dtype))
    child = torch.where(pack.child_mask, logp[pack.child_index.clamp(min=0)], torch.zeros((), dtype=logp.dtype))
    return trace, child
