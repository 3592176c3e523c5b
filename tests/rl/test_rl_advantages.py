"""Group-relative advantages, eq. 5."""
import math
import statistics

import pytest
import torch
from hypothesis import given, settings, strategies as st

from megatron_onereason.rl.advantages import group_advantages


def test_hand_case():
    # group 7: [1, 0] → mean 0.5, unbiased std sqrt(0.5); group -3: [2, 2, 2] → constant; group 5: one rollout.
    rewards = torch.tensor([1.0, 2.0, 0.0, 2.0, 2.0, 4.0])
    groups = torch.tensor([7, -3, 7, -3, -3, 5])
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert group_advantages(rewards, groups).tolist() == pytest.approx([a, 0.0, -a, 0.0, 0.0, 0.0], abs=1e-7)


def test_two_stage_group_is_all_rollouts_of_a_user():
    rewards = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]])  # [U=2, N=2, K=2]
    groups = torch.arange(2)[:, None, None].expand(2, 2, 2)
    got = group_advantages(rewards, groups)
    for u in range(2):
        vals = rewards[u].flatten().tolist()
        mean, std = statistics.mean(vals), statistics.stdev(vals)
        expected = [(v - mean) / (std + 1e-6) for v in vals]
        assert got[u].flatten().tolist() == pytest.approx(expected, abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(1, 24), num_groups=st.integers(1, 5))
def test_matches_loop_reference_and_zero_mean_per_group(seed, size, num_groups):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (size,), generator=g).double() * torch.rand(size, generator=g, dtype=torch.float64)
    groups = torch.randint(0, num_groups, (size,), generator=g) * 13 - 20
    got = group_advantages(rewards, groups)
    for label in set(groups.tolist()):
        idx = [i for i in range(size) if groups[i].item() == label]
        vals = [rewards[i].item() for i in idx]
        if len(vals) == 1:
            assert got[idx[0]].item() == 0.0
            continue
        mean, std = math.fsum(vals) / len(vals), statistics.stdev(vals)
        for i, v in zip(idx, vals):
            assert got[i].item() == pytest.approx((v - mean) / (std + 1e-6), rel=1e-9, abs=1e-9)
        assert abs(math.fsum(got[i].item() for i in idx)) < 1e-9


def test_dtype_kept():
    rewards = torch.tensor([1.0, 0.0], dtype=torch.bfloat16)
    assert group_advantages(rewards, torch.tensor([0, 0])).dtype == torch.bfloat16


@pytest.mark.parametrize("rewards,groups,eps,match", [
    (torch.ones(3), torch.zeros(2, dtype=torch.long), 1e-6, "shape"),
    (torch.ones(0), torch.zeros(0, dtype=torch.long), 1e-6, "empty"),
    (torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.long), 1e-6, "NaN"),
    (torch.ones(2), torch.zeros(2), 1e-6, "integer"),
    (torch.ones(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 1e-6, "float"),
    (torch.ones(2), torch.zeros(2, dtype=torch.long), 0.0, "eps"),
])
def test_bad_input(rewards, groups, eps, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, groups, eps=eps)
