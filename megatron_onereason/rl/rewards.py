"""Outcome rewards for recommendation-oriented RL (OneReason §6.1, eqs. 7–9; OneRec-Think eqs. 6–7).

An item is a row of ``L`` semantic-ID codes (``L = 3`` for ``<a_i><b_j><c_k>``); a plain item id is an item with
``L = 1``. Predicted codes may be negative to mark a completion that did not decode to a well-formed item: targets
are never negative, so such a prediction never hits and adds no diversity.

Target sets are ragged: ``target_items[u]`` is a LongTensor ``[n_u, L]`` (or ``[n_u]`` when ``L = 1``; an empty
set may be given as ``[]``) holding the ground-truth set ``C_u^+`` of user ``u``.
"""
from __future__ import annotations

from typing import Literal, NamedTuple, Sequence, get_args

import torch

AccuracyReward = Literal["rule", "prefix", "rollout-beam", "beam-prefix"]  # grpo.reward
ACCURACY_REWARDS = get_args(AccuracyReward)
# Trace-level rewards over a beam: the K completions of a trace must come from beam search (item_strategy="beam").
BEAM_REWARDS = ("rollout-beam", "beam-prefix")


def _target_sets(target_items: Sequence, num_users: int, levels: int) -> list:
    """Each user's target set as a LongTensor ``[n_u, levels]``, validated."""
    if len(target_items) != num_users:
        raise ValueError(f"target_items has {len(target_items)} users, predictions have {num_users}")
    sets = []
    for u, targets in enumerate(target_items):
        t = torch.as_tensor(targets)
        if t.numel() == 0:  # an empty set, whatever dtype `[]` became
            t = torch.zeros(0, levels, dtype=torch.long)
        elif t.dim() == 1 and levels == 1:
            t = t.reshape(-1, 1)
        if t.dim() != 2 or t.shape[1] != levels:
            raise ValueError(f"target_items[{u}] must have shape [n, {levels}], got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"target_items[{u}] must hold integer codes, got {t.dtype}")
        if (t < 0).any():
            raise ValueError(f"target_items[{u}] holds a negative code (negative codes mark invalid predictions)")
        sets.append(t.long())
    return sets


def _check_codes(name: str, codes: torch.Tensor, min_dim: int) -> None:
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {codes.dtype}")
    if codes.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(codes.shape)}")


def rule_reward(pred_items: torch.Tensor, target_items: Sequence) -> torch.Tensor:
    """Eq. 8: ``R_rule(c) = I[c ∈ C_u^+]``.

    pred_items: LongTensor ``[U, *S, L]`` — any number ``*S`` of predictions per user, each ``L`` codes.
    target_items: ``U`` target sets (see module docstring). Returns float32 ``[U, *S]`` of 0/1.
    """
    _check_codes("pred_items", pred_items, 2)
    levels = pred_items.shape[-1]
    targets = _target_sets(target_items, pred_items.shape[0], levels)
    out = torch.zeros(pred_items.shape[:-1], dtype=torch.float32)
    for u, tgt in enumerate(targets):
        pred = pred_items[u].reshape(-1, levels)
        hit = (pred[:, None, :] == tgt[None, :, :]).all(-1).any(-1)
        out[u] = hit.reshape(pred_items.shape[1:-1]).float()
    return out


def diversity_factor(first_codes: torch.Tensor) -> torch.Tensor:
    """Eq. 9: ``R_div = max(0, m − 1) / (K − 1)``, ``m`` = distinct first-level codes among a trace's K completions.

    first_codes: LongTensor ``[N, K]``. Returns float32 ``[N]``. Negative (invalid) codes are not counted in ``m``.
    With ``K = 1`` the fraction is 0/0; the factor is defined as 0 there (one completion shows no diversity).
    """
    if first_codes.dim() != 2:
        raise ValueError(f"first_codes must have shape [N, K], got {tuple(first_codes.shape)}")
    _check_codes("first_codes", first_codes, 2)
    n, k = first_codes.shape
    if k <= 1:
        return torch.zeros(n, dtype=torch.float32)
    codes, _ = torch.sort(first_codes, dim=1)
    valid = codes >= 0
    # In a sorted row a value is new when it differs from its left neighbour.
    is_new = torch.ones_like(valid)
    is_new[:, 1:] = codes[:, 1:] != codes[:, :-1]
    distinct = (is_new & valid).sum(dim=1)
    return (distinct - 1).clamp(min=0).float() / (k - 1)


def rollout_beam_reward(beam_codes: torch.Tensor, target_items: Sequence, match: str = "position") -> torch.Tensor:
    """OneRec-Think eq. 6: ``R = max_{ŝ ∈ B} Σ_l I(ŝ^l = s^l)`` — best code agreement within the beam ``B`` of eq. 7
    (the top-K items of beam search of width K after the trace).

    beam_codes: LongTensor ``[U, *S, K, L]`` (a beam of K items per trace; −1 rows for beams that found fewer than K
    items). Returns float32 ``[U, *S]`` in ``[0, L]``. ``match="position"`` counts equal codes level by level
    (eq. 6 as written, reward ``"rollout-beam"``); ``match="prefix"`` counts only the leading run of equal codes
    (the ``"beam-prefix"`` variant: a deeper semantic-ID code means nothing under a different parent code).
    With several targets (``|C_u^+| > 1``) the max also runs over the targets; an empty target set gives 0.
    """
    if match not in ("prefix", "position"):
        raise ValueError(f"match must be 'prefix' or 'position', got {match!r}")
    _check_codes("beam_codes", beam_codes, 3)
    levels = beam_codes.shape[-1]
    targets = _target_sets(target_items, beam_codes.shape[0], levels)
    out = torch.zeros(beam_codes.shape[:-2], dtype=torch.float32)
    for u, tgt in enumerate(targets):
        if tgt.shape[0] == 0:
            continue
        beam = beam_codes[u].reshape(-1, beam_codes.shape[-2], levels)  # [M, K, L]
        equal = beam[:, :, None, :] == tgt[None, None, :, :]  # [M, K, n_u, L]
        if match == "prefix":
            equal = equal.cumprod(dim=-1).bool()
        best = equal.sum(-1).amax(dim=(1, 2))
        out[u] = best.reshape(beam_codes.shape[1:-2]).float()
    return out


class TwoStageRewards(NamedTuple):
    reward: torch.Tensor  # [U, N, K] float32, eq. 7
    hit: torch.Tensor  # [U, N, K] bool, eq. 8 (drives the sample weights of eq. 13)
    diversity: torch.Tensor  # [U, N] float32, eq. 9 (ones when diversity is off)


def two_stage_rewards(
    pred_codes: torch.Tensor, target_items: Sequence, diversity: bool = True, accuracy: str = "rule"
) -> TwoStageRewards:
    """Eq. 7: ``R_{u,i,j} = R_acc · R_div(CoT_{u,i})`` for U users × N traces × K item completions.

    pred_codes: LongTensor ``[U, N, K, L]``. ``accuracy="rule"`` uses eq. 8 per completion (K sampled items).
    ``"prefix"`` grades each sampled completion by its own leading-code agreement with the closest target, ``0..L``
    (OneRec-Think's eq. 6 with a beam of one item: a dense per-completion signal where exact hits are rare).
    ``"rollout-beam"`` (OneRec-Think eq. 6 as written) and its ``"beam-prefix"`` variant (:func:`rollout_beam_reward`)
    need the K completions of a trace to be its beam (eq. 7: beam search of width K); the trace-level reward is
    shared by its K completions. ``hit`` is always eq. 8.
    """
    if accuracy not in ACCURACY_REWARDS:
        raise ValueError(f"accuracy must be one of {ACCURACY_REWARDS}, got {accuracy!r}")
    if pred_codes.dim() != 4:
        raise ValueError(f"pred_codes must have shape [U, N, K, L], got {tuple(pred_codes.shape)}")
    _check_codes("pred_codes", pred_codes, 4)
    u, n, k, _ = pred_codes.shape
    hit = rule_reward(pred_codes, target_items)
    if accuracy == "rule":
        acc = hit
    elif accuracy == "prefix":
        acc = rollout_beam_reward(pred_codes[..., None, :], target_items, match="prefix")
    else:
        match = "position" if accuracy == "rollout-beam" else "prefix"
        acc = rollout_beam_reward(pred_codes, target_items, match=match)[..., None].expand(u, n, k)
    if diversity:
        div = diversity_factor(pred_codes[..., 0].reshape(u * n, k)).reshape(u, n)
    else:
        div = torch.ones(u, n, dtype=torch.float32)
    return TwoStageRewards(reward=acc * div[..., None], hit=hit.bool(), diversity=div)
