"""RL diagnostics logged every step: importance-weight statistics, the actor–rollout log-prob gap, invalid itemic
tokens of unconstrained decoding (OneReason Fig. 16), and the reduction of per-mini-batch metrics to one value.

Pure functions over tensors and token ids; the engine calls them and logs the dicts they return.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

from megatron_onereason.rl.losses import check_token_tensor, masked_mean, token_mask
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab


def importance_weight_stats(weights: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor,
                            prefix: str = "is") -> Dict[str, float]:
    """Statistics of the importance weights ``(w, ρ)`` of :func:`megatron_onereason.rl.losses.importance_weights`
    over ``mask``: ``{prefix}_weight_mean/min/max``, ``{prefix}_ratio_mean`` and ``{prefix}_clipped_frac`` (share
    of tokens whose weight differs from the raw ratio: truncated, or zeroed in mask mode). All 0 for an empty mask.
    """
    mask = token_mask("mask", mask, weights.shape)
    w, r = weights.detach()[mask].double(), ratio.detach()[mask].double()
    if w.numel() == 0:
        return {f"{prefix}_{k}": 0.0 for k in ("weight_mean", "weight_min", "weight_max", "ratio_mean",
                                                "clipped_frac")}
    return {f"{prefix}_weight_mean": w.mean().item(), f"{prefix}_weight_min": w.min().item(),
            f"{prefix}_weight_max": w.max().item(), f"{prefix}_ratio_mean": r.mean().item(),
            f"{prefix}_clipped_frac": (w != r).double().mean().item()}


def logprob_gap_stats(actor_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                      item_mask: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """How far the actor's log-probs of the sampled tokens are from the rollout engine's.

    ``logp_gap_abs_mean`` / ``logp_gap_abs_max``: ``|log π_actor − log μ|``; ``kl_rollout_actor``: the k3 estimate
    of ``KL(μ ‖ π_actor)`` from tokens sampled by μ (``ρ − 1 − log ρ``, ``ρ = π_actor/μ``). With ``item_mask`` the
    mean gap and the KL are also given per stage (``_cot``, ``_item``). A weight sync that did not take, a sampling
    distribution defined differently on the two sides (temperature, constraint) or low-precision numerics show here.
    """
    mask = token_mask("mask", mask, actor_logp.shape)
    check_token_tensor("actor_logp", actor_logp, actor_logp.shape, mask)
    check_token_tensor("rollout_logp", rollout_logp, actor_logp.shape, mask)
    zero = torch.zeros((), dtype=torch.float64)
    diff = torch.where(mask, actor_logp.detach().double() - rollout_logp.detach().double(), zero)
    k3 = diff.clamp(-20.0, 20.0).exp() - 1 - diff
    out = {"logp_gap_abs_mean": masked_mean(diff.abs(), mask).item(),
           "logp_gap_abs_max": diff.abs()[mask].max().item() if mask.any() else 0.0,
           "kl_rollout_actor": masked_mean(k3, mask).item()}
    if item_mask is not None:
        item = token_mask("item_mask", item_mask, mask.shape)
        for stage, sel in (("cot", mask & ~item), ("item", mask & item)):
            out[f"logp_gap_abs_mean_{stage}"] = masked_mean(diff.abs(), sel).item()
            out[f"kl_rollout_actor_{stage}"] = masked_mean(k3, sel).item()
    return out


def mean_over_minibatches(metrics: Sequence[Mapping[str, float]],
                          weights: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """One value per metric for a rollout batch trained in several mini-batches (optimizer steps).

    Keys ending in ``_min`` / ``_max`` take the min / max over the mini-batches; every other key the mean, weighted
    by ``weights`` (e.g. each mini-batch's token count; default equal). A key missing from some mini-batches is
    reduced over those that have it. Logging only the last mini-batch hides exactly what clipping does: the first
    mini-batch of a rollout batch is on-policy (ratio 1), the later ones are not.
    """
    if not metrics:
        raise ValueError("no mini-batch metrics to reduce")
    if weights is None:
        weights = [1.0] * len(metrics)
    if len(weights) != len(metrics) or any(not w >= 0 for w in weights):
        raise ValueError(f"need one non-negative weight per mini-batch, got {list(weights)} for {len(metrics)}")
    out: Dict[str, float] = {}
    for key in dict.fromkeys(k for m in metrics for k in m):
        present = [(float(m[key]), float(w)) for m, w in zip(metrics, weights) if key in m]
        values = [v for v, _ in present]
        if key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            total = sum(w for _, w in present)
            out[key] = sum(v * w for v, w in present) / total if total > 0 else sum(values) / len(values)
    return out


class ItemValidity:
    """Where an item completion leaves the catalog: the first token that no catalog item allows at its place.

    A completion is ``<begin> c_1 … c_L`` (then the begin key's end token in schemes that have one). Token 0 must be
    a begin token whose key has catalog items; token ``l`` (1 ≤ l ≤ L) the level-``l−1`` code that continues the
    codes so far to some catalog item (the trie); token ``L+1`` the matching end token; nothing after it. Under
    trie-constrained decoding every completion is valid by construction; unconstrained decoding is measured here.
    """

    def __init__(self, trie: ItemTrie, vocab: ItemicVocab):
        self.trie = trie
        self.vocab = vocab
        self.length = 1 + vocab.levels + (1 if vocab.end_ids else 0)

    def first_invalid(self, token_ids: Sequence[int]) -> Optional[int]:
        """Index of the first invalid token of one completion, or None when it is a complete catalog item."""
        key, codes = None, []
        for pos, token_id in enumerate(token_ids):
            tok = self.vocab.token(int(token_id))
            if pos == 0:
                if tok is None or tok.kind != "begin" or tok.domain not in self.trie.domains:
                    return 0
                key = tok.domain
            elif pos <= self.vocab.levels:
                if (tok is None or tok.kind != "code" or tok.level != pos - 1
                        or tok.code not in self.trie.allowed_next(key, codes)):
                    return pos
                codes.append(tok.code)
            elif pos == self.vocab.levels + 1 and self.vocab.end_ids:
                if int(token_id) != self.vocab.end_ids.get(key):
                    return pos
            else:
                return pos  # past the end of the pattern
        return None if len(token_ids) == self.length else len(token_ids)

    def rates(self, completions: Sequence[Sequence[int]]) -> Dict[str, float]:
        """``invalid_item_rate``: share of completions that are not a catalog item; ``invalid_itemic_token_rate``:
        share of completion tokens at or after their completion's first invalid token (a truncated completion
        counts its missing tokens as invalid)."""
        if not completions:
            raise ValueError("no item completions to measure")
        bad_items = bad_tokens = total = 0
        for tokens in completions:
            first = self.first_invalid(tokens)
            size = max(len(tokens), self.length)
            total += size
            if first is not None:
                bad_items += 1
                bad_tokens += size - first
        return {"invalid_item_rate": bad_items / len(completions), "invalid_itemic_token_rate": bad_tokens / total}
