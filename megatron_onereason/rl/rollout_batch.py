"""From two-stage generation outputs to what the RL losses need: item codes, trees, masks and log-prob layouts.

Pure functions: no model, no process. A prompt's N traces each become one :class:`TreeSequence` with its K item
completions as children; forced tokens (``</think>`` forced at the budget, a begin token forced by the prompt's
domain) are masked out of the loss because the policy did not choose them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Sequence

import torch

from megatron_onereason.eval.rec_eval import completion_item_id
from megatron_onereason.generation.outputs import PromptOutput
from megatron_onereason.rl.tree_pack import TreeSequence
from megatron_onereason.tokenizer.item_catalog import ItemCatalog


@dataclass
class RolloutTree:
    """One trace of one prompt with its K completions, and the per-token facts the losses need."""

    prompt_index: int
    trace_index: int
    tree: TreeSequence
    trace_mask: torch.Tensor  # bool [Tr]: sampled reasoning tokens
    child_mask: torch.Tensor  # bool [K, Tc]
    trace_rollout_logp: torch.Tensor  # [Tr] raw-model log-probs reported by the rollout engine
    child_rollout_logp: torch.Tensor  # [K, Tc]
    trace_behaviour_logp: torch.Tensor  # [Tr] log-probs under the sampling distribution μ (mask, temperature)
    child_behaviour_logp: torch.Tensor  # [K, Tc]


def rollout_trees(outputs: Sequence[PromptOutput]) -> List[RolloutTree]:
    """One :class:`RolloutTree` per (prompt, trace), in prompt-major order."""
    trees = []
    for p, out in enumerate(outputs):
        forced_begin = out.prompt.domain is not None
        for i, trace in enumerate(out.traces):
            k = len(trace.completions)
            if k == 0:
                raise ValueError(f"prompt {p} trace {i} has no item completion")
            t_child = max(len(c.token_ids) for c in trace.completions)
            child_mask = torch.zeros(k, t_child, dtype=torch.bool)
            child_logp = torch.zeros(k, t_child)
            child_behaviour = torch.zeros(k, t_child)
            for j, c in enumerate(trace.completions):
                child_mask[j, : len(c.token_ids)] = True
                if forced_begin:
                    child_mask[j, 0] = False
                child_logp[j, : len(c.token_ids)] = torch.tensor(c.model_logprobs, dtype=torch.float32)
                child_behaviour[j, : len(c.token_ids)] = _behaviour(c.logprobs, len(c.token_ids), p)
            trees.append(RolloutTree(
                p, i, TreeSequence(out.prompt.token_ids, trace.token_ids, [c.token_ids for c in trace.completions]),
                torch.tensor(trace.sampled, dtype=torch.bool).reshape(-1),
                child_mask, torch.tensor(trace.model_logprobs, dtype=torch.float32).reshape(-1), child_logp,
                _behaviour(trace.logprobs, len(trace.token_ids), p), child_behaviour))
    return trees


def _behaviour(logprobs, length: int, prompt: int) -> torch.Tensor:
    if logprobs is None or len(logprobs) != length:
        raise ValueError(f"prompt {prompt}: the rollout backend reported no sampling-distribution log-probs "
                         "(generation/outputs.py: logprobs); the behaviour-policy correction needs them")
    return torch.tensor(logprobs, dtype=torch.float32).reshape(-1)


def predicted_codes(outputs: Sequence[PromptOutput], catalog: ItemCatalog) -> torch.Tensor:
    """``[U, N, K, L]`` catalog codes of every completion; -1 where it is not a legal item of its domain."""
    levels = len(catalog.codes[0]) if len(catalog.codes) else 3
    n = max(len(o.traces) for o in outputs)
    k = max(len(t.completions) for o in outputs for t in o.traces)
    codes = torch.full((len(outputs), n, k, levels), -1, dtype=torch.long)
    for u, out in enumerate(outputs):
        for i, trace in enumerate(out.traces):
            for j, c in enumerate(trace.completions):
                item = completion_item_id(catalog, c)
                if item is not None:
                    codes[u, i, j] = torch.as_tensor(catalog.codes_for(item), dtype=torch.long)
    return codes


def target_codes(targets: Sequence[Sequence[str]], catalog: ItemCatalog) -> List[torch.Tensor]:
    """Per user, ``[n_u, L]`` codes of the target items."""
    return [torch.stack([torch.as_tensor(catalog.codes_for(t), dtype=torch.long) for t in items])
            for items in targets]


def pad_stack(rows: Sequence[torch.Tensor], fill=0) -> torch.Tensor:
    """Stack 1-D (or K×T) tensors of different last-dim lengths, padding with ``fill``."""
    width = max((r.shape[-1] for r in rows), default=0)
    out = []
    for r in rows:
        pad = [0, width - r.shape[-1]]
        out.append(torch.nn.functional.pad(r, pad, value=fill))
    return torch.stack(out)


def group_into_packs(lengths: Sequence[int], pack_length: int) -> List[List[int]]:
    """Consecutive trees into packs of at most ``pack_length`` positions (order kept, deterministic)."""
    packs: List[List[int]] = []
    used = pack_length + 1
    for i, n in enumerate(lengths):
        if n > pack_length:
            raise ValueError(f"tree {i} needs {n} positions, more than actor.pack_length={pack_length}")
        if used + n > pack_length:
            packs.append([])
            used = 0
        packs[-1].append(i)
        used += n
    return packs


def tree_length(tree: TreeSequence) -> int:
    return len(tree.prompt) + len(tree.trace) + sum(len(c) + 1 for c in tree.children)


def trees_within(trees: Sequence[RolloutTree], idx: Sequence[int], pack_length: int) -> List[int]:
    """The trees of ``idx`` that fit one pack of ``pack_length`` positions, in order (a longer one cannot train)."""
    return [i for i in idx if tree_length(trees[i].tree) <= pack_length]


class Layout(NamedTuple):
    """Trees in the ``[n, Tr]`` / ``[n, K, Tc]`` layout of the losses (padded with False / 0)."""

    trace_mask: torch.Tensor
    child_mask: torch.Tensor
    trace_rollout_logp: torch.Tensor  # raw policy, as the rollout engine computed it
    child_rollout_logp: torch.Tensor
    trace_behaviour_logp: torch.Tensor  # μ: the sampling distribution
    child_behaviour_logp: torch.Tensor


def split_layout(rows: Sequence[RolloutTree], idx: Sequence[int]) -> Layout:
    """Masks and both kinds of rollout log-probs of trees ``idx``, padded."""
    sel = [rows[i] for i in idx]
    return Layout(*(pad_stack([getattr(r, name) for r in sel], False if name.endswith("mask") else 0.0)
                    for name in Layout._fields))
