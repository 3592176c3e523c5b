"""Group-relative advantages for GRPO (OneReason §6.1, eq. 5)."""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 5: ``Â = (R − mean_g R) / (std_g R + δ)`` within each group ``g``, with ``δ = eps``.

    rewards: float tensor of any shape; group_ids: integer tensor of the same shape (any labels, any order).
    The std is the unbiased one (as verl and slime); a group of one rollout gets advantage 0. Computed in float64,
    returned in the rewards' dtype. For the two-stage rollout a group is all N×K rollouts of one user:
    with rewards ``[U, N, K]`` pass ``group_ids = torch.arange(U)[:, None, None].expand(U, N, K)``.
    """
    if rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} differ in shape")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty: there is no group to normalise")
    if not rewards.dtype.is_floating_point:
        raise ValueError(f"rewards must be a float tensor, got {rewards.dtype}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards holds NaN or inf")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (it keeps constant groups finite), got {eps}")
    r = rewards.detach().reshape(-1).double()
    _, group = torch.unique(group_ids.reshape(-1), return_inverse=True)
    num_groups = int(group.max()) + 1
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, torch.ones_like(r))
    mean = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, r) / count
    centred = r - mean[group]
    sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, centred * centred)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    adv = torch.where(count[group] > 1, centred / (std[group] + eps), torch.zeros_like(r))
    return adv.to(rewards.dtype).reshape(rewards.shape)
