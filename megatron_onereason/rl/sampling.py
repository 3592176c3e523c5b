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

from typing import Callable, Optional, Sequence, Tuple

import torch



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
    allowed_ids: torch.Tensor,
    vocab_start: int = 0,
    tp_group=None,
    reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """:func:`allowed_log_mass` over vocabulary-parallel logits (megatron's TP-sharded output layer).

    logits ``[P, V_local]``: this rank's columns ``[vocab_start, vocab_start + V_local)`` at P positions;
    allowed_ids ``[P, A]``: the allowed *global* token ids of each position, distinct, padded with −1. Each rank sums
    ``exp(z − m)`` over its columns (``m`` the global row max, all-reduced with MAX over ``tp_group``), then
    ``reduce_sum`` adds the partial sums over the group — pass megatron's autograd-aware
    ``reduce_from_tensor_model_parallel_region`` (forward all-reduce, backward identity, as the loss is replicated
    on the TP ranks). With one rank (``tp_group`` None) both are identities. Differentiable in ``logits``.
    """
    if logits.dim() != 2 or allowed_ids.dim() != 2 or allowed_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"need logits [P, V_local] and allowed_ids [P, A], got {tuple(logits.shape)} and "
                         f"{tuple(allowed_ids.shape)}")
    v_local = logits.shape[1]
    local = allowed_ids.long() - vocab_start
    in_shard = (allowed_ids >= 0) & (local >= 0) & (local < v_local)
    row_max = logits.detach().max(dim=-1).values
    if tp_group is not None:
        torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    shifted = logits - row_max[:, None]
    allowed = shifted.gather(-1, local.clamp(0, v_local - 1)).masked_fill(~in_shard, float("-inf"))
    sums = torch.stack([shifted.exp().sum(-1), allowed.exp().sum(-1)])
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


def item_allowed_ids(pack, trees: Sequence, domains: Sequence[Optional[str]], constraint) -> Tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """The constrained positions of a tree pack and their allowed ids, for the actor's renormalisation.

    ``pack``: :func:`megatron_onereason.rl.tree_pack.pack_trees` of ``trees`` (``.prompt``, ``.trace``,
    ``.children``); ``domains``: each tree's prompt domain (its begin token is forced; None: any live begin token);
    ``constraint``: the :class:`~megatron_onereason.generation.constrained.ItemicConstraint` the rollout sampled
    under. Item token 0 is an item start (the forced begin token, or the live ones); later item tokens are what the
    constraint allows after the tokens before them. Returns ``(positions [P], ids [P, A])``, ids −1 padded, for
    ``TreePack.item_allowed``.
    """
    positions, allowed = [], []
    for i, (tree, domain) in enumerate(zip(trees, domains)):
        context = [int(t) for t in tree.prompt] + [int(t) for t in tree.trace]
        start = ([constraint.vocab.begin_id(domain)] if domain is not None else list(constraint.live_begin_ids))
        for j, child in enumerate(tree.children):
            child = [int(t) for t in child]
            rows = constraint.allowed([context + child[:t] for t in range(1, len(child))]) if len(child) > 1 else []
            for t in range(len(child)):
                ids = start if t == 0 else rows[t - 1].nonzero().flatten().tolist()
                if child[t] not in ids:
                    raise ValueError(f"tree {i} item {j} token {t} ({child[t]}) is not allowed by the constraint: "
                                     "the rollout did not sample under it (rollout.sampling=constrained)")
                positions.append(int(pack.child_index[i, j, t]))
                allowed.append(ids)
    width = max(len(a) for a in allowed)
    ids = torch.full((len(allowed), width), -1, dtype=torch.long)
    for r, a in enumerate(allowed):
        ids[r, : len(a)] = torch.tensor(a, dtype=torch.long)
    return torch.tensor(positions, dtype=torch.long), ids
