"""Beam and hierarchical item search on vLLM against the transformers backend's search as the oracle.

The oracle is :class:`~megatron_onereason.generation.two_stage.TwoStageGenerator` (one batched beam step over the
whole vocabulary per token, KV cache copied per beam), fp32 on both sides: the same items in the same order, the
same per-token raw and behaviour log-probs. Width 32 exceeds the candidates of every trie node of the tiny catalog,
so the "fewer items than K" path is exercised too.
"""
import copy
import dataclasses

import pytest

from megatron_onereason.generation.constrained import ItemicConstraint
from megatron_onereason.generation.hf_backend import TransformersBackend
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from oracles import legal_items, user_prompts

pytest.importorskip("vllm")

ATOL = 1e-4  # fp32 engine vs fp32 transformers


def pattern_only(backend):
    """The vLLM backend's engine serving requests without a catalog (the scheme's pattern only, OpenOneRec's
    RecIF decoding): the catalog travels per request, so one engine serves both."""
    view = copy.copy(backend)
    view.catalog_dir = None
    view.constraint = ItemicConstraint(None, backend.vocab, backend.config.vocab_size)
    return view


@pytest.fixture(scope="module")
def setup(vllm_backend, tiny_recommender):
    catalog_oracle = TransformersBackend.from_pretrained(tiny_recommender.model_dir, tiny_recommender.catalog_dir)
    pattern_oracle = TransformersBackend(catalog_oracle.model, catalog_oracle.tokenizer, catalog_oracle.vocab)
    prompts = user_prompts(vllm_backend.tokenizer)
    return {"catalog": (vllm_backend, catalog_oracle), "pattern": (pattern_only(vllm_backend), pattern_oracle),
            "prompts": prompts, "items": ItemCatalog.load(tiny_recommender.catalog_dir)}


def assert_same_search(got, want):
    assert len(got) == len(want)
    for g_out, w_out in zip(got, want):
        assert len(g_out.traces) == len(w_out.traces)
        for g, w in zip(g_out.traces, w_out.traces):
            assert g.token_ids == w.token_ids and g.sampled == w.sampled
            assert g.model_logprobs == pytest.approx(w.model_logprobs, abs=ATOL)
            assert [c.token_ids for c in g.completions] == [c.token_ids for c in w.completions]
            assert [(c.domain, c.codes) for c in g.completions] == [(c.domain, c.codes) for c in w.completions]
            for gc, wc in zip(g.completions, w.completions):
                assert gc.model_logprobs == pytest.approx(wc.model_logprobs, abs=ATOL)
                assert gc.logprobs == pytest.approx(wc.logprobs, abs=ATOL)


@pytest.mark.parametrize("strategy", ["beam", "hierarchical"])
@pytest.mark.parametrize("catalog", ["catalog", "pattern"])
def test_non_thinking_search_equals_the_transformers_search(setup, catalog, strategy):
    backend, oracle = setup[catalog]
    params = GenerationParams(thinking=False, num_items=32, item_strategy=strategy, item_end=catalog == "catalog")
    got = backend.generate(setup["prompts"][False], params)
    assert_same_search(got, oracle.generate(setup["prompts"][False], params))
    items = [(c.domain, c.codes) for c in got[0].traces[0].completions]
    assert len(set(items)) == len(items) and all(c is not None for _, c in items)
    if catalog == "catalog" and strategy == "beam":  # as wide as the catalog: every item of the domain, ranked
        assert set(items) == legal_items(setup["items"], backend.vocab.scheme, "video")
    scores = [c.log_prob for c in got[1].traces[0].completions]
    assert scores == sorted(scores, reverse=True)
    assert got[0].stage2_cached_tokens > 0.5 * got[0].stage2_prompt_tokens  # rounds reuse the prompt's KV blocks


@pytest.mark.parametrize("catalog", ["catalog", "pattern"])
def test_thinking_with_greedy_traces_equals_the_transformers_search(setup, catalog):
    backend, oracle = setup[catalog]
    params = GenerationParams(num_traces=1, num_items=8, item_strategy="beam", temperature=0.0, max_think_tokens=12)
    assert_same_search(backend.generate(setup["prompts"][True], params),
                       oracle.generate(setup["prompts"][True], params))


def test_thinking_with_sampled_traces_beams_each_trace(setup):
    """Sampled traces differ between engines: each vLLM trace is replayed as the prompt of a non-thinking
    transformers search, whose beams must be the vLLM beams of that trace (separator from ``answer_prefix``)."""
    backend, oracle = setup["catalog"]
    prompts = [dataclasses.replace(p, answer_prefix=(198,)) for p in setup["prompts"][True]]
    params = GenerationParams(num_traces=3, num_items=8, item_strategy="beam", temperature=1.0, max_think_tokens=10,
                              seed=4)
    got = backend.generate(prompts, params)
    for prompt, out in zip(prompts, got):
        for trace in out.traces:
            assert trace.token_ids[-1] == 198 and not trace.sampled[-1]
            replay = [Prompt(prompt.token_ids + tuple(trace.token_ids), prompt.domain)]
            want = oracle.generate(replay, dataclasses.replace(params, thinking=False, num_traces=1))[0].traces[0]
            assert [c.token_ids for c in trace.completions] == [c.token_ids for c in want.completions]
            for gc, wc in zip(trace.completions, want.completions):
                assert gc.model_logprobs == pytest.approx(wc.model_logprobs, abs=ATOL)
                assert gc.logprobs == pytest.approx(wc.logprobs, abs=ATOL)

