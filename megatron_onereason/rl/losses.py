"""Policy losses for recommendation-oriented GRPO (OneReason §6.1, eqs. 10–13) and RFT (§6.2, eq. 15).

Behaviour-policy correction (decoupled PPO, Hilton et al. 2021; verl's rollout correction, slime's and NeMo-RL's
TIS). Three policies take part in a GRPO update: μ, the rollout engine's sampling distribution (its temperature,
its constraint, its numerics: what actually drew the tokens); π_old, the actor's policy before this rollout batch's
first optimizer step (recomputed by the actor); π_θ, the policy being optimised. Per token

    ρ_t = π_old(o_t) / μ(o_t),   w_t = clip(ρ_t, C_low, C_high)          (truncated IS weight, stop-gradient)
    r_t = π_θ(o_t) / π_old(o_t)                                           (eq. 10)
    ℓ_t = w_t · max(−Â r_t, −Â clip(r_t, 1 − ε⁻(t), 1 + ε⁺(t)))            (eqs. 11–12, stage-wise)

so the clipping of eqs. 11–12 bounds the policy's move from π_old — it acts once a rollout batch is split into
several mini-batches (optimizer steps), as with ``actor.mini_batches > 1`` — while w_t corrects for tokens having
been drawn from μ rather than π_old. ``old_logp = rollout log-probs`` with no weights is the two-policy "bypass"
form (π_old = μ). :func:`importance_weights` computes w_t; ``mode="mask"`` is eq. 17's MOPD weight (0 outside
the band instead of clamped to it).

Token tensors are ``[B, T]``: ``logp[b, t]`` is the float log-probability of the sampled token ``t`` of sequence
``b`` and ``response_mask`` (bool or 0/1) selects the tokens that are trained. Values outside the mask are never
used, so padding may hold anything (0, -inf, NaN); inside the mask NaN/inf is an error.

Aggregation (``agg``):

- ``"token-mean"``: sum of token losses / number of tokens;
- ``"seq-mean-token-mean"``: each sequence's token mean, averaged over sequences (sequences with no token are
  skipped);
- ``"seq-mean-token-sum"``: each sequence's token sum, averaged over sequences (eq. 15 as written).

``loss_normalizer`` replaces the local denominator (the token count for ``token-mean``, the sequence count
otherwise) by the count over the *global* batch. The losses of all micro-batches on all ranks then *sum* to the
global-batch mean: the caller sums over micro-batches and, where the framework averages gradients over
data-parallel ranks, multiplies by the data-parallel size.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k3")
IS_MODES = ("truncate", "mask")
# exp() of a log-ratio beyond this overflows float32 long before it means anything (verl clamps the same way).
_MAX_LOG_RATIO = 20.0


def token_mask(name: str, mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``mask`` as a bool tensor, checked to have ``shape``."""
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_token_tensor(name: str, x: torch.Tensor, shape: torch.Size, mask: torch.Tensor) -> None:
    """``x`` must be a float tensor of ``shape``, finite wherever ``mask`` is set."""
    if x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float tensor, got {x.dtype}")
    if not torch.isfinite(x.detach()[mask]).all():
        raise ValueError(f"{name} holds NaN or inf at a position selected by the mask")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (a metric: 0 when the mask is empty)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype)).sum() / mask.sum().clamp(min=1)


def aggregate_token_losses(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    loss_normalizer: Optional[float] = None,
) -> torch.Tensor:
    """Reduce per-token losses ``[*B, T]`` over ``mask`` to a scalar (see the module docstring for ``agg``)."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    if loss_normalizer is not None and not 0.0 < float(loss_normalizer) < math.inf:
        raise ValueError(f"loss_normalizer must be a positive finite count, got {loss_normalizer}")
    mask = token_mask("mask", mask, token_loss.shape)
    masked = torch.where(mask, token_loss, torch.zeros((), dtype=token_loss.dtype))
    if agg == "token-mean":
        total, count = masked.sum(), mask.sum()
    else:
        seq_tokens = mask.reshape(-1, mask.shape[-1]).sum(-1)
        seq_loss = masked.reshape(-1, mask.shape[-1]).sum(-1)
        if agg == "seq-mean-token-mean":
            seq_loss = seq_loss / seq_tokens.clamp(min=1)
        total, count = seq_loss.sum(), (seq_tokens > 0).sum()
    if loss_normalizer is not None:
        return total / float(loss_normalizer)
    if count == 0:
        raise ValueError("the mask selects no token; pass loss_normalizer to allow an empty micro-batch")
    return total / count


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of ``KL(π_θ ‖ π_ref)`` from sampled tokens (Schulman's estimators).

    ``k1 = log π_θ − log π_ref``; ``k3 = π_ref/π_θ − log(π_ref/π_θ) − 1`` (non-negative, low variance),
    with the log-ratio clamped to ±20 and k3 to ±10 as verl's ``low_var_kl``.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if estimator == "k1":
        return logp - ref_logp
    log_ratio = (ref_logp - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return (log_ratio.exp() - log_ratio - 1).clamp(-10.0, 10.0)


def hit_sample_weights(hit: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 13: ``w = 1`` for a rollout whose items hit (``R_rule = 1``), ``β`` otherwise (β = 1 turns it off)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return torch.where(token_mask("hit", hit, hit.shape), 1.0, float(beta)).float()


def importance_weights(
    target_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    low: float = 0.0,
    high: float = 2.0,
    mode: str = "truncate",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token importance weights ``w_t`` of samples drawn from μ (``behaviour_logp``) for the target policy
    (``target_logp``): ``ρ_t = exp(target − behaviour)``.

    ``mode="truncate"`` (TIS): ``w_t = clamp(ρ_t, low, high)`` — with ``target = π_old`` and ``behaviour`` the
    rollout engine's log-probs this is the GRPO correction of the module docstring (verl ``rollout_is=token``,
    slime ``--use-tis`` with ``tis_clip_low``/``tis_clip``). ``mode="mask"``: ``w_t = ρ_t`` inside
    ``[low, high]``, exactly 0 outside (eq. 17, with ``target = π_θ``).

    Returns ``(w, ρ)`` ``[*B, T]``, both detached and 0 off ``mask`` (positions off the mask are not checked and
    may hold anything). The log-ratio is clamped to ±20 before ``exp`` so ``ρ`` stays finite.
    """
    if mode not in IS_MODES:
        raise ValueError(f"importance-weight mode must be one of {IS_MODES}, got {mode!r}")
    if not 0.0 <= low <= high < math.inf:
        raise ValueError(f"need 0 <= low <= high < inf for the importance-weight band, got low={low}, high={high}")
    shape = target_logp.shape
    mask = torch.ones(shape, dtype=torch.bool) if mask is None else token_mask("mask", mask, shape)
    check_token_tensor("target_logp", target_logp, shape, mask)
    check_token_tensor("behaviour_logp", behaviour_logp, shape, mask)
    zero = torch.zeros((), dtype=target_logp.dtype)
    log_ratio = torch.where(mask, target_logp.detach() - behaviour_logp.detach().to(target_logp.dtype), zero)
    ratio = torch.where(mask, log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp(), zero)
    if mode == "truncate":
        weights = torch.where(mask, ratio.clamp(low, high), zero)
    else:
        weights = torch.where(mask & (ratio >= low) & (ratio <= high), ratio, zero)
    return weights, ratio


def check_clip(name: str, clip: Tuple[float, float]) -> None:
    """The clipping range of eqs. 11-12 (also the config check of ``grpo.clip_cot`` / ``grpo.clip_item``)."""
    low, high = clip
    if not (0.0 <= low < 1.0 and high >= 0.0):
        raise ValueError(f"{name} must be [eps_low, eps_high] with 0 <= eps_low < 1 and eps_high >= 0, "
                         f"got {[low, high]}")


def grpo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    item_mask: torch.Tensor,
    clip_cot: Tuple[float, float] = (0.2, 0.28),
    clip_item: Tuple[float, float] = (0.1, 0.1),
    sample_weight: Optional[torch.Tensor] = None,
    agg: str = "token-mean",
    loss_normalizer: Optional[float] = None,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Stage-wise clipped GRPO loss, eqs. 10–13, with the behaviour-policy correction of the module docstring.

    Per response token: ``r_t = exp(logp − old_logp)`` (eq. 10); the clip range ``(ε⁻, ε⁺)`` is ``clip_item`` where
    ``item_mask`` is set and ``clip_cot`` elsewhere (eqs. 11–12); the token loss is the PPO pessimistic surrogate
    ``max(−A r_t, −A clip(r_t, 1 − ε⁻, 1 + ε⁺))``, multiplied by the token's importance weight ``is_weights``
    (:func:`importance_weights`; none = 1) and the rollout's weight ``w`` (eq. 13) and, when ``ref_logp`` is given,
    plus ``kl_coef · KL_t`` (not weighted: the weights scale the policy-gradient term only).

    Shapes: logp, old_logp, response_mask, item_mask, ref_logp, is_weights ``[B, T]``; advantages ``[B]`` (one per
    rollout) or ``[B, T]``; sample_weight ``[B]``. Gradients flow through ``logp`` only. Metrics (detached, over this
    micro-batch's response tokens): ``pg_loss``, ``kl_ref``, ``clipfrac``, ``clipfrac_cot``, ``clipfrac_item``
    (share of tokens where the clipped branch is taken), ``approx_kl`` (k3 estimate of KL(π_old ‖ π_θ)),
    ``ratio_mean/min/max``.
    """
    shape = logp.shape
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(shape)}")
    mask = token_mask("response_mask", response_mask, shape)
    item = token_mask("item_mask", item_mask, shape)
    check_token_tensor("logp", logp, shape, mask)
    check_token_tensor("old_logp", old_logp, shape, mask)
    if advantages.shape == shape[:1]:
        advantages = advantages[:, None].expand(shape)
    check_token_tensor("advantages", advantages, shape, mask)
    if ref_logp is not None:
        check_token_tensor("ref_logp", ref_logp, shape, mask)
    elif kl_coef != 0.0:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logp")
    if sample_weight is not None:
        if sample_weight.shape != shape[:1]:
            raise ValueError(f"sample_weight has shape {tuple(sample_weight.shape)}, expected {tuple(shape[:1])}")
        if not torch.isfinite(sample_weight).all() or (sample_weight < 0).any():
            raise ValueError("sample_weight must be finite and non-negative")
    check_clip("clip_cot", clip_cot)
    check_clip("clip_item", clip_item)
    if is_weights is not None:
        check_token_tensor("is_weights", is_weights, shape, mask)
        if (is_weights.detach()[mask] < 0).any():
            raise ValueError("is_weights must be non-negative")

    zero = torch.zeros((), dtype=logp.dtype)
    logp = torch.where(mask, logp, zero)  # padding may be NaN: keep it out of values and gradients
    old_logp = torch.where(mask, old_logp.detach(), zero)
    adv = torch.where(mask, advantages.detach().to(logp.dtype), zero)
    log_ratio = (logp - old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = log_ratio.exp()

    def per_stage(item_value: float, cot_value: float) -> torch.Tensor:  # eq. 12: the range follows the stage
        return torch.where(item, torch.tensor(item_value, dtype=logp.dtype), torch.tensor(cot_value, dtype=logp.dtype))

    low = per_stage(1.0 - clip_item[0], 1.0 - clip_cot[0])
    high = per_stage(1.0 + clip_item[1], 1.0 + clip_cot[1])
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, low, high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    if is_weights is not None:
        pg = pg * torch.where(mask, is_weights.detach().to(logp.dtype), zero)
    if sample_weight is not None:
        pg = pg * sample_weight.detach().to(logp.dtype)[:, None]
    pg_loss = aggregate_token_losses(pg, mask, agg, loss_normalizer)
    loss = pg_loss
    metrics = {"pg_loss": pg_loss.detach()}
    if ref_logp is not None:
        kl = kl_penalty(logp, torch.where(mask, ref_logp.detach(), zero), kl_estimator)
        kl_loss = aggregate_token_losses(kl, mask, agg, loss_normalizer)
        loss = loss + kl_coef * kl_loss
        metrics["kl_ref"] = kl_loss.detach()

    with torch.no_grad():
        clipped = pg_clipped > pg_unclipped
        ratio_on_mask = ratio[mask]
        metrics.update(
            clipfrac=masked_mean(clipped.float(), mask),
            clipfrac_cot=masked_mean(clipped.float(), mask & ~item),
            clipfrac_item=masked_mean(clipped.float(), mask & item),
            approx_kl=masked_mean(ratio - 1 - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
            ratio_min=ratio_on_mask.min() if ratio_on_mask.numel() else zero,
            ratio_max=ratio_on_mask.max() if ratio_on_mask.numel() else zero,
        )
    return loss, metrics


def shared_prefix_policy_loss(
    trace_logp: torch.Tensor,
    trace_old_logp: torch.Tensor,
    trace_mask: torch.Tensor,
    child_logp: torch.Tensor,
    child_old_logp: torch.Tensor,
    child_mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_cot: Tuple[float, float] = (0.2, 0.28),
    clip_item: Tuple[float, float] = (0.1, 0.1),
    sample_weight: Optional[torch.Tensor] = None,
    agg: str = "token-mean",
    loss_normalizer: Optional[float] = None,
    trace_ref_logp: Optional[torch.Tensor] = None,
    child_ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    trace_is_weights: Optional[torch.Tensor] = None,
    child_is_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Eqs. 10–13 for the two-stage rollout with each reasoning trace forwarded once.

    Layout: trace ``i`` (its reasoning tokens, up to where the K item completions branch) has ``trace_*`` rows
    ``[N, Tr]``; completion ``j`` of trace ``i`` has ``child_*`` rows ``[N, K, Tc]``; ``advantages`` and
    ``sample_weight`` are ``[N, K]``. Trace tokens are clipped with ``clip_cot``, completion tokens with
    ``clip_item`` (eq. 12 by stage). The value and gradients equal :func:`grpo_policy_loss` on the N×K
    materialised sequences ``[trace_i; child_ij]``: every trace token appears once per child, with that child's
    advantage, weight and clipping, and counts once per child in the normaliser. Only the per-token scalars are
    repeated K times (``N·K·(Tr + Tc)`` floats); the model forward is not. ``trace_is_weights`` /
    ``child_is_weights`` (both or neither) are the importance weights of :func:`grpo_policy_loss` in this layout.
    """
    if advantages.dim() != 2:
        raise ValueError(f"advantages must have shape [N, K], got {tuple(advantages.shape)}")
    n, k = advantages.shape
    if trace_logp.dim() != 2 or trace_logp.shape[0] != n:
        raise ValueError(f"trace_logp must have shape [N={n}, Tr], got {tuple(trace_logp.shape)}")
    if child_logp.dim() != 3 or child_logp.shape[:2] != (n, k):
        raise ValueError(f"child_logp must have shape [N={n}, K={k}, Tc], got {tuple(child_logp.shape)}")
    if (trace_ref_logp is None) != (child_ref_logp is None):
        raise ValueError("give both trace_ref_logp and child_ref_logp, or neither")
    if (trace_is_weights is None) != (child_is_weights is None):
        raise ValueError("give both trace_is_weights and child_is_weights, or neither")
    if sample_weight is not None and sample_weight.shape != (n, k):
        raise ValueError(f"sample_weight has shape {tuple(sample_weight.shape)}, expected {(n, k)}")
    t_trace, t_child = trace_logp.shape[1], child_logp.shape[2]

    def materialise(name: str, trace: torch.Tensor, child: torch.Tensor) -> torch.Tensor:
        if trace.shape != trace_logp.shape or child.shape != child_logp.shape:
            raise ValueError(
                f"{name}: trace part {tuple(trace.shape)} / child part {tuple(child.shape)} must match "
                f"{tuple(trace_logp.shape)} / {tuple(child_logp.shape)}"
            )
        return torch.cat([trace[:, None].expand(n, k, t_trace), child], dim=2).reshape(n * k, t_trace + t_child)

    stage_is_item = torch.cat(
        [torch.zeros(n, k, t_trace, dtype=torch.bool), torch.ones(n, k, t_child, dtype=torch.bool)], dim=2
    ).reshape(n * k, t_trace + t_child)
    return grpo_policy_loss(
        materialise("logp", trace_logp, child_logp),
        materialise("old_logp", trace_old_logp, child_old_logp),
        advantages.reshape(n * k),
        materialise("mask", token_mask("trace_mask", trace_mask, trace_logp.shape),
                    token_mask("child_mask", child_mask, child_logp.shape)),
        stage_is_item,
        clip_cot=clip_cot,
        clip_item=clip_item,
        sample_weight=None if sample_weight is None else sample_weight.reshape(n * k),
        agg=agg,
        loss_normalizer=loss_normalizer,
        ref_logp=None if trace_ref_logp is None else materialise("ref_logp", trace_ref_logp, child_ref_logp),
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        is_weights=None if trace_is_weights is None else materialise("is_weights", trace_is_weights,
                                                                     child_is_weights),
    )


def sft_loss(
    logp: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", loss_normalizer: Optional[float] = None
) -> torch.Tensor:
    """Eq. 15: negative log-likelihood of the response tokens ``y = [CoT; c]`` (used by RFT).

    ``agg="seq-mean-token-sum"`` is eq. 15 literally (sum over a trajectory's tokens, mean over trajectories);
    the default ``token-mean`` is the usual SFT normalisation.
    """
    mask = token_mask("mask", mask, logp.shape)
    check_token_tensor("logp", logp, logp.shape, mask)
    return aggregate_token_losses(-torch.where(mask, logp, torch.zeros((), dtype=logp.dtype)), mask, agg,
                                  loss_normalizer)
