"""A small torch policy on the learnable world, trained with the project's own GRPO and MOPD math: the learning
test and the ablations of OneReason §6 at a scale that runs in seconds on a CPU.

What is real and what is small: rewards (:func:`megatron_onereason.rl.rewards.two_stage_rewards`, eqs. 7–9), the
group advantage (:func:`megatron_onereason.rl.advantages.group_advantages`, eq. 5), the stage-wise clipped loss with
non-hit down-weighting (:func:`megatron_onereason.rl.losses.grpo_policy_loss`, eqs. 10–13) and MOPD
(:mod:`megatron_onereason.rl.distill`, eqs. 16–20) are the functions the RL engine calls. The policy is a
log-linear model instead of a transformer, and its "reasoning trace" is one token — the interest it names:

- thinking: ``π(c | x)`` names an interest ``c`` (the CoT), then ``π(i | x, c)`` an item, whose logits see the
  latest history item *of the named interest* (what the world's CoT writes out: naming the interest narrows the
  answer); the two-stage rollout samples N traces × K items per user;
- non-thinking: ``π(i | x)`` from the same history features, without the interest step.

``x`` holds the history's item counts, its interest histogram and its latest item. Items are scored by the codes
``(interest, position in the interest's sequence)``; Recall@K ranks items by the policy's marginal ``π(i | x)``
(exact, no sampling), on held-out users.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_onereason.data.synthetic_world import World, WorldConfig, WorldItem
from megatron_onereason.eval.benchmark import BenchmarkUser
from megatron_onereason.rl.advantages import group_advantages
from megatron_onereason.rl.distill import (
    information_gain_filter,
    information_gain_scores,
    mopd_advantages,
    mopd_loss,
)
from megatron_onereason.rl.losses import grpo_policy_loss, hit_sample_weights
from megatron_onereason.rl.rewards import two_stage_rewards


def tiny_world(interests: int = 8, items_per_interest: int = 12, distractor_interests: int = 4,
               config: WorldConfig = WorldConfig(target_domains=("video",))) -> World:
    """A world of ``interests`` video interests plus ``distractor_interests`` product ones (history noise)."""
    items = []
    for domain, count, offset in (("video", interests, 0), ("prod", distractor_interests, interests)):
        for c in range(count):
            for pos in range(items_per_interest):
                items.append(WorldItem(f"{domain}_{c:02d}{pos:02d}", domain, f"{domain} about topic{c + offset}",
                                       (c, pos, 0), c + offset))
    return World(items, config)


@dataclass(frozen=True)
class SimConfig:
    steps: int = 40
    users_per_step: int = 16
    num_traces: int = 4  # N reasoning traces per user
    num_items: int = 4  # K item completions per trace
    thinking: bool = True
    diversity: bool = True  # eq. 9
    accuracy: str = "rule"  # eq. 8 ("prefix": leading codes matched)
    clip_cot: Tuple[float, float] = (0.2, 0.28)
    clip_item: Tuple[float, float] = (0.1, 0.1)  # eq. 12: the item stage clipped tighter
    nonhit_weight: float = 0.5  # eq. 13's beta (1: off)
    mini_batches: int = 2  # optimizer steps per rollout batch: the second one is off-policy, so clipping acts
    lr: float = 0.1
    advantage_sign: float = 1.0  # -1 flips eq. 5's advantage: only to show that a learning check can fail
    seed: int = 0


class WorldPolicy(torch.nn.Module):
    """The log-linear policy of the module docstring."""

    def __init__(self, world: World, thinking: bool = True) -> None:
        super().__init__()
        self.world = world
        self.thinking = thinking
        self.item_ids = sorted(world.items)
        self.index = {item_id: n for n, item_id in enumerate(self.item_ids)}
        self.interests = sorted(world.sequences)
        self.interest_index = {c: n for n, c in enumerate(self.interests)}
        self.item_interest = torch.tensor([self.interest_index[world.items[i].interest] for i in self.item_ids])
        # Reward codes of each item: (interest, position in its sequence).
        self.item_codes = torch.stack([self.item_interest,
                                       torch.tensor([world.position[i] for i in self.item_ids])], dim=1)
        self._features: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        n, c = len(self.item_ids), len(self.interests)
        features = 2 * n + c
        self.interest_head = torch.nn.Linear(features, c)
        self.item_head = torch.nn.Linear(features, n)
        self.interest_items = torch.nn.Parameter(torch.zeros(c, n))  # what naming an interest says about items
        self.successor = torch.nn.Parameter(torch.zeros(n, n))  # latest item of the named interest -> next item
        for p in (self.interest_head.weight, self.interest_head.bias, self.item_head.weight, self.item_head.bias):
            torch.nn.init.zeros_(p)  # a uniform start: every variant and seed begins from the same policy

    def features(self, users: Sequence[BenchmarkUser]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x`` [U, F] and the latest history item of each interest [U, C] (-1: none); cached per user id."""
        missing = [u for u in users if u.user_id not in self._features]
        n, c = len(self.item_ids), len(self.interests)
        for user in missing:
            x = torch.zeros(2 * n + c)
            latest = torch.full((c,), -1, dtype=torch.long)
            for item_id in user.history:
                i = self.index[item_id]
                x[i] += 1.0 / len(user.history)
                x[n + int(self.item_interest[i])] += 1.0 / len(user.history)
                latest[self.item_interest[i]] = i
            x[n + c + self.index[user.history[-1]]] = 1.0
            self._features[user.user_id] = (x, latest)
        rows = [self._features[u.user_id] for u in users]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def interest_logp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.interest_head(x), -1)  # [U, C]

    def item_logp(self, x: torch.Tensor, latest: torch.Tensor, interest: Optional[torch.Tensor]) -> torch.Tensor:
        """log π(i | x, c) [U, M, items] for interests ``interest`` [U, M]; log π(i | x) [U, 1, items] without."""
        logits = self.item_head(x)[:, None, :]
        if interest is not None:
            last = latest.gather(1, interest)  # [U, M]
            lookup = torch.where(last[..., None] >= 0, self.successor[last.clamp(min=0)], 0.0)
            logits = logits + self.interest_items[interest] + lookup
        return torch.log_softmax(logits, -1)

    def marginal_logp(self, users: Sequence[BenchmarkUser]) -> torch.Tensor:
        """log π(i | x) [U, items]: the interest summed out when thinking."""
        x, latest = self.features(users)
        if not self.thinking:
            return self.item_logp(x, latest, None)[:, 0]
        c = len(self.interests)
        every = torch.arange(c).expand(len(users), c)
        return torch.logsumexp(self.interest_logp(x)[..., None] + self.item_logp(x, latest, every), dim=1)


@dataclass
class Rollouts:
    users: List[BenchmarkUser]
    interests: Optional[torch.Tensor]  # [U, N] (thinking)
    items: torch.Tensor  # [U, N, K] item indices
    old_logp: torch.Tensor  # [U, N, K, T] per token (T = 2 thinking: interest, item; 1 otherwise)


def _target_ids(user: BenchmarkUser) -> Tuple[str, ...]:
    return next(iter(user.targets.values()))  # one target domain per world user


def _targets(policy: WorldPolicy, users: Sequence[BenchmarkUser]) -> List[torch.Tensor]:
    """Each user's target set as code rows [n, 2] = (interest, position)."""
    return [policy.item_codes[[policy.index[t] for t in _target_ids(u)]] for u in users]


def sample_rollouts(policy: WorldPolicy, users: Sequence[BenchmarkUser], n: int, k: int,
                    generator: torch.Generator) -> Rollouts:
    """Two-stage rollout: N traces (named interests) per user, K items per trace, with their log-probs."""
    with torch.no_grad():
        x, latest = policy.features(users)
        u = len(users)
        if policy.thinking:
            interest_lp = policy.interest_logp(x)
            interests = torch.multinomial(interest_lp.exp(), n, replacement=True, generator=generator)  # [U, N]
            item_lp = policy.item_logp(x, latest, interests)  # [U, N, items]
        else:
            interests = None
            item_lp = policy.item_logp(x, latest, None).expand(u, n, -1)
        items = torch.multinomial(item_lp.exp().reshape(u * n, -1), k, replacement=True,
                                  generator=generator).reshape(u, n, k)
        logp = item_lp.gather(2, items)[..., None]  # [U, N, K, 1]
        if interests is not None:
            trace_lp = interest_lp.gather(1, interests)[:, :, None, None].expand(u, n, k, 1)
            logp = torch.cat([trace_lp, logp], dim=-1)
    return Rollouts(list(users), interests, items, logp)


def rollout_logp(policy: WorldPolicy, r: Rollouts) -> torch.Tensor:
    """The current policy's per-token log-probs of the rollouts' tokens [U, N, K, T]."""
    x, latest = policy.features(r.users)
    u, n, k = r.items.shape
    if r.interests is None:
        return policy.item_logp(x, latest, None).expand(u, n, -1).gather(2, r.items)[..., None]
    item_lp = policy.item_logp(x, latest, r.interests).gather(2, r.items)[..., None]
    trace_lp = policy.interest_logp(x).gather(1, r.interests)[:, :, None, None].expand(u, n, k, 1)
    return torch.cat([trace_lp, item_lp], dim=-1)


def recall_at_k(policy: WorldPolicy, users: Sequence[BenchmarkUser], ks: Sequence[int]) -> Dict[int, float]:
    """Held-out Recall@K: the target among the K items of highest marginal probability (one target per user), ties
    broken uniformly at random (in expectation: a uniform policy scores K / items)."""
    with torch.no_grad():
        lp = policy.marginal_logp(users)
        target = torch.tensor([policy.index[_target_ids(u)[0]] for u in users])
        mine = lp.gather(1, target[:, None])
        above = (lp > mine).sum(1)  # items strictly more probable than the target
        tied = (lp == mine).sum(1) - 1  # others as probable: the target's place among them is uniformly random
        return {k: float(((k - above) / (tied + 1)).clamp(0, 1).mean()) for k in ks}


def hit_probability(policy: WorldPolicy, users: Sequence[BenchmarkUser]) -> float:
    """Mean probability that one sampled item is the user's target (exact: the policy's marginal)."""
    with torch.no_grad():
        lp = policy.marginal_logp(users)
        target = torch.tensor([policy.index[_target_ids(u)[0]] for u in users])
        return float(lp.gather(1, target[:, None]).exp().mean())


def grpo_step(policy: WorldPolicy, optimizer: torch.optim.Optimizer, r: Rollouts, cfg: SimConfig) -> Dict[str, float]:
    """One rollout batch: rewards (eqs. 7–9), advantages (eq. 5), ``cfg.mini_batches`` optimizer steps of the
    stage-wise clipped loss with non-hit weights (eqs. 10–13)."""
    u, n, k = r.items.shape
    codes = policy.item_codes[r.items]  # [U, N, K, 2]
    rewards = two_stage_rewards(codes, _targets(policy, r.users), diversity=cfg.diversity, accuracy=cfg.accuracy)
    groups = torch.arange(u)[:, None, None].expand(u, n, k)
    advantages = cfg.advantage_sign * group_advantages(rewards.reward, groups)
    weights = hit_sample_weights(rewards.hit, cfg.nonhit_weight)
    t = r.old_logp.shape[-1]
    item_mask = torch.zeros(t, dtype=torch.bool)
    item_mask[-1] = True  # the last token is the item; the one before it (thinking) the trace
    metrics: Dict[str, List[float]] = {"pg_loss": [], "clipfrac_cot": [], "clipfrac_item": []}
    for part in torch.arange(u).chunk(cfg.mini_batches):
        sub = Rollouts([r.users[i] for i in part.tolist()], None if r.interests is None else r.interests[part],
                       r.items[part], r.old_logp[part])
        logp = rollout_logp(policy, sub).reshape(-1, t)
        rows = logp.shape[0]
        loss, m = grpo_policy_loss(logp, sub.old_logp.reshape(-1, t), advantages[part].reshape(-1),
                                   torch.ones(rows, t, dtype=torch.bool), item_mask.expand(rows, t),
                                   clip_cot=cfg.clip_cot, clip_item=cfg.clip_item,
                                   sample_weight=weights[part].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for key in metrics:
            metrics[key].append(float(m[key]))
    ordered = r.items.sort(dim=-1).values
    distinct = 1 + (ordered[..., 1:] != ordered[..., :-1]).sum(-1)  # distinct items among a trace's K
    return {"reward": float(rewards.reward.mean()), "hit_rate": float(rewards.hit.float().mean()),
            "distinct_items": float((distinct.float() / k).mean()),
            **{key: sum(v) / len(v) for key, v in metrics.items()}}


def train_grpo(world: World, train_users: Sequence[BenchmarkUser], cfg: SimConfig,
               eval_users: Sequence[BenchmarkUser] = (),
               ks: Sequence[int] = (1, 8, 32)) -> Tuple[WorldPolicy, List[Dict[str, float]]]:
    """``cfg.steps`` GRPO steps; returns the policy and one metrics row per step (held-out Recall@K and hit
    probability of the policy before the step's update; the last row is after the last step)."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    policy = WorldPolicy(world, cfg.thinking)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    history = []
    for step in range(cfg.steps + 1):
        row: Dict[str, float] = {"step": step}
        if eval_users:
            row.update({f"recall@{k}": v for k, v in recall_at_k(policy, eval_users, ks).items()})
            row["hit_probability"] = hit_probability(policy, eval_users)
        if step < cfg.steps:
            pick = torch.randint(len(train_users), (cfg.users_per_step,), generator=generator).tolist()
            r = sample_rollouts(policy, [train_users[i] for i in pick], cfg.num_traces, cfg.num_items, generator)
            row.update(grpo_step(policy, optimizer, r, cfg))
        history.append(row)
    return policy, history


@dataclass(frozen=True)
class MopdConfig:
    steps: int = 40
    users_per_step: int = 16
    num_traces: int = 4  # trajectories per user, one item each
    rho: float = 0.8  # eq. 20's kept share of information (1: no filter)
    lr: float = 0.1
    seed: int = 0


def train_mopd(student: WorldPolicy, teacher: WorldPolicy, train_users: Sequence[BenchmarkUser], cfg: MopdConfig,
               eval_users: Sequence[BenchmarkUser] = (), ks: Sequence[int] = (1, 8, 32)) -> List[Dict[str, float]]:
    """On-policy distillation of ``teacher`` into ``student`` (eqs. 16–20): the student samples (thinking: interest
    then item), the teacher scores the sampled tokens, the trajectories the IG filter keeps train with eq. 18."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    history = []
    for step in range(cfg.steps + 1):
        row: Dict[str, float] = {"step": step}
        if eval_users:
            row.update({f"recall@{k}": v for k, v in recall_at_k(student, eval_users, ks).items()})
        if step < cfg.steps:
            pick = torch.randint(len(train_users), (cfg.users_per_step,), generator=generator).tolist()
            r = sample_rollouts(student, [train_users[i] for i in pick], cfg.num_traces, 1, generator)
            with torch.no_grad():
                teacher_logp = rollout_logp(teacher, r).reshape(-1, r.old_logp.shape[-1])
            logp = rollout_logp(student, r).reshape(teacher_logp.shape)
            mask = torch.ones_like(logp, dtype=torch.bool)
            advantages = mopd_advantages(teacher_logp, logp, mask)
            kept = information_gain_filter(information_gain_scores(advantages, mask), cfg.rho)
            loss, m = mopd_loss(logp[kept], advantages[kept], torch.ones_like(logp[kept]), mask[kept])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            row.update(pg_loss=float(m["pg_loss"]), logp_gap=float((teacher_logp - logp.detach()).abs().mean()),
                       kept=len(kept) / logp.shape[0])
        history.append(row)
    return history
