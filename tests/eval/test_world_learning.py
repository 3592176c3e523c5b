"""The learning test: a few GRPO steps of the project's loss code (rl/rewards.py, rl/advantages.py, rl/losses.py via
eval/world_sim.py) on a tiny learnable world raise the held-out hit rate far beyond its seed spread — and the same
check fails when the advantage's sign is flipped, so it can tell a correct GRPO from a wrong one."""
import statistics

import pytest
import torch

from megatron_onereason.eval.world_sim import SimConfig, WorldPolicy, tiny_world, train_grpo

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def world_users():
    world = tiny_world()
    return world, world.draw_users(256, seed=1, prefix="train"), world.draw_users(128, seed=2, prefix="eval")


def _gains(world_users, sign):
    """Held-out hit probability (exact, the policy's marginal on the target) before and after 30 steps, per seed."""
    world, train, held_out = world_users
    torch.set_num_threads(1)
    out = []
    for seed in SEEDS:
        cfg = SimConfig(steps=30, diversity=False, accuracy="prefix", lr=0.2, seed=seed, advantage_sign=sign)
        _, history = train_grpo(world, train, cfg, held_out)
        out.append((history[0]["hit_probability"], history[-1]["hit_probability"]))
    return out


def learns(before_after, random_hit):
    """Every seed gains more than 3x a random policy's hit rate, and the mean gain is more than 3 standard errors
    (seed spread / sqrt(seeds)) above 0."""
    gains = [after - before for before, after in before_after]
    spread = statistics.stdev(gains) / len(gains) ** 0.5
    return min(gains) > 3 * random_hit and statistics.mean(gains) > 3 * spread


def test_grpo_raises_the_hit_rate(world_users):
    world, _, held_out = world_users
    random_hit = world.random_recall(held_out, [1])[1]
    before_after = _gains(world_users, +1.0)
    print("normal sign: hit probability before -> after per seed", before_after)
    assert before_after[0][0] == pytest.approx(1 / len(world.items), rel=1e-4)  # the start is uniform over items
    assert learns(before_after, random_hit), before_after


def test_flipped_advantage_sign_fails_the_check(world_users):
    world, _, held_out = world_users
    before_after = _gains(world_users, -1.0)
    print("flipped sign: hit probability before -> after per seed", before_after)
    assert not learns(before_after, world.random_recall(held_out, [1])[1])
    assert all(after <= before for before, after in before_after)


def test_thinking_policy_marginal_is_a_distribution(world_users):
    world, _, held_out = world_users
    policy = WorldPolicy(world, thinking=True)
    torch.nn.init.normal_(policy.successor, std=1.0)
    torch.nn.init.normal_(policy.interest_head.weight, std=1.0)
    lp = policy.marginal_logp(held_out[:4])
    assert torch.allclose(lp.exp().sum(-1), torch.ones(4), atol=1e-5)
