"""The sampling distribution of RL rollouts: one definition shared by the rollout engine and the loss.

A token's probability under the behaviour policy μ is ``softmax(logits / T)`` restricted to the tokens allowed at
that position and renormalised over them:

    μ(o_t) = exp(z_{o_t} / T) / Σ_{a ∈ A_t} exp(z_a / T),   o_t ∈ A_t

Two modes (``rollout.sampling``):

- ``constrained`` (the default): at item positions ``A_t`` is the set of catalog continuations (the item trie,
  :class:`megatron_onereason.generation.constrained.ItemicConstraint`; an item start allows the begin tokens). The
  actor scores item tokens with the same renormalisation: ``log μ = log π_raw − log Σ_{a ∈ A_t} π_raw(a)``
  (:func:`renormalised_logprobs`, vocabulary-parallel in the actor), otherwise the ratio of eq. 10 compares two
  different distributions and clips for no policy change. Every completion is a catalog item, as at evaluation.
- ``unconstrained`` (OneReason's Fig. 16 counts invalid itemic tokens generated during RL): ``A_t`` is every real
  token of the vocabulary. The actor's plain log-softmax is the same distribution at ``T = 1``; completions that
  are not catalog items get no reward and are counted (:class:`megatron_onereason.rl.metrics.ItemValidity`).

The default is ``constrained`` because an unconstrained rollout of a model that does not yet write valid items
(a fresh or small model) earns no reward at all; ``unconstrained`` is the setting of the report's invalid-token
measurements. Outside item positions both sides use the plain log-softmax; the rollout's remaining masks (stop
tokens inside a trace, itemic patterns inside the CoT) are corrected by the importance weights.

A temperature ``T ≠ 1`` makes μ differ from the trained policy (``T = 1``) in both modes; the truncated importance
weights of :mod:`megatron_onereason.rl.losses` correct for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from megatron_onereason.tokenizer.item_trie import ItemTrie


def _check(logits: torch.Tensor, tokens: torch.Tensor, allowed: Optional[torch.Tensor]) -> None:
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}, logits {tuple(logits.shape)}: expected "
                         f"{tuple(logits.shape[:-1])}")
    if allowed is not None:
        if allowed.shape != logits.shape or allowed.dtype != torch.bool:
            raise ValueError(f"allowed must be a bool tensor of shape {tuple(logits.shape)}, got "
                             f"{allowed.dtype} {tuple(allowed.shape)}")
        if not allowed.gather(-1, tokens[..., None].long()).all():
            raise ValueError("a sampled token is not allowed at its position: the mask is not the one it was "
                             "sampled under")


def sampling_logprobs(logits: torch.Tensor, tokens: torch.Tensor, allowed: Optional[torch.Tensor] = None,
                      temperature: float = 1.0) -> torch.Tensor:
    """``log μ(tokens)`` under ``softmax(logits / T)`` renormalised over ``allowed`` (module docstring).

    logits ``[*B, V]``; tokens ``[*B]`` (int); allowed ``[*B, V]`` bool or None (every token allowed). Temperature
    0 (greedy) scores at temperature 1, as a beam or argmax decoder's tokens carry no sampling temperature.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    _check(logits, tokens, allowed)
    scaled = logits / (temperature if temperature > 0 else 1.0)
    if allowed is not None:
        scaled = scaled.masked_fill(~allowed, float("-inf"))
    return torch.log_softmax(scaled, dim=-1).gather(-1, tokens[..., None].long())[..., 0]


def allowed_log_mass(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``log Σ_{a ∈ A} softmax(logits)_a`` ``[*B]``: the log of the probability the unconstrained policy puts on the
    allowed set (0 where everything is allowed; −inf where nothing is)."""
    if allowed.shape != logits.shape or allowed.dtype != torch.bool:
        raise ValueError(f"allowed must be a bool tensor of shape {tuple(logits.shape)}")
    return (torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            - torch.logsumexp(logits, dim=-1))


def vocab_parallel_allowed_log_mass(
    logits: torch.Tensor,
    allowed_ids: Union[torch.Tensor, "ItemAllowedSets"],
    vocab_start: int = 0,
    tp_group=None,
    reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """:func:`allowed_log_mass` over vocabulary-parallel logits (megatron's TP-sharded output layer).

    logits ``[P, V_local]``: this rank's columns ``[vocab_start, vocab_start + V_local)`` at P positions;
    allowed_ids: the allowed *global* token ids of each position — ``[P, A]`` distinct ids padded with −1, or an
    :class:`ItemAllowedSets` (the catalog trie's sets by reference, what the actor gets). Each rank sums
    ``exp(z − m)`` over its columns (``m`` the global row max, all-reduced with MAX over ``tp_group``), then
    ``reduce_sum`` adds the partial sums over the group — pass megatron's autograd-aware
    ``reduce_from_tensor_model_parallel_region`` (forward all-reduce, backward identity, as the loss is replicated
    on the TP ranks). With one rank (``tp_group`` None) both are identities. Differentiable in ``logits``.
    """
    sets = allowed_ids if isinstance(allowed_ids, ItemAllowedSets) else None
    rows_p = len(sets) if sets is not None else (allowed_ids.shape[0] if allowed_ids.dim() == 2 else -1)
    if logits.dim() != 2 or rows_p != logits.shape[0]:
        raise ValueError(f"need logits [P, V_local] and allowed ids for the same P positions, got "
                         f"{tuple(logits.shape)} and {rows_p if sets is not None else tuple(allowed_ids.shape)}")
    v_local = logits.shape[1]
    row_max = logits.detach().max(dim=-1).values
    if tp_group is not None:
        torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    exp = (logits - row_max[:, None]).exp()
    if sets is None:
        rows, ids = (allowed_ids >= 0).nonzero(as_tuple=True)
        ids = allowed_ids[rows, ids]
    else:
        rows, ids = sets.listed_pairs(logits.device)
    local = ids.long() - vocab_start
    in_shard = (local >= 0) & (local < v_local)
    rows, local = rows[in_shard], local[in_shard]
    allowed = torch.zeros_like(row_max).index_add(0, rows, exp[rows, local])
    if sets is not None:  # a root's children (a whole code level): one column gather for the rows at that root
        for root_rows, columns in sets.root_columns(logits.device):
            columns = columns - vocab_start
            columns = columns[(columns >= 0) & (columns < v_local)]
            # [rows, columns] gathered directly (broadcast indices): no copy of the rows' full vocabulary
            allowed = allowed.index_add(0, root_rows, exp[root_rows[:, None], columns[None, :]].sum(-1))
    sums = torch.stack([exp.sum(-1), allowed])
    if reduce_sum is not None:
        sums = reduce_sum(sums)
    return sums[1].log() - sums[0].log()


def renormalised_logprobs(raw_logp: torch.Tensor, log_mass: torch.Tensor) -> torch.Tensor:
    """Constrained log-probs from unconstrained ones: ``log π_raw(o_t) − log Σ_{a ∈ A_t} π_raw(a)``.

    The actor side of the ``constrained`` mode: ``raw_logp`` is the plain log-softmax of the sampled token,
    ``log_mass`` its position's :func:`allowed_log_mass` (0 at unconstrained positions). Gradients flow through
    both, so the normaliser's dependence on θ is part of the policy gradient.
    """
    if raw_logp.shape != log_mass.shape:
        raise ValueError(f"raw_logp {tuple(raw_logp.shape)} and log_mass {tuple(log_mass.shape)} differ in shape")
    if (log_mass.detach() > 1e-6).any():
        raise ValueError("log_mass must be <= 0 (a log-probability mass)")
    return raw_logp - log_mass


@dataclass
class ItemAllowedSets:
    """The allowed token ids at P constrained positions (a tree pack's item tokens), by reference to the catalog
    trie instead of written out: what the driver sends the actor per step.

    Row ``p`` allows either the ids listed in ``listed[p]`` (an item start: the forced or the live begin tokens; an
    item's end token) or, where ``node[p] >= 0``, the code tokens of that trie node's children (the catalog
    continuations). The trie pickles by reference (:class:`~megatron_onereason.tokenizer.item_trie.ItemTrie`): an
    actor rank builds it once from the catalog, so a step costs ``P × (A + 1)`` integers, not ``P ×`` the widest
    set (≈ 8192 at a 3 × 8192 catalog's first level).
    """

    listed: torch.Tensor  # int64 [P, A]: allowed ids, −1 padded (all −1 where node >= 0)
    node: torch.Tensor  # int64 [P]: trie node whose children are allowed, −1 where the ids are listed
    trie: "ItemTrie"
    code_tokens: torch.Tensor  # int64 [levels, codebook_size]: token id of each (level, code)

    def __len__(self) -> int:
        return self.node.shape[0]

    def to(self, device) -> "ItemAllowedSets":
        """Itself: the device tensors are made where they are used (:func:`vocab_parallel_allowed_log_mass`)."""
        return self

    def listed_pairs(self, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(rows, ids)`` on ``device``: the listed ids and the children of the nodes below the roots (small sets:
        a few hundred at most per row), flattened."""
        node = self.node.numpy()
        deep = np.where(node >= self.trie.roots, node, -1)
        rows, edges = self.trie.child_pairs(deep)
        code_tokens = self.code_tokens.numpy()
        ids = code_tokens[self.trie.depth[edges + self.trie.roots] - 1, self.trie.edge_code[edges]]
        listed_rows, listed_cols = (self.listed >= 0).nonzero(as_tuple=True)
        rows = torch.cat([listed_rows, torch.from_numpy(rows)])
        ids = torch.cat([self.listed[listed_rows, listed_cols], torch.from_numpy(ids)])
        return rows.to(device), ids.to(device)

    def root_columns(self, device) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per trie root some row sits at: ``(rows, token ids of the root's children)`` on ``device`` (a first code
        level: up to the codebook size, the same for every row at that root)."""
        out = []
        node = self.node
        for root in torch.unique(node[(node >= 0) & (node < self.trie.roots)]).tolist():
            codes = self.trie.children(root)
            out.append(((node == root).nonzero().flatten().to(device),
                        self.code_tokens[0, torch.from_numpy(codes)].to(device)))
        return out

    def sets(self) -> List[List[int]]:
        """Every row's allowed ids, sorted (for tests and checks; the loss never writes them out)."""
        rows, ids = self.listed_pairs("cpu")
        out: List[List[int]] = [[] for _ in range(len(self))]
        for r, i in zip(rows.tolist(), ids.tolist()):
            out[r].append(i)
        for root_rows, columns in self.root_columns("cpu"):
            for r in root_rows.tolist():
                out[r].extend(columns.tolist())
        return [sorted(s) for s in out]


def item_allowed_ids(pack, trees: Sequence, domains: Sequence[Optional[str]], constraint) -> Tuple[torch.Tensor,
                                                                                                    ItemAllowedSets]:
    """The constrained positions of a tree pack and their allowed ids, for the actor's renormalisation.

    ``pack``: :func:`megatron_onereason.rl.tree_pack.pack_trees` of ``trees`` (``.prompt``, ``.trace``,
    ``.children``); ``domains``: each tree's prompt domain (its begin token is forced; None: any live begin token);
    ``constraint``: the :class:`~megatron_onereason.generation.constrained.ItemicConstraint` the rollout sampled
    under (with its catalog trie). Item token 0 is an item start (the forced begin token, or the live ones); token
    ``t`` in ``1 .. levels`` continues the catalog prefix of codes ``1 .. t-1`` (the trie node's children); token
    ``levels + 1`` is the begin key's end token. The same sets ``constraint.allowed`` gives after the tokens before
    each position; computed for all children at once, one trie ``searchsorted`` per level. Returns
    ``(positions [P], ItemAllowedSets)`` for ``TreePack.item_allowed``.
    """
    trie, vocab = constraint.trie, constraint.vocab
    if trie is None:
        raise ValueError("the actor's renormalisation needs the catalog trie the rollout sampled under")
    levels = vocab.levels
    width = levels + 1 + bool(vocab.end_ids)
    code_tokens = trie.code_tokens(vocab)
    level_of = np.full(constraint.vocab_size, -1, dtype=np.int64)
    code_of = np.full(constraint.vocab_size, -1, dtype=np.int64)
    for level in range(levels):
        level_of[code_tokens[level]] = level
        code_of[code_tokens[level]] = np.arange(trie.codebook_size)
    root_of = np.full(constraint.vocab_size, -1, dtype=np.int64)
    end_of_root = np.full(trie.roots, -1, dtype=np.int64)
    for key, root in trie.root.items():
        root_of[vocab.begin_ids[key]] = root
        if vocab.end_ids:
            end_of_root[root] = vocab.end_ids[key]
    starts = [[vocab.begin_id(d)] if d is not None else list(constraint.live_begin_ids) for d in domains]
    owners, tokens = [], []  # (tree, item), item tokens padded with -1
    for i, tree in enumerate(trees):
        for j, child in enumerate(tree.children):
            if len(child) > width:
                raise ValueError(f"tree {i} item {j} has {len(child)} tokens, an item at most {width}")
            owners.append((i, j))
            tokens.append(list(child) + [-1] * (width - len(child)))
    tok = np.array(tokens, dtype=np.int64).reshape(len(owners), width)
    length = (tok >= 0).sum(1)
    listed_width = max([1] + [len(s) for s in starts])
    listed = np.full((len(owners), width, listed_width), -1, dtype=np.int64)
    node = np.full((len(owners), width), -1, dtype=np.int64)
    ok = np.ones((len(owners), width), dtype=bool)
    for c, (i, _) in enumerate(owners):
        listed[c, 0, :len(starts[i])] = starts[i]
        ok[c, 0] = tok[c, 0] in starts[i]
    root = np.where(tok[:, 0] >= 0, root_of[np.maximum(tok[:, 0], 0)], -1)
    current = root  # the item's trie node so far
    for t in range(1, width):
        live = length > t
        if t <= levels:
            node[:, t] = current
            code = np.where(level_of[np.maximum(tok[:, t], 0)] == t - 1, code_of[np.maximum(tok[:, t], 0)], -1)
            current = trie.step(current, code)
            ok[:, t] = current >= 0
        else:
            end = np.where(current >= 0, end_of_root[np.maximum(root, 0)], -1)  # a complete item: its end token
            listed[:, t, 0] = end
            ok[:, t] = (end >= 0) & (tok[:, t] == end)
        ok[:, t] |= ~live
    bad = np.argwhere(~ok & (np.arange(width)[None] < length[:, None]))
    if len(bad):
        c, t = bad[0]
        i, j = owners[c]
        raise ValueError(f"tree {i} item {j} token {t} ({tok[c, t]}) is not allowed by the constraint: the rollout "
                         "did not sample under it (rollout.sampling=constrained)")
    keep = np.arange(width)[None] < length[:, None]
    child_index = pack.child_index.numpy()
    positions = np.concatenate([child_index[i, j, :length[c]] for c, (i, j) in enumerate(owners)]) if owners \
        else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(positions.astype(np.int64)), ItemAllowedSets(
        torch.from_numpy(listed[keep]), torch.from_numpy(node[keep]), trie, torch.from_numpy(code_tokens))
