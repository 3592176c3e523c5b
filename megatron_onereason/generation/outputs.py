"""What a think-then-items generation returns: token ids, per-token log-probs and token roles, per trace and item.

Layout per prompt: ``traces[i]`` holds the tokens generated after the prompt up to where the K item completions
branch (reasoning, ``</think>``, the answer separator; empty without thinking); ``traces[i].completions[j]`` holds
the item tokens of completion j (eq. 6: ``<domain_begin>, c1, c2, c3``; a begin token forced by the prompt's
domain has ``logprobs`` 0). Rollout ``(i, j)`` is ``prompt + traces[i].token_ids + completions[j].token_ids``.

Two log-probs per token:

- ``logprobs``: under the decoding distribution — the constraint mask applied and renormalised, at the sampling
  temperature (temperature 1 for greedy and beam-search tokens) — so ``0.0`` for a forced token (``None`` where
  a backend cannot report it);
- ``model_logprobs``: under the raw model at temperature 1 with no mask, what a trainer recomputes for the same
  tokens (a trainer/engine mismatch here shows a weight sync that did not take).

The first is the behaviour (sampling) distribution of importance weights between the rollout engine and the
actor; the second is the policy's own probability. Both backends fill both, the same way.

Stage-2 prefix reuse: ``stage2_prompt_tokens`` counts the context tokens (prompt + trace) in front of the item
completions, once per completion; ``stage2_cached_tokens`` how many of them were not recomputed (vLLM: prefix-cache
hits, whole KV blocks; the transformers loop copies the trace's cache, so all of them).

Token roles: a trace token is *reasoning* when the policy sampled it (``sampled``), *forced* otherwise; every
completion token is an *item* token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megatron_onereason.generation.params import Prompt


@dataclass
class ItemCompletion:
    token_ids: List[int]
    logprobs: Optional[List[float]]
    model_logprobs: List[float]
    domain: Optional[str]  # decoded pattern; None when the tokens are not one well-formed itemic pattern
    codes: Optional[Tuple[int, ...]]

    @property
    def log_prob(self) -> float:
        """Model log-probability of the completion given its trace (the beam-search score)."""
        return float(sum(self.model_logprobs))


@dataclass
class Trace:
    token_ids: List[int]
    logprobs: Optional[List[float]]
    model_logprobs: List[float]
    sampled: List[bool]  # True: a reasoning token drawn from the policy; False: forced
    closed_by_model: bool  # the model emitted </think> itself (not forced at max_think_tokens); False without thinking
    completions: List[ItemCompletion] = field(default_factory=list)


@dataclass
class PromptOutput:
    prompt: Prompt
    traces: List[Trace]
    stage2_prompt_tokens: int = 0
    stage2_cached_tokens: int = 0

    @property
    def generated_tokens(self) -> int:
        """Tokens decoded by the two-stage rollout: each trace once, plus every item completion."""
        return sum(len(t.token_ids) + sum(len(c.token_ids) for c in t.completions) for t in self.traces)

    @property
    def independent_rollout_tokens(self) -> int:
        """Tokens the same N×K rollouts cost when each repeats its trace (the baseline of §6.1's ablation)."""
        return sum(len(t.token_ids) + len(c.token_ids) for t in self.traces for c in t.completions)


@dataclass
class TreeScores:
    """Log-probs of given tokens (a teacher or the reference scoring a rollout), raw model at temperature 1.

    ``trace[i] = log p(trace_i | prompt, trace_<i)`` and ``children[j][i] = log p(child_ji | prompt, trace,
    child_j<i)`` for a tree ``(prompt, trace, children)`` (the fields of ``rl.tree_pack.TreeSequence``).
    """

    trace: List[float]
    children: List[List[float]]
