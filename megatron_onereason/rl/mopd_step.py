"""One MOPD step of OneReason §6.3 (eqs. 16–20) on an :class:`~megatron_onereason.rl.runtime.RLRuntime`.

Each prompt goes to its domain's teacher (general-domain prompts, ``data.general_prompts``, to the plain Qwen3
teacher with OpenOneRec's itemic penalty, §5.2); teachers and student score only the student's sampled tokens; the
information-gain filter keeps the most informative trajectories and the actor trains with truncated IS weights.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from megatron_onereason.rl.actor import MOPDMicroBatch
from megatron_onereason.rl.config import RLConfig
from megatron_onereason.rl.distill import (
    check_teacher_vocabulary,
    general_itemic_penalty,
    information_gain_filter,
    information_gain_scores,
    itemic_token_mask,
    load_general_prompts,
    mopd_advantages,
    route_to_teachers,
    teacher_input_ids,
)
from megatron_onereason.rl.metrics import logprob_gap_stats
from megatron_onereason.rl.rollout_batch import pad_stack, rollout_trees
from megatron_onereason.rl.runtime import RLRuntime
from megatron_onereason.rl.tree_pack import tree_logprobs_layout

log = logging.getLogger("megatron_onereason.rl")


class GeneralInstance(NamedTuple):
    """A general-domain MOPD prompt (data.general_prompts): chat messages, no domain, no target."""

    messages: List[Dict[str, str]]
    domain: Optional[str] = None
    task: str = "general"


class GeneralDomain(NamedTuple):
    """The general-domain prompts (OpenOneRec §5.2) and the padding id the plain teacher reads itemic ids as."""

    prompts: List[List[Dict[str, str]]]
    teacher_pad_id: int


def load_general_domain(cfg: RLConfig, tokenizer, vocab) -> Optional[GeneralDomain]:
    """``data.general_prompts`` for MOPD (None without), after checking the general teacher's vocabulary."""
    from transformers import AutoTokenizer

    if cfg.algorithm != "mopd" or not cfg.data.general_prompts:
        return None
    general = load_general_prompts(cfg.data.general_prompts, vocab.scheme)
    log.info("%s: %d general-domain prompts (skipped: %s)", cfg.data.general_prompts, len(general.prompts),
             general.skipped)
    teacher_tokenizer = AutoTokenizer.from_pretrained(cfg.mopd.general_teacher)
    check_teacher_vocabulary(tokenizer.get_vocab(), teacher_tokenizer.get_vocab(), vocab, cfg.mopd.general_teacher)
    return GeneralDomain(general.prompts, teacher_tokenizer.pad_token_id or 0)


def with_general_prompts(batch: List, general: Optional[GeneralDomain], cfg: RLConfig, step: int) -> List:
    """The step's recommendation prompts, then (with data.general_prompts) its general-domain prompts."""
    if general is None:
        return batch
    rng = np.random.default_rng([cfg.seed, step, 1])
    n = min(cfg.data.general_prompts_per_step, len(general.prompts))
    return batch + [GeneralInstance(general.prompts[i]) for i in rng.choice(len(general.prompts), size=n,
                                                                             replace=False)]


def teacher_for(cfg: RLConfig, instance) -> str:
    """A recommendation prompt goes to its domain's teacher; a general-domain prompt to the general teacher."""
    if instance.task == "general":
        return cfg.mopd.general_teacher
    teacher = cfg.mopd.teachers.get(instance.domain)
    if teacher is None:
        raise ValueError(f"no MOPD teacher for domain {instance.domain!r} of a {instance.task} prompt "
                         f"(mopd.teachers has {sorted(cfg.mopd.teachers)}; the general teacher takes "
                         "data.general_prompts only)")
    return teacher


def plain_teacher_pack(pack, vocab, pad_id: int):
    """``pack`` as the plain general teacher reads it: itemic ids (inputs and labels) replaced by padding."""
    return dataclasses.replace(pack, item_allowed=None,
                               tokens=teacher_input_ids(pack.tokens, itemic_token_mask(pack.tokens, vocab), pad_id),
                               labels=teacher_input_ids(pack.labels, itemic_token_mask(pack.labels, vocab), pad_id))


def mopd_step(rt: RLRuntime, instances: Sequence, step: int,
              general: Optional[GeneralDomain] = None) -> Dict[str, float]:
    """Roll out ``instances`` (one item per trace), score them with the teachers and the student, train the
    student on the kept trajectories, sync the rollout engines; the step's metrics."""
    import ray

    m = rt.cfg.mopd
    t0 = time.time()
    outputs = rt.generate(instances, rt.params(step, num_items=1))
    t_rollout = time.time() - t0
    rt.sleep_rollouts()
    t1 = time.time()
    trees = rollout_trees(outputs)
    is_general = [instances[t.prompt_index].task == "general" for t in trees]
    teacher_of = [teacher_for(rt.cfg, instances[t.prompt_index]) for t in trees]
    # Per tree: (trace part, item part) of the teacher's and the student's log-probs of the sampled tokens.
    teacher_lp: Dict[int, tuple] = {}
    student_lp: Dict[int, tuple] = {}
    for teacher, members in route_to_teachers(teacher_of, {p: p for p in rt.teachers}).items():
        # Student and teacher score the sampled tokens under the rollout's sampling distribution (item tokens
        # renormalised over the trie when constrained, rl/sampling.py), so eq. 16 compares like with like.
        packs = rt.packs(trees, members.tolist(), instances)
        plain = teacher == m.general_teacher  # no itemic vocabulary: it reads itemic ids as padding
        scored, trees_of = rt.scoring_args(trees, packs)
        t_lp = ray.get(rt.teachers[teacher].tree_logprobs.remote(
            [plain_teacher_pack(p, rt.vocab, general.teacher_pad_id) for p in scored] if plain else scored,
            trees_of))
        s_lp = rt.actor.logprobs([p for p, _ in packs])
        for j, (pack, mem) in enumerate(packs):
            for lp, out in ((t_lp[j], teacher_lp), (s_lp[j], student_lp)):
                trace, child = tree_logprobs_layout(lp, pack)
                for r, i in enumerate(mem):
                    out[i] = (trace[r, : len(trees[i].trace_mask)], child[r, 0, : trees[i].child_mask.shape[1]])
    adv, masks, gaps, scores = {}, {}, [], []
    for i, t in enumerate(trees):
        # A general prompt's rollout is its reasoning: the item stage after it is not a general-domain answer.
        child_mask = torch.zeros_like(t.child_mask[0]) if is_general[i] else t.child_mask[0]
        mask = torch.cat([t.trace_mask, child_mask])[None]
        tokens = torch.tensor(list(t.tree.trace) + list(t.tree.children[0]))[None]
        # OpenOneRec §5.2: itemic tokens in a general-domain rollout get log-prob −1e9, the rollout ends there.
        teacher, keep = general_itemic_penalty(torch.cat(teacher_lp[i])[None], itemic_token_mask(tokens, rt.vocab),
                                               torch.tensor([is_general[i]]))
        student = torch.cat(student_lp[i])[None]
        mask = mask & keep
        a = mopd_advantages(teacher, student, mask, clip=m.adv_clip)
        adv[i], masks[i] = a[0], mask[0]
        gaps.append((student - teacher).abs()[mask])
        scores.append(information_gain_scores(a, mask)[0])
    kept = information_gain_filter(torch.stack(scores), m.rho).tolist()

    def layout(parts: Dict[int, torch.Tensor], members, fill):
        """Tree rows in the pack's ``[trace | item]`` layout (as ``MegatronActor.train_mopd`` builds it)."""
        split = [(parts[i][: len(trees[i].trace_mask)], parts[i][len(trees[i].trace_mask):]) for i in members]
        return torch.cat([pad_stack([a for a, _ in split], fill), pad_stack([b for _, b in split], fill)], dim=1)

    # μ of eq. 17: the student's sampling distribution in the inference engine.
    behaviour = {i: torch.cat([t.trace_behaviour_logp, t.child_behaviour_logp[0]]) for i, t in enumerate(trees)}
    micro = [MOPDMicroBatch(pack, layout(masks, mem, False), layout(adv, mem, 0.0), layout(behaviour, mem, 0.0))
             for pack, mem in rt.packs(trees, kept, instances)]
    train = rt.train_minibatches("train_mopd", micro, m.is_low, m.is_high)
    t_train = time.time() - t1
    student_all = torch.cat([torch.cat(student_lp[i])[masks[i]] for i in range(len(trees))])
    # The rollout's log-probs of the distribution the student scored (as grpo_step does): item tokens renormalised
    # over the trie (μ) when constrained, the raw policy otherwise.
    renormalised = rt.constraint is not None
    raw_all = torch.cat([torch.cat([t.trace_rollout_logp, (t.child_behaviour_logp if renormalised
                                                            else t.child_rollout_logp)[0]])[masks[i]]
                         for i, t in enumerate(trees)])
    gap = torch.cat(gaps)
    metrics = {"student_teacher_logp_abs_gap": gap.mean().item() if gap.numel() else 0.0,
               "ig_kept_share": len(kept) / len(trees), "general_prompts": float(sum(is_general)),
               "train_rollout_logprob_abs_diff": (student_all - raw_all).abs().mean().item(),
               **{f"behaviour/{k}": v for k, v in logprob_gap_stats(
                   student_all[None], torch.cat([behaviour[i][masks[i]] for i in range(len(trees))])[None],
                   torch.ones(1, student_all.numel(), dtype=torch.bool)).items()},
               **rt.finish_step(t_rollout, t_train)}
    metrics.update({f"train/{k}": v for k, v in train.items()})
    return metrics
