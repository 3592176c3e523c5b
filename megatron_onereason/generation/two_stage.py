"""Think-then-items generation over a Hugging Face causal LM with a KV cache (OneReason §6.1, appendix A.4.2).

Stage 1 prefills the prompts once, copies each prompt's cache N times and samples N reasoning traces together until
each emits ``</think>`` (or reaches ``max_think_tokens``, when ``</think>`` is forced), then forces the answer
separator (or the prompt's ``answer_prefix``). Stage 2 copies each trace's cache K times — the K completions reuse
the trace, it is never recomputed — and decodes the item tokens ``<|domain_begin|> c1 … cL`` (eq. 6; plus the end
token in schemes that have one, unless ``item_end=False``) by sampling, beam search or hierarchical search
(:mod:`megatron_onereason.generation.params`). Without thinking, stage 1 is skipped and the items follow the prompt
(which ends with the empty think block).

Rows of a batch finish at different steps; a finished row keeps its place and is fed a masked-out token, so every
row's positions and attention stay exactly those of its own sequence. Beam scores are model log-probs at
temperature 1 with illegal tokens removed (not renormalised), so beam search ranks catalog items by
``log p(item | prompt, trace)``, and a beam as wide as the candidate set returns the exact top K.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from megatron_onereason.generation.constrained import ItemicConstraint, check_prompt_domains, decode_item
from megatron_onereason.generation.outputs import ItemCompletion, PromptOutput, Trace
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.generation.prompts import ChatTokens
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

_REASONING, _FORCING, _DONE = 0, 1, 2
_PAD_ID = 0  # fed in masked-out slots: any id works, attention never sees it


class _DecodeBatch:
    """Rows decoding together over one KV cache; a row that is idle this step gets a masked-out slot."""

    def __init__(self, model, prompts: Sequence[Sequence[int]]):
        from transformers import DynamicCache

        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), _PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every row's next token goes to the same cache slot
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        self.model = model
        self.device = device
        self.attention_mask = mask.to(device)
        self.next_position = mask.sum(1).to(device)
        self.cache = DynamicCache(config=model.config)
        positions = (mask.cumsum(1) - 1).clamp(min=0).to(device)
        out = model(input_ids=ids.to(device), attention_mask=self.attention_mask, position_ids=positions,
                    past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.logits = out.logits[:, -1].float()  # next-token logits of every row

    def feed(self, tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` [R] (ignored where not ``active``); returns the next-token logits [R, V]."""
        tokens = torch.where(active, tokens, torch.full_like(tokens, _PAD_ID))
        self.attention_mask = torch.cat([self.attention_mask, active.long()[:, None]], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.attention_mask,
                         position_ids=self.next_position[:, None], past_key_values=self.cache, use_cache=True)
        self.next_position = self.next_position + active.long()
        self.logits = out.logits[:, -1].float()
        return self.logits

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` (repeats allowed: that is how a cache is copied)."""
        rows = rows.to(self.device)
        self.cache.reorder_cache(rows)
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]
        self.logits = self.logits[rows]


def _masked_log_softmax(logits: torch.Tensor, allowed: torch.Tensor, temperature: float) -> torch.Tensor:
    scale = temperature if temperature > 0 else 1.0
    return torch.log_softmax((logits / scale).masked_fill(~allowed, float("-inf")), dim=-1)


def _choose(logits: torch.Tensor, allowed: torch.Tensor, temperature: float,
            generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample (or argmax at temperature 0) among allowed tokens; returns (tokens, their log-probs)."""
    logp = _masked_log_softmax(logits, allowed, temperature)
    if temperature == 0:
        tokens = logp.argmax(dim=-1)
    else:
        tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


class TwoStageGenerator:
    """``generate(prompts, params)`` over ``model`` (a ``transformers`` causal LM, eval mode)."""

    def __init__(self, model, vocab: ItemicVocab, chat_tokens: ChatTokens, num_valid_tokens: int,
                 trie: Optional[ItemTrie] = None):
        """``num_valid_tokens``: ids at or above it are padding rows of the model (never generated)."""
        vocab_size = int(model.config.vocab_size)
        if not vocab.max_id < num_valid_tokens <= vocab_size:
            raise ValueError(f"need largest itemic id {vocab.max_id} < valid tokens {num_valid_tokens} <= model vocab "
                             f"{vocab_size}")
        self.model = model
        self.vocab = vocab
        self.chat_tokens = chat_tokens
        self.vocab_size = vocab_size
        self.constraint = ItemicConstraint(trie, vocab, vocab_size)  # trie None: the scheme's pattern only
        self.valid_row = torch.arange(vocab_size) < num_valid_tokens
        self.reasoning_row = self.valid_row.clone()
        self.reasoning_row[list(chat_tokens.stop_ids)] = False

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> List[PromptOutput]:
        if not prompts:
            return []
        check_prompt_domains([p.domain for p in prompts], params.constrained, self.vocab, self.constraint)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=next(self.model.parameters()).device).manual_seed(params.seed)
        n = params.num_traces
        batch = _DecodeBatch(self.model, [p.token_ids for p in prompts])
        batch.select(torch.arange(len(prompts)).repeat_interleave(n))  # N traces share the prompt's prefill
        trace_prompts = [p for p in prompts for _ in range(n)]
        traces = self._traces(batch, trace_prompts, params, generator)
        if params.answer == "text":
            self._complete_text(batch, traces, params, generator)
        else:
            self._complete_items(batch, trace_prompts, traces, params, generator)
        outputs = []
        for i, p in enumerate(prompts):
            own = traces[i * n:(i + 1) * n]
            context = params.num_items * sum(len(p.token_ids) + len(t.token_ids) for t in own)
            outputs.append(PromptOutput(p, own, stage2_prompt_tokens=context, stage2_cached_tokens=context))
        return outputs  # stage 2 copies each trace's cache: every context token is reused

    # ------------------------------------------------------------------------------------------ stage 1
    def _traces(self, batch: _DecodeBatch, prompts: Sequence[Prompt], params: GenerationParams,
                generator: Optional[torch.Generator]) -> List[Trace]:
        """Decode every row's trace; leaves ``batch.logits`` at each row's first item token."""
        rows = len(prompts)
        traces = [Trace([], [], [], [], False) for _ in range(rows)]
        if not params.thinking:
            return traces
        device = batch.device
        phase = [_REASONING] * rows
        queue: List[List[int]] = [[] for _ in range(rows)]
        sampled_count = [0] * rows
        item_logits = torch.empty_like(batch.logits)
        constrain = params.constrained and params.constrain_reasoning
        think_end = self.chat_tokens.think_end_id
        separators = [self.chat_tokens.answer_separator_ids if p.answer_prefix is None else p.answer_prefix
                      for p in prompts]
        tail = self.vocab.levels + 1  # the constraint reads no further back
        while any(ph != _DONE for ph in phase):
            logits = batch.logits
            model_logp = torch.log_softmax(logits, dim=-1)
            for r in range(rows):
                if phase[r] == _REASONING and sampled_count[r] >= params.max_think_tokens:
                    phase[r], queue[r] = _FORCING, [think_end, *separators[r]]
            tokens = torch.full((rows,), _PAD_ID, dtype=torch.long, device=device)
            logps = torch.zeros(rows, device=device)
            reasoning = [r for r in range(rows) if phase[r] == _REASONING]
            if reasoning:
                allowed = self.reasoning_row.expand(len(reasoning), -1)
                if constrain:
                    history = [list(prompts[r].token_ids[-tail:]) + traces[r].token_ids[-tail:] for r in reasoning]
                    allowed = allowed & self.constraint.allowed(history)
                chosen, chosen_logp = _choose(logits[reasoning], allowed.to(device), params.temperature, generator)
                tokens[reasoning], logps[reasoning] = chosen, chosen_logp
            forcing = [r for r in range(rows) if phase[r] == _FORCING]
            for r in forcing:
                tokens[r] = queue[r].pop(0)
            active = torch.tensor([ph != _DONE for ph in phase], device=device)
            token_list, logp_list = tokens.tolist(), logps.tolist()
            model_list = model_logp.gather(1, tokens[:, None]).squeeze(1).tolist()
            for r in reasoning + forcing:
                t = traces[r]
                t.token_ids.append(token_list[r])
                t.logprobs.append(logp_list[r] if phase[r] == _REASONING else 0.0)
                t.model_logprobs.append(model_list[r])
                t.sampled.append(phase[r] == _REASONING)
            for r in reasoning:
                sampled_count[r] += 1
                if token_list[r] == think_end:
                    traces[r].closed_by_model = True
                    phase[r], queue[r] = _FORCING, list(separators[r])
            logits = batch.feed(tokens, active)
            for r in forcing + reasoning:
                if phase[r] == _FORCING and not queue[r]:
                    phase[r] = _DONE
                    item_logits[r] = logits[r]
        batch.logits = item_logits
        return traces

    # ------------------------------------------------------------------------------------------ stage 2
    def _item_allowed(self, step: int, prompts: Sequence[Prompt], histories: List[List[int]],
                      alive: List[bool], params: GenerationParams) -> torch.Tensor:
        rows = len(prompts)
        if step == 0:
            start = self.constraint.item_start_row if params.constrained else self.valid_row
            mask = start.expand(rows, -1).clone()
            for r, p in enumerate(prompts):
                if p.domain is not None:  # the target domain's begin token is forced
                    mask[r] = False
                    mask[r, self.vocab.begin_id(p.domain)] = True
            return mask
        mask = self.valid_row.expand(rows, -1).clone()
        if params.constrained:
            live = [r for r in range(rows) if alive[r]]
            if live:
                mask[live] &= self.constraint.allowed([histories[r] for r in live])
        return mask

    def _complete_items(self, batch: _DecodeBatch, prompts: Sequence[Prompt], traces: List[Trace],
                        params: GenerationParams, generator: Optional[torch.Generator]) -> None:
        k, vocab_size = params.num_items, self.vocab_size
        steps = self.vocab.levels + 1 + (self.vocab.scheme.end_token is not None and params.item_end)
        n_traces = len(traces)
        trace_of_row = torch.arange(n_traces).repeat_interleave(k)
        batch.select(trace_of_row)  # K copies of each trace's cache: the trace is not recomputed
        device = batch.device
        row_prompts = [prompts[t] for t in trace_of_row.tolist()]
        # the constraint reads only the last `steps` tokens before the item
        contexts = [(list(prompts[t].token_ids[-steps:]) + traces[t].token_ids[-steps:])[-steps:]
                    for t in range(n_traces)]
        beam_steps = {"sample": 0, "beam": steps, "hierarchical": 2}[params.item_strategy]
        scores = torch.zeros(n_traces, k, device=device)
        if beam_steps:
            scores[:, 1:] = float("-inf")  # all beams start as copies of one; only the first is live
        scores = scores.flatten()
        token_hist = torch.zeros(n_traces * k, 0, dtype=torch.long, device=device)
        logp_hist = torch.zeros(n_traces * k, 0, device=device)
        model_hist = torch.zeros(n_traces * k, 0, device=device)
        for step in range(steps):
            alive = torch.isfinite(scores).tolist()
            histories = [contexts[t] + h for t, h in zip(trace_of_row.tolist(), token_hist.tolist())]
            allowed = self._item_allowed(step, row_prompts, histories, alive, params).to(device)
            logits = batch.logits
            model_logp = torch.log_softmax(logits, dim=-1)
            if step < beam_steps:
                candidates = scores[:, None] + model_logp.masked_fill(~allowed, float("-inf"))
                top_scores, top_index = candidates.view(n_traces, k * vocab_size).topk(k, dim=1)
                src = (torch.arange(n_traces, device=device)[:, None] * k + top_index // vocab_size).flatten()
                tokens = (top_index % vocab_size).flatten()
                scores = top_scores.flatten()
                token_hist, logp_hist, model_hist = token_hist[src], logp_hist[src], model_hist[src]
                logits, model_logp, allowed = logits[src], model_logp[src], allowed[src]
                if step < steps - 1:
                    batch.select(src)
                logp = _masked_log_softmax(logits, allowed, 1.0).gather(1, tokens[:, None]).squeeze(1)
            elif params.item_strategy == "sample":
                tokens, logp = _choose(logits, allowed, params.item_temperature, generator)
            else:  # hierarchical: greedy below the first level
                logp_all = _masked_log_softmax(logits, allowed, 1.0)
                tokens = logp_all.argmax(dim=-1)
                logp = logp_all.gather(1, tokens[:, None]).squeeze(1)
            token_model_logp = model_logp.gather(1, tokens[:, None]).squeeze(1)
            if step >= beam_steps and beam_steps:
                scores = scores + token_model_logp
            token_hist = torch.cat([token_hist, tokens[:, None]], dim=1)
            logp_hist = torch.cat([logp_hist, logp[:, None]], dim=1)
            model_hist = torch.cat([model_hist, token_model_logp[:, None]], dim=1)
            if step < steps - 1:
                batch.feed(tokens, torch.ones_like(tokens, dtype=torch.bool))
        self._attach(traces, scores.view(n_traces, k), token_hist, logp_hist, model_hist, ranked=bool(beam_steps),
                     require_end=params.item_end)

    def _complete_text(self, batch: _DecodeBatch, traces: List[Trace], params: GenerationParams,
                       generator: Optional[torch.Generator]) -> None:
        """One free-text answer per trace: any valid token at ``temperature``, up to and including an end-of-turn
        token, at most ``max_answer_tokens``."""
        rows, device = len(traces), batch.device
        answers = [ItemCompletion([], [], [], None, None) for _ in range(rows)]
        open_rows = [True] * rows
        stops = set(self.chat_tokens.stop_ids)
        for step in range(params.max_answer_tokens):
            live = [r for r in range(rows) if open_rows[r]]
            if not live:
                break
            logits = batch.logits
            chosen, logp = _choose(logits[live], self.valid_row.expand(len(live), -1).to(device), params.temperature,
                                   generator)
            tokens = torch.full((rows,), _PAD_ID, dtype=torch.long, device=device)
            tokens[live] = chosen
            model_logp = torch.log_softmax(logits[live], dim=-1).gather(1, chosen[:, None]).squeeze(1).tolist()
            for r, t, lp, mlp in zip(live, chosen.tolist(), logp.tolist(), model_logp):
                answers[r].token_ids.append(t)
                answers[r].logprobs.append(lp)
                answers[r].model_logprobs.append(mlp)
                open_rows[r] = t not in stops
            if step < params.max_answer_tokens - 1 and any(open_rows):
                batch.feed(tokens, torch.tensor(open_rows, device=device))
        for trace, answer in zip(traces, answers):
            trace.completions.append(answer)

    def _attach(self, traces: List[Trace], scores: torch.Tensor, token_hist: torch.Tensor, logp_hist: torch.Tensor,
                model_hist: torch.Tensor, ranked: bool, require_end: bool) -> None:
        k = scores.shape[1]
        for t, trace in enumerate(traces):
            order = range(k)
            if ranked:  # beams best-first; a beam that never had a legal candidate (fewer items than K) is dropped
                order = [j for j in scores[t].argsort(descending=True, stable=True).tolist()
                         if torch.isfinite(scores[t, j])]
            for j in order:
                row = t * k + j
                tokens = token_hist[row].tolist()
                item = decode_item(self.vocab, tokens, require_end)
                trace.completions.append(ItemCompletion(
                    token_ids=tokens,
                    logprobs=logp_hist[row].tolist(),
                    model_logprobs=model_hist[row].tolist(),
                    domain=item[0] if item else None,
                    codes=item[1] if item else None,
                ))
