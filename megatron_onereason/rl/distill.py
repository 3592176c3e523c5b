"""Multi-teacher on-policy distillation, MOPD (OneReason §6.3, eqs. 16–20), and the itemic-token penalty of
OpenOneRec's general-domain on-policy distillation (OpenOneRec §5.2, eqs. 6–7).

Token tensors are ``[B, T]`` with a response ``mask`` as in :mod:`megatron_onereason.rl.losses`; log-probs are
those of the token the student sampled, so a teacher only scores single points (no full distributions).

General-domain distillation (OpenOneRec §5.2): prompts come *only* from a general-domain source
(:func:`load_general_prompts`, ``data.general_prompts``) and go to the original Qwen3 (``mopd.general_teacher``,
no itemic vocabulary: the ``plain`` backend of :func:`~megatron_onereason.generation.backend.make_backend`). The itemic penalty and truncation apply to those rollouts only
(:func:`general_itemic_penalty`); recommendation prompts go to their domain teachers untouched.
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from megatron_onereason.rl.losses import (
    aggregate_token_losses,
    check_token_tensor,
    importance_weights,
    masked_mean,
    token_mask,
)
from megatron_onereason.tokenizer.itemic_tokens import ItemicScheme, ItemicVocab


def mopd_advantages(
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    mask: torch.Tensor,
    clip: Optional[Tuple[float, float]] = None,
) -> torch.Tensor:
    """Eq. 16: ``Â_t = sg[log π_teacher(y_t) − log π_θ(y_t)]`` (the per-token negative reverse KL), 0 off the mask.

    ``clip=(α, β)`` clamps it to ``[α, β]`` — OpenOneRec eq. 7's reward clipping, needed when
    :func:`itemic_penalty` has set a teacher log-prob to −1e9.
    """
    mask = token_mask("mask", mask, teacher_logp.shape)
    check_token_tensor("teacher_logp", teacher_logp, teacher_logp.shape, mask)
    check_token_tensor("student_logp", student_logp, teacher_logp.shape, mask)
    gap = teacher_logp.detach() - student_logp.detach()
    if clip is not None:
        low, high = clip
        if not low <= high:
            raise ValueError(f"clip must be (alpha, beta) with alpha <= beta, got {clip}")
        gap = gap.clamp(low, high)
    return torch.where(mask, gap, torch.zeros((), dtype=gap.dtype))


def truncated_is_weights(
    train_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    low: float,
    high: float,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eq. 17: ``w_t = sg[π_θ/μ_θ]`` where ``low ≤ π_θ/μ_θ ≤ high``, else exactly 0.

    ``train_logp`` is π_θ from the training engine, ``rollout_logp`` is μ_θ from the inference engine (the
    behaviour policy). :func:`megatron_onereason.rl.losses.importance_weights` with ``mode="mask"``. Without a
    ``mask`` every position must be finite; with one, positions off the mask get weight 0 and are not checked.
    """
    return importance_weights(train_logp, rollout_logp, mask, low, high, mode="mask")[0]


def mopd_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    is_weights: torch.Tensor,
    mask: torch.Tensor,
    loss_normalizer: Optional[float] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Eq. 18: ``L = −E_y[(1/|y|) Σ_t w_t Â_t log π_θ(y_t)]``, ``|y|`` = the trajectory's masked token count.

    ``advantages`` (eq. 16) and ``is_weights`` (eq. 17) are stop-gradient: gradients flow through ``logp`` only.
    ``loss_normalizer`` is the number of trajectories in the global batch (the expectation's denominator).
    Metrics (detached): ``pg_loss``, ``adv_mean``, ``adv_abs_mean``, ``is_weight_mean``, ``is_zero_frac`` (share
    of tokens whose IS weight was truncated to 0).
    """
    shape = logp.shape
    mask = token_mask("mask", mask, shape)
    check_token_tensor("logp", logp, shape, mask)
    check_token_tensor("advantages", advantages, shape, mask)
    check_token_tensor("is_weights", is_weights, shape, mask)
    zero = torch.zeros((), dtype=logp.dtype)
    scale = torch.where(mask, is_weights.detach() * advantages.detach(), zero)
    token_loss = -scale * torch.where(mask, logp, zero)
    loss = aggregate_token_losses(token_loss, mask, "seq-mean-token-mean", loss_normalizer)
    with torch.no_grad():
        metrics = {
            "pg_loss": loss.detach(),
            "adv_mean": masked_mean(advantages, mask),
            "adv_abs_mean": masked_mean(advantages.abs(), mask),
            "is_weight_mean": masked_mean(is_weights, mask),
            "is_zero_frac": masked_mean((is_weights == 0).float(), mask),
        }
    return loss, metrics


def information_gain_scores(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 19: ``s(y_j) = (1/T_j) Σ_t |Â_{j,t}|`` per trajectory ``[B]`` (0 for a trajectory with no token)."""
    mask = token_mask("mask", mask, advantages.shape)
    check_token_tensor("advantages", advantages, advantages.shape, mask)
    gap = torch.where(mask, advantages.detach().abs(), torch.zeros((), dtype=advantages.dtype))
    return gap.sum(-1) / mask.sum(-1).clamp(min=1)


def information_gain_filter(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """Eq. 20: indices of the smallest top-score prefix whose share of ``Σ s`` is ``≥ ρ``.

    scores: ``[B]`` non-negative informativeness scores (eq. 19). Sorting is descending and stable, so equal scores
    keep batch order (the lower index is kept first). All-zero scores carry no information to rank by: keep all.
    Returns the kept indices as a LongTensor in ascending batch order.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    s = scores.detach().double()
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("scores must be finite and non-negative")
    order = torch.sort(s, descending=True, stable=True).indices
    cumulative = s[order].cumsum(0)
    total = cumulative[-1]
    if total == 0:
        return torch.arange(s.numel())
    kept = int((cumulative / total < rho).sum()) + 1  # shares are non-decreasing: count those still below ρ
    return order[:kept].sort().values


def route_to_teachers(domains: Sequence[str], teachers: Mapping[str, Hashable]) -> Dict[Hashable, torch.Tensor]:
    """Group trajectory indices by the teacher of their domain (§6.3: a prompt goes to its domain expert).

    domains: the domain of each trajectory; teachers: domain → teacher key (several domains may share one
    teacher, e.g. a general-domain teacher). Returns teacher → ascending LongTensor of trajectory indices, for
    teachers with at least one trajectory, in order of first use.
    """
    groups: Dict[Hashable, list] = {}
    for i, domain in enumerate(domains):
        if domain not in teachers:
            raise ValueError(f"trajectory {i} has domain {domain!r} with no teacher (teachers for: {list(teachers)})")
        groups.setdefault(teachers[domain], []).append(i)
    return {teacher: torch.tensor(idx, dtype=torch.long) for teacher, idx in groups.items()}


def itemic_token_mask(token_ids: torch.Tensor, vocab: ItemicVocab) -> torch.Tensor:
    """True where ``token_ids`` is an itemic token (a begin, code or end token) of ``vocab``."""
    return vocab.itemic_mask(token_ids)


def itemic_penalty(
    teacher_logp: torch.Tensor,
    token_is_itemic: torch.Tensor,
    penalty: float = -1e9,
    truncate: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """OpenOneRec §5.2: on a general-domain prompt an itemic token gets teacher log-prob ``penalty``.

    The teacher (the original Qwen3) cannot know itemic tokens, so a sampled itemic token is scored as (nearly)
    impossible; with ``truncate`` the trajectory ends after the first one. Returns ``(teacher_logp, keep_mask)``
    ``[B, T]``: the penalised log-probs and a mask that is True up to and including each row's first itemic token
    (all True without ``truncate``); AND it into the response mask, and clip the advantages
    (``mopd_advantages(..., clip=(α, β))``) so the penalty stays a bounded signal.
    """
    is_itemic = token_mask("token_is_itemic", token_is_itemic, teacher_logp.shape)
    if not teacher_logp.dtype.is_floating_point:
        raise ValueError(f"teacher_logp must be a float tensor, got {teacher_logp.dtype}")
    penalised = torch.where(is_itemic, torch.tensor(penalty, dtype=teacher_logp.dtype), teacher_logp)
    if not truncate:
        return penalised, torch.ones_like(is_itemic)
    # Number of itemic tokens strictly before t: zero means t is at or before the first itemic token.
    before = is_itemic.long().cumsum(-1) - is_itemic.long()
    return penalised, before == 0


def general_itemic_penalty(
    teacher_logp: torch.Tensor,
    token_is_itemic: torch.Tensor,
    is_general: torch.Tensor,
    penalty: float = -1e9,
    truncate: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`itemic_penalty` on the rows whose prompt is general-domain (``is_general`` ``[B]`` bool), nothing on
    the others: a recommendation rollout cites items by design and its domain teacher scores them.

    Returns ``(teacher_logp, keep_mask)`` ``[B, T]`` (keep_mask all True on recommendation rows).
    """
    is_itemic = token_mask("token_is_itemic", token_is_itemic, teacher_logp.shape)
    general = token_mask("is_general", is_general, teacher_logp.shape[:1])
    return itemic_penalty(teacher_logp, is_itemic & general[:, None], penalty, truncate)


def teacher_input_ids(token_ids: torch.Tensor, token_is_itemic: torch.Tensor, fill_id: int) -> torch.Tensor:
    """The student's token ids as a teacher without itemic vocabulary may read them: itemic ids become ``fill_id``.

    The original Qwen3 has no rows for itemic tokens (the extension may reuse its embedding *padding* rows, which
    are untrained). Replacing them changes no score that is used: the score of an itemic *label* is the penalty,
    and positions after the first itemic token are truncated (:func:`itemic_penalty`).
    """
    is_itemic = token_mask("token_is_itemic", token_is_itemic, token_ids.shape)
    return torch.where(is_itemic, torch.full_like(token_ids, int(fill_id)), token_ids)


def check_teacher_vocabulary(student_vocab: Mapping[str, int], teacher_vocab: Mapping[str, int],
                             student_vocab_obj: ItemicVocab, teacher_dir: str = "teacher") -> None:
    """A plain teacher must read every non-itemic token of the student under the same id.

    ``student_vocab`` / ``teacher_vocab``: token → id (``tokenizer.get_vocab()``). Raises ValueError naming the
    first disagreement: a token with another id in the teacher, or a non-itemic student token the teacher lacks.
    """
    for token, i in teacher_vocab.items():
        j = student_vocab.get(token)
        if j is not None and j != i:
            raise ValueError(f"{teacher_dir}: token {token!r} has id {i} in the teacher and {j} in the student: the "
                             "teacher must be the student's base model (the same tokenizer before the extension)")
    teacher_ids = set(teacher_vocab.values())
    for token, i in student_vocab.items():
        if i not in teacher_ids and not student_vocab_obj.is_itemic(i):
            raise ValueError(f"{teacher_dir}: the teacher lacks the student's non-itemic token {token!r} (id {i}); "
                             "it could not score a rollout that uses it")


class GeneralPrompts(NamedTuple):
    prompts: List[List[Dict[str, str]]]  # chat messages up to and including the last user message
    skipped: Dict[str, int]  # reason -> records skipped


GENERAL_SKIP_REASONS = ("no_user_message", "itemic_tokens")


def load_general_prompts(path: str, scheme: ItemicScheme) -> GeneralPrompts:
    """General-domain prompts for MOPD (``data.general_prompts``): chat JSONL or parquet, one
    ``{"messages": [{"role": "system|user|assistant", "content": str}, ...]}`` per record — the SFT format, so an
    SFT general dataset serves as is: the messages after the last user message (its answer) are dropped.

    Skipped and counted: records with no user message, and prompts that write itemic patterns (the general teacher
    cannot read them; OpenOneRec samples these prompts from general-domain data only). Malformed records are
    errors naming ``path:line``.
    """
    from megatron_onereason.data.formats import SampleError, iter_input, parse_json_line

    prompts: List[List[Dict[str, str]]] = []
    skipped = dict.fromkeys(GENERAL_SKIP_REASONS, 0)
    for lineno, raw in iter_input(path):
        if isinstance(raw, bytes) and not raw.strip():
            continue
        try:
            record = parse_json_line(raw) if isinstance(raw, bytes) else raw
            messages = record.get("messages")
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str) for m in messages):
                raise ValueError("'messages' must be a list of {role: system|user|assistant, content: str}")
        except (SampleError, ValueError) as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            skipped["no_user_message"] += 1
            continue
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:users[-1] + 1]]
        if any(scheme.loose_item_re.search(m["content"]) for m in prompt):
            skipped["itemic_tokens"] += 1
            continue
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no usable general-domain prompt (skipped: {skipped})")
    return GeneralPrompts(prompts, skipped)
