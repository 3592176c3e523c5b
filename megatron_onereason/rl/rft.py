"""Rejection-sampling fine-tuning data selection (OneReason §6.2, eq. 14).

Domain-specialised GRPO teachers generate trajectories; the verified ones (the predicted item hits ``C_u^+``)
with well-formed, legal itemic patterns are merged across teachers into ``D_RFT`` and trained on with eq. 15
(:func:`megatron_onereason.rl.losses.sft_loss`).

§6.2 also filters out "low-quality or inconsistent reasoning traces", keeping "golden" paths whose CoT is aligned
with the recommendation (§6.4). The filters (:class:`RFTFilters`, config section ``rft``), each counted under its
own reason:

- ``force_closed``: the model did not close its reasoning — ``</think>`` was forced at the token budget, so the
  trace is cut mid-thought and the answer was never conditioned on a finished argument;
- ``empty_reasoning``: a thinking response whose ``<think>`` block holds no text;
- ``too_short`` / ``too_long``: reasoning outside ``[min_reasoning_tokens, max_reasoning_tokens]``;
- ``ungrounded`` (inconsistent reasoning): the CoT cites an item that is not in the user's interaction history.
  The R3 prompt asks the model to reason from the observed history only, so a cited item outside it is evidence
  the trace made up — eq. 25's history-violating hallucination (OneReason §7, Criterion 4), checkable without a
  model. The answer item itself is *not* required in the CoT: it is a new item, and the report's RFT traces
  (Tables 12–13) name evidence from the history and a category, not the target's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from megatron_onereason.tokenizer.itemic_tokens import ItemicPatternError, ItemicScheme

DROP_REASONS = ("miss", "malformed", "force_closed", "empty_reasoning", "too_short", "too_long", "illegal",
                "ungrounded", "duplicate", "over_cap")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class RFTFilters:
    """Reasoning-quality filters of §6.2 (module docstring). Sample fields they read: ``closed_by_model`` (bool),
    ``reasoning_tokens`` (int), ``history`` (the user's history items as ``(domain, codes)``)."""

    drop_force_closed: bool = True
    drop_empty_reasoning: bool = True
    min_reasoning_tokens: int = 0
    max_reasoning_tokens: Optional[int] = None
    require_history_grounding: bool = True
    max_per_user: Optional[int] = None  # keep at most this many samples per user (first come)


class RFTSelection(NamedTuple):
    kept: List[dict]  # the kept sample dicts, unchanged, in input order
    dropped: Dict[str, int]  # DROP_REASONS -> number of samples dropped for that reason (first reason only)


def _split_response(response: str) -> Tuple[Optional[str], int]:
    """``(reasoning, answer offset)``: the ``<think>`` block's text (None without one) and where the answer starts.
    Raises ValueError for a ``<think>`` block that is never closed."""
    if THINK_OPEN not in response and THINK_CLOSE not in response:
        return None, 0
    close = response.rfind(THINK_CLOSE)
    if close < 0 or close < response.rfind(THINK_OPEN):
        raise ValueError("unclosed <think>")
    open_ = response.find(THINK_OPEN)
    start = open_ + len(THINK_OPEN) if 0 <= open_ < close else 0
    return response[start:close], close + len(THINK_CLOSE)


def _well_formed_items(response: str, scheme: ItemicScheme) -> Optional[list]:
    """Every item in ``response`` as an :class:`ItemMatch`; None when the response is malformed:
    a bad itemic pattern, a ``<think>`` block that is never closed, or no item after the reasoning."""
    try:
        items = scheme.find_items(response)
        _, answer_start = _split_response(response)
    except (ItemicPatternError, ValueError):
        return None
    if not any(start >= answer_start for start, _, _, _ in items):
        return None
    return items


def _field(sample: dict, i: int, name: str, setting: str):
    if name not in sample:
        raise ValueError(f"samples[{i}] needs {name!r} for the {setting} filter (or turn the filter off)")
    return sample[name]


def _reasoning_reason(sample: dict, i: int, reasoning: str, f: RFTFilters) -> Optional[str]:
    if f.drop_force_closed and not _field(sample, i, "closed_by_model", "rft.drop_force_closed"):
        return "force_closed"
    if f.drop_empty_reasoning and not reasoning.strip():
        return "empty_reasoning"
    if f.min_reasoning_tokens or f.max_reasoning_tokens is not None:
        n = int(_field(sample, i, "reasoning_tokens", "rft.min/max_reasoning_tokens"))
        if n < f.min_reasoning_tokens:
            return "too_short"
        if f.max_reasoning_tokens is not None and n > f.max_reasoning_tokens:
            return "too_long"
    return None


def select_rft_trajectories(
    samples: Sequence[dict],
    hit: Sequence[bool],
    dedupe: bool = True,
    legal_items: Optional[Collection[Tuple[str, Tuple[int, ...]]]] = None,
    filters: Optional[RFTFilters] = None,
    *,
    scheme: ItemicScheme,
) -> RFTSelection:
    """Build ``D_RFT = {(x_u, CoT_u, c_u)}`` (eq. 14) from the trajectories of all domain teachers.

    samples: dicts with at least ``"user_id"`` (hashable) and ``"response"`` (the generated text: optional
    ``<think>…</think>`` reasoning, then the answer with its itemic patterns), plus the fields ``filters`` reads;
    other fields (``"prompt"``, ``"teacher"``, ...) are carried through. hit: per sample, whether its predicted
    item is in ``C_u^+`` (eq. 8).

    A sample is dropped, for the first reason that applies, when it: ``miss``-es; is ``malformed`` (an itemic
    pattern that ``scheme.find_items`` rejects, an unclosed ``<think>``, or no item in the answer); fails a
    reasoning filter of ``filters`` (module docstring; thinking responses only; ``None``: no reasoning filter);
    names an ``illegal`` item (anywhere in the response) outside ``legal_items`` (a set of catalog ``(domain,
    codes)``; with a begin token shared by all domains only the codes count), when given; is ``ungrounded``; is a
    ``duplicate`` of an earlier kept (user_id, response) pair, with ``dedupe``; or is ``over_cap``: beyond the
    first ``filters.max_per_user`` kept samples of its user.
    """
    if isinstance(hit, torch.Tensor):
        hit = hit.tolist()
    if len(hit) != len(samples):
        raise ValueError(f"hit has {len(hit)} entries, samples has {len(samples)}")
    f = filters
    if f is not None and f.max_per_user is not None and f.max_per_user < 1:
        raise ValueError(f"max_per_user must be >= 1 or None, got {f.max_per_user}")

    def key(domain, codes) -> Tuple:
        return scheme.begin_key(domain), tuple(int(c) for c in codes)

    legal = None if legal_items is None else {key(d, codes) for d, codes in legal_items}
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
        else:
            reasoning, answer_start = _split_response(response)
            if f is not None and reasoning is not None:
                reason = _reasoning_reason(sample, i, reasoning, f)
            if reason is None and legal is not None and any((dom, codes) not in legal
                                                            for _, _, dom, codes in items):
                reason = "illegal"
            if reason is None and f is not None and f.require_history_grounding and reasoning is not None:
                history = {key(d, c) for d, c in _field(sample, i, "history", "rft.require_history_grounding")}
                if any((dom, codes) not in history for start, _, dom, codes in items if start < answer_start):
                    reason = "ungrounded"
        cap = None if f is None else f.max_per_user
        if reason is None and dedupe and (user, response) in seen:
            reason = "duplicate"
        elif reason is None and cap is not None and per_user.get(user, 0) >= cap:
            reason = "over_cap"
        if reason is not None:
            dropped[reason] += 1
            continue
        kept.append(sample)
        seen.add((user, response))
        per_user[user] = per_user.get(user, 0) + 1
    return RFTSelection(kept=kept, dropped=dropped)
