"""One GRPO step of OneReason §6.1 on an :class:`~megatron_onereason.rl.runtime.RLRuntime`.

Two-stage rollout on the rollout engines (N traces × K item completions, sampled from the one sampling distribution
of ``rollout.sampling``; a beam of K items for the Rollout-Beam rewards) → rewards R = R_acc × R_div (eqs. 7–9) →
group advantages over each user's rollouts (eq. 5) → π_old recomputed by the actor on tree packs (each trace once),
with truncated importance weights π_old/μ against the rollout engine's sampling-distribution log-probs μ
(``grpo.old_logp``, rl/losses.py) → shared-prefix, stage-wise clipped, non-hit down-weighted loss (eqs. 10–13) in
``actor.mini_batches`` optimizer steps (clipping acts from the second one) → weight sync actor → rollout.
"""
from __future__ import annotations

import time
from typing import Dict, Sequence

import torch

from megatron_onereason.eval.benchmark import TaskInstance
from megatron_onereason.rl.actor import GRPOMicroBatch
from megatron_onereason.rl.advantages import group_advantages
from megatron_onereason.rl.losses import hit_sample_weights, importance_weights
from megatron_onereason.rl.metrics import importance_weight_stats, logprob_gap_stats
from megatron_onereason.rl.rewards import BEAM_REWARDS, two_stage_rewards
from megatron_onereason.rl.rollout_batch import predicted_codes, rollout_trees, split_layout, target_codes
from megatron_onereason.rl.runtime import RLRuntime
from megatron_onereason.rl.tree_pack import tree_logprobs_layout


def _flat_tokens(lay, trace_old, child_old, child_mask, renormalised: bool):
    """The trained tokens of one pack as flat ``(π_old, rollout, μ, is_item)`` vectors. ``rollout`` is what the
    rollout engine computed for the distribution the actor scored: the raw policy, except at item tokens the actor
    renormalises over the trie (``renormalised``), where it is μ (the same renormalisation)."""
    t, c = lay.trace_mask, child_mask
    child_rollout = lay.child_behaviour_logp if renormalised else lay.child_rollout_logp
    return (torch.cat([trace_old[t], child_old[c]]).float(),
            torch.cat([lay.trace_rollout_logp[t], child_rollout[c]]).float(),
            torch.cat([lay.trace_behaviour_logp[t], lay.child_behaviour_logp[c]]).float(),
            torch.cat([torch.zeros(int(t.sum()), dtype=torch.bool), torch.ones(int(c.sum()), dtype=torch.bool)]))


def grpo_advantages(rewards, beam: bool) -> torch.Tensor:
    """Eq. 5 per user. Sampled items: over the user's N×K rollouts. A beam (Rollout-Beam rewards): over the
    user's N reasoning traces — the trace is the rollout, its K beam items one deterministic search."""
    u, n, k = rewards.reward.shape
    if beam:
        per_trace = group_advantages(rewards.reward[..., 0].reshape(-1).double(),
                                     torch.arange(u).repeat_interleave(n))
        return per_trace.reshape(u, n, 1).expand(u, n, k).float()
    groups = torch.arange(u).repeat_interleave(n * k)
    return group_advantages(rewards.reward.reshape(-1).double(), groups).reshape(u, n, k).float()


def behaviour_metrics(flat, recompute: bool, g) -> Dict[str, float]:
    """Actor–rollout agreement and the importance weights of the step, over the trained tokens."""
    old, raw, behaviour, item = (torch.cat([f[i] for f in flat])[None] for i in range(4))
    mask = torch.ones_like(item)
    # π_old vs the rollout engine's log-probs of the same distribution: the weight sync (0 up to numerics); vs μ:
    # what the importance weights correct (temperature, masks the actor does not apply).
    out = {"train_rollout_logprob_abs_diff": (old - raw).abs().mean().item() if old.numel() else 0.0}
    if old.numel():
        out.update({f"behaviour/{k}": v for k, v in logprob_gap_stats(old, behaviour, mask, item).items()})
        if recompute and g.is_high is not None:
            w, ratio = importance_weights(old, behaviour, mask, g.is_low, g.is_high)
            out.update(importance_weight_stats(w, ratio, mask))
    return out


def grpo_step(rt: RLRuntime, instances: Sequence[TaskInstance], step: int) -> Dict[str, float]:
    """Roll out ``instances``, train the actor on them, sync the rollout engines; the step's metrics."""
    import ray

    g = rt.cfg.grpo
    beam = g.reward in BEAM_REWARDS  # OneRec-Think eq. 7: stage 2 is a beam search of width K
    t0 = time.time()
    outputs = rt.generate(instances, rt.params(step, item_strategy="beam" if beam else "sample"))
    t_rollout = time.time() - t0
    rt.sleep_rollouts()
    codes = predicted_codes(outputs, rt.catalog)
    rewards = two_stage_rewards(codes, target_codes([i.targets for i in instances], rt.catalog),
                                diversity=g.diversity, accuracy=g.reward)
    u, n, k = rewards.reward.shape
    advantages = grpo_advantages(rewards, beam)
    weights = hit_sample_weights(rewards.hit, g.nonhit_weight)
    keep_user = [not g.dynamic_sampling or bool(rewards.reward[i].std() > 0) for i in range(u)]
    trees = rollout_trees(outputs)
    idx = [t for t, tree in enumerate(trees) if keep_user[tree.prompt_index]]
    completions = [c.token_ids for o in outputs for t in o.traces for c in t.completions]
    metrics = {
        "reward": rewards.reward.float().mean().item(), "hit_rate": rewards.hit.float().mean().item(),
        "diversity": rewards.diversity.float().mean().item(), "users_kept": float(sum(keep_user)),
        "rollout_traces": float(sum(len(o.traces) for o in outputs)),
        "rollout_item_completions": float(u * n * k),
        "generated_tokens": float(sum(o.generated_tokens for o in outputs)),
        "independent_rollout_tokens": float(sum(o.independent_rollout_tokens for o in outputs)),
        **rt.item_validity.rates(completions),  # Fig. 16: invalid itemic tokens (0 under the constraint)
    }
    t1 = time.time()
    if idx:
        packs = rt.packs(trees, idx, instances)
        metrics["actor_packs"] = float(len(packs))
        recompute = g.old_logp == "recompute"
        old = rt.actor.logprobs([p for p, _ in packs]) if recompute else None
        ref = (ray.get(rt.reference.tree_logprobs.remote(*rt.scoring_args(trees, packs))) if rt.reference
               else None)
        micro, flat = [], []
        for j, (pack, members) in enumerate(packs):
            lay = split_layout(trees, members)
            child_mask = torch.zeros_like(lay.child_mask) if beam else lay.child_mask  # beam items: no samples
            if recompute:
                trace_old, child_old = tree_logprobs_layout(old[j], pack)
            else:  # π_old = μ: the rollout engine's sampling-distribution log-probs
                trace_old, child_old = lay.trace_behaviour_logp, lay.child_behaviour_logp
            is_w = (None, None)
            if recompute and g.is_high is not None:
                is_w = tuple(importance_weights(o, b, m, g.is_low, g.is_high)[0] for o, b, m in (
                    (trace_old, lay.trace_behaviour_logp, lay.trace_mask),
                    (child_old, lay.child_behaviour_logp, child_mask)))
            flat.append(_flat_tokens(lay, trace_old, child_old, child_mask, pack.item_allowed is not None))
            tr = [(trees[m].prompt_index, trees[m].trace_index) for m in members]
            ref_layout = tree_logprobs_layout(ref[j], pack) if ref else (None, None)
            micro.append(GRPOMicroBatch(pack, lay.trace_mask, child_mask, trace_old, child_old,
                                        torch.stack([advantages[a, b] for a, b in tr]),
                                        torch.stack([weights[a, b] for a, b in tr]), *ref_layout, *is_w))
        metrics.update(behaviour_metrics(flat, recompute, g))
        train = rt.train_minibatches("train_grpo", micro, g.clip_cot, g.clip_item, g.kl_coef, g.kl_estimator)
        metrics.update({f"train/{k}": v for k, v in train.items()})
    metrics.update(rt.finish_step(t_rollout, time.time() - t1))
    metrics["rollout_tokens_per_sec"] = metrics["generated_tokens"] / max(t_rollout, 1e-9)
    return metrics
