"""Two-stage think-then-items generation on a tiny random recommender, checked against teacher-forced oracles.

Oracles (``oracles.py``) recompute everything from scratch — one full forward per sequence, no KV cache, no
padding — and the allowed tokens come straight from the catalog rows, not from the trie.
"""
import dataclasses

import pytest
import torch

from megatron_onereason.eval.tiny_recommender import build_tiny_recommender
from megatron_onereason.generation.hf_backend import TransformersBackend
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.generation.prompts import chat_prompt_ids
from megatron_onereason.generation.two_stage import TwoStageGenerator
from megatron_onereason.model.hf_qwen3 import make_hf_qwen3
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.item_trie import ItemTrie
from oracles import allowed_item_ids, assert_rollouts_exact, legal_items, megatron_named, oracle_logp


@pytest.fixture(scope="module", params=["onereason_report", "openonerec"])
def setup(tmp_path_factory, request):
    """The tiny recommender in the default scheme, and in OpenOneRec's (shared begin token, an end token)."""
    tiny = build_tiny_recommender(str(tmp_path_factory.mktemp("gen") / "tiny"), scheme=request.param)
    backend = TransformersBackend.from_pretrained(tiny.model_dir, tiny.catalog_dir)
    catalog = ItemCatalog.load(tiny.catalog_dir)
    tok = backend.tokenizer
    prompts = {
        thinking: [Prompt(chat_prompt_ids(tok, [{"role": "user", "content": text}], thinking), domain)
                   for text, domain in (("Recommend the next video.", "video"), ("What would I like next?", None))]
        for thinking in (True, False)
    }
    return tiny, backend, catalog, prompts


def test_two_stage_returns_n_by_k_items_with_masks_and_exact_logprobs(setup):
    _, backend, catalog, prompts = setup
    params = GenerationParams(num_traces=3, num_items=4, temperature=0.7, item_temperature=1.3, max_think_tokens=12,
                              seed=11)
    outputs = backend.generate(prompts[True], params)
    assert assert_rollouts_exact(outputs, prompts[True], params, backend.model, backend.vocab, backend.chat_tokens,
                                 catalog, len(backend.tokenizer)) > 0
    for out in outputs:  # the loop copies each trace's cache K times: every stage-2 context token is reused
        assert out.stage2_cached_tokens == out.stage2_prompt_tokens == \
            params.num_items * sum(len(out.prompt.token_ids) + len(t.token_ids) for t in out.traces)
        item_length = backend.vocab.scheme.item_length
        assert out.independent_rollout_tokens == sum(4 * (len(t.token_ids) + item_length) for t in out.traces)


def test_forced_begin_and_non_thinking_mode(setup):
    _, backend, catalog, prompts = setup
    outputs = backend.generate(prompts[False], GenerationParams(thinking=False, num_traces=2, num_items=5, seed=3))
    for prompt, out in zip(prompts[False], outputs):
        assert [len(t.token_ids) for t in out.traces] == [0, 0]
        for trace in out.traces:
            assert len(trace.completions) == 5
            for completion in trace.completions:
                assert (completion.domain, completion.codes) in legal_items(catalog, backend.vocab.scheme,
                                                                            prompt.domain)
                if prompt.domain is not None:  # a forced token has probability 1 under the decoding distribution
                    assert completion.logprobs[0] == 0.0 and completion.model_logprobs[0] < 0


def test_seeded_generation_is_reproducible(setup):
    _, backend, _, prompts = setup
    params = GenerationParams(num_traces=2, num_items=3, max_think_tokens=6, seed=5)
    first, again = backend.generate(prompts[True], params), backend.generate(prompts[True], params)
    other = backend.generate(prompts[True], dataclasses.replace(params, seed=6))
    def tokens(outputs):
        return [(t.token_ids, [c.token_ids for c in t.completions]) for o in outputs for t in o.traces]

    assert tokens(first) == tokens(again)
    assert tokens(first) != tokens(other)


def exact_ranking(backend, context, candidates):
    """Exhaustive search: every candidate item scored by one full forward pass (no cache)."""
    scored = []
    for item_tokens in candidates:
        logp, _ = oracle_logp(backend.model, context + item_tokens)
        positions = torch.arange(len(context) - 1, len(context) - 1 + len(item_tokens))
        scored.append((float(logp[positions, torch.tensor(item_tokens)].sum()), item_tokens))
    return sorted(scored, key=lambda s: -s[0])


@pytest.mark.parametrize("thinking", [False, True])
def test_beam_search_as_wide_as_the_catalog_equals_exhaustive_search(setup, thinking):
    _, backend, catalog, prompts = setup
    prompt = prompts[thinking][0]  # forced domain "video"
    candidates = [backend.vocab.item_ids(k, c)
                  for k, c in sorted(legal_items(catalog, backend.vocab.scheme, prompt.domain), key=str)]
    params = GenerationParams(thinking=thinking, num_items=len(candidates), item_strategy="beam", temperature=0.0,
                              max_think_tokens=8)
    trace = backend.generate([prompt], params)[0].traces[0]
    got = [(c.log_prob, c.token_ids) for c in trace.completions]
    want = exact_ranking(backend, list(prompt.token_ids) + trace.token_ids, candidates)
    assert [tokens for _, tokens in got] == [tokens for _, tokens in want]
    assert [score for score, _ in got] == pytest.approx([score for score, _ in want], abs=2e-4)


def test_narrow_beam_and_hierarchical_search_match_brute_force_replays(setup):
    """Width 3 < candidates: textbook beam search and beam-then-greedy replayed with teacher-forced scores."""
    _, backend, catalog, prompts = setup
    prompt = prompts[False][1]  # no forced domain: the begin token is part of the search
    context, width, length = list(prompt.token_ids), 3, backend.vocab.scheme.item_length

    def step_logp(prefix):
        logp, _ = oracle_logp(backend.model, context + prefix)
        return logp[-1]

    beams = [(0.0, [])]
    for step in range(length):
        expanded = []
        for score, prefix in beams:
            logp = step_logp(prefix)
            domain = None if not prefix else backend.vocab.token(prefix[0]).domain
            for token in allowed_item_ids(backend.vocab, catalog, domain, None, prefix):
                expanded.append((score + float(logp[token]), prefix + [token]))
        beams = sorted(expanded, key=lambda s: -s[0])[:width]
        if step == 1:
            first_level = beams  # hierarchical: the beam stops after the first code level
    greedy = []
    for score, prefix in first_level:
        while len(prefix) < length:
            logp = step_logp(prefix)
            domain = backend.vocab.token(prefix[0]).domain
            token = max(allowed_item_ids(backend.vocab, catalog, domain, None, prefix), key=lambda t: float(logp[t]))
            score, prefix = score + float(logp[token]), prefix + [token]
        greedy.append((score, prefix))
    greedy.sort(key=lambda s: -s[0])
    for strategy, want in (("beam", beams), ("hierarchical", greedy)):
        params = GenerationParams(thinking=False, num_items=width, item_strategy=strategy)
        got = backend.generate([prompt], params)[0].traces[0].completions
        assert [c.token_ids for c in got] == [tokens for _, tokens in want], strategy
        assert [c.log_prob for c in got] == pytest.approx([s for s, _ in want], abs=2e-4)


def test_update_weights_from_megatron_names_then_generation_follows_the_new_weights(setup):
    tiny, _, _, prompts = setup
    backend = TransformersBackend.from_pretrained(tiny.model_dir, tiny.catalog_dir)
    cfg = backend.config
    new_model = make_hf_qwen3(cfg, seed=123)
    backend.update_weights(megatron_named(new_model, cfg, padded_vocab=1152))
    new_state = new_model.state_dict()
    for name, param in backend.model.named_parameters():
        torch.testing.assert_close(param, new_state[name], rtol=0, atol=0, msg=name)
    # generation now reports the new model's log-probs
    completion = backend.generate(prompts[False][:1], GenerationParams(thinking=False, seed=1))[0].traces[0]
    completion = completion.completions[0]
    seq = list(prompts[False][0].token_ids) + completion.token_ids
    logp, _ = oracle_logp(new_model, seq)
    n = len(completion.token_ids)
    expect = logp[torch.arange(len(seq) - n - 1, len(seq) - 1), torch.tensor(completion.token_ids)]
    torch.testing.assert_close(torch.tensor(completion.model_logprobs, dtype=torch.float64), expect, atol=2e-4, rtol=0)
    # HF names pass through unchanged
    backend.update_weights([("model.norm.weight", torch.full((cfg.hidden_size,), 0.5))])
    assert torch.equal(backend.model.model.norm.weight, torch.full((cfg.hidden_size,), 0.5))
    for bad, error in [(("decoder.layers.99.mlp.linear_fc2.weight", torch.zeros(1)), KeyError),
                       (("decoder.layers.0.mlp.router.weight", torch.zeros(1)), KeyError),
                       (("output_layer.weight", torch.zeros(cfg.vocab_size, cfg.hidden_size)), KeyError),
                       (("decoder.final_layernorm.weight", torch.zeros(3)), ValueError),
                       (("embedding.word_embeddings.weight", torch.zeros(5, cfg.hidden_size)), ValueError)]:
        with pytest.raises(error, match=bad[0].split(".")[0]):
            backend.update_weights([bad])


def test_item_strategies_agree_on_the_single_best_item(setup):
    """K = 1: beam, hierarchical and greedy sampling are all greedy decoding."""
    _, backend, _, prompts = setup
    results = []
    for strategy in ("beam", "hierarchical", "sample"):
        params = GenerationParams(thinking=False, num_items=1, item_strategy=strategy, item_temperature=0.0)
        results.append([t.completions[0].token_ids for o in backend.generate(prompts[False], params) for t in o.traces])
    assert results[0] == results[1] == results[2]


class ThinkEndBias(torch.nn.Module):
    """The model with a bonus on </think>, so traces close by themselves after different numbers of tokens."""

    def __init__(self, model, think_end_id, bonus):
        super().__init__()
        self.inner, self.config, self.think_end_id, self.bonus = model, model.config, think_end_id, bonus

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        out.logits[..., self.think_end_id] += self.bonus
        return out


def test_traces_closing_at_different_steps_keep_exact_item_logprobs(setup):
    """Rows that finish early idle in the batch (masked cache slots); their items must not notice."""
    _, backend, catalog, prompts = setup
    model = ThinkEndBias(backend.model, backend.chat_tokens.think_end_id, bonus=6.0)
    generator = TwoStageGenerator(model, backend.vocab, backend.chat_tokens, len(backend.tokenizer),
                                  ItemTrie.from_catalog(catalog, backend.vocab.scheme))
    outputs = generator.generate(prompts[True], GenerationParams(num_traces=4, num_items=2, max_think_tokens=10,
                                                                 seed=2))
    traces = [(p, t) for p, o in zip(prompts[True], outputs) for t in o.traces]
    assert any(t.closed_by_model for _, t in traces) and len({len(t.token_ids) for _, t in traces}) > 2
    for prompt, trace in traces:
        if trace.closed_by_model:
            assert trace.sampled[-len(backend.chat_tokens.answer_separator_ids) - 1]  # the model wrote </think>
        for completion in trace.completions:
            seq = list(prompt.token_ids) + trace.token_ids + completion.token_ids
            logp, _ = oracle_logp(model, seq)
            start = len(prompt.token_ids)
            expect = logp[torch.arange(start - 1, len(seq) - 1), torch.tensor(seq[start:])]
            got = torch.tensor(trace.model_logprobs + completion.model_logprobs, dtype=torch.float64)
            torch.testing.assert_close(got, expect, atol=2e-4, rtol=0)
