"""Rejection-sampling fine-tuning data selection (OneReason §6.2, eq. 14).

Domain-specialised GRPO teachers generate trajectories; the verified ones (the predicted item hits ``C_u^+``)
with well-formed, legal itemic patterns are merged across teachers into ``D_RFT`` and trained on with eq. 15
(:func:`megatron_onereason.rl.losses.sft_loss`).
"""
from __future__ import annotations

from typing import Collection, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from megatron_onereason.tokenizer.itemic_tokens import ItemicPatternError, ItemicScheme

DROP_REASONS = ("miss", "malformed", "illegal", "duplicate", "over_cap")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class RFTSelection(NamedTuple):
    kept: List[dict]  # the kept sample dicts, unchanged, in input order
    dropped: Dict[str, int]  # DROP_REASONS -> number of samples dropped for that reason (first reason only)


def _well_formed_items(response: str, scheme: ItemicScheme) -> Optional[list]:
    """Every item in ``response`` as an :class:`ItemMatch`; None when the response is malformed:
    a bad itemic pattern, a ``<think>`` block that is never closed, or no item after the reasoning."""
    try:
        items = scheme.find_items(response)
    except ItemicPatternError:
        return None
    answer_start = 0
    if THINK_OPEN in response or THINK_CLOSE in response:
        close = response.rfind(THINK_CLOSE)
        if close < 0 or close < response.rfind(THINK_OPEN):
            return None
        answer_start = close + len(THINK_CLOSE)
    if not any(start >= answer_start for start, _, _, _ in items):
        return None
    return items


def select_rft_trajectories(
    samples: Sequence[dict],
    hit: Sequence[bool],
    dedupe: bool = True,
    max_per_user: Optional[int] = None,
    legal_items: Optional[Collection[Tuple[str, Tuple[int, ...]]]] = None,
    *,
    scheme: ItemicScheme,
) -> RFTSelection:
    """Build ``D_RFT = {(x_u, CoT_u, c_u)}`` (eq. 14) from the trajectories of all domain teachers.

    samples: dicts with at least ``"user_id"`` (hashable) and ``"response"`` (the generated text: optional
    ``<think>…</think>`` reasoning, then the answer with its itemic patterns); other fields (``"prompt"``,
    ``"teacher"``, ...) are carried through. hit: per sample, whether its predicted item is in ``C_u^+`` (eq. 8).

    A sample is dropped, for the first reason that applies, when it: ``miss``-es; is ``malformed`` (an itemic
    pattern that ``scheme.find_items`` rejects, an unclosed ``<think>``, or no item in the answer); names an
    ``illegal`` item (anywhere in the response) outside ``legal_items`` (a set of catalog ``(domain, codes)``; with
    a begin token shared by all domains only the codes count), when given;
    is a ``duplicate`` of an earlier kept (user_id, response) pair, with ``dedupe``; or is ``over_cap``: beyond the
    first ``max_per_user`` kept samples of its user.
    """
    if isinstance(hit, torch.Tensor):
        hit = hit.tolist()
    if len(hit) != len(samples):
        raise ValueError(f"hit has {len(hit)} entries, samples has {len(samples)}")
    if max_per_user is not None and max_per_user < 1:
        raise ValueError(f"max_per_user must be >= 1 or None, got {max_per_user}")
    legal = None if legal_items is None else {(scheme.begin_key(d), tuple(int(c) for c in codes))
                                              for d, codes in legal_items}
    dropped = dict.fromkeys(DROP_REASONS, 0)
    kept: List[dict] = []
    seen = set()
    per_user: Dict = {}
    for i, (sample, is_hit) in enumerate(zip(samples, hit)):
        if "user_id" not in sample or "response" not in sample:
            raise ValueError(f"samples[{i}] needs 'user_id' and 'response' fields, has {sorted(sample)}")
        user, response = sample["user_id"], sample["response"]
        reason = None
        if not is_hit:
            reason = "miss"
        elif (items := _well_formed_items(response, scheme)) is None:
            reason = "malformed"
        elif legal is not None and any((dom, codes) not in legal for _, _, dom, codes in items):
            reason = "illegal"
        elif dedupe and (user, response) in seen:
            reason = "duplicate"
        elif max_per_user is not None and per_user.get(user, 0) >= max_per_user:
            reason = "over_cap"
        if reason is not None:
            dropped[reason] += 1
            continue
        kept.append(sample)
        seen.add((user, response))
        per_user[user] = per_user.get(user, 0) + 1
    return RFTSelection(kept=kept, dropped=dropped)
