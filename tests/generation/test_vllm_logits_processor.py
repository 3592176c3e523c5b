"""The token-rule logits processors for both vLLM model runners, driven without an engine through the runners'
own interfaces (V1: ``BatchUpdate`` + ``apply(logits)``; V2: slots + ``LogitsContext`` over a token buffer).

Oracles: the allowed set from :func:`rule_masks` (itself checked against the catalog rows in
``test_constrained_decoding.py``) at the step and history the test knows, and the normaliser in float64.
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_onereason.generation.constrained import TokenRule, rule_masks
from megatron_onereason.generation.vllm_logits_processor import (
    REQUEST_ARG,
    _constraint,
    behaviour_logprob,
    pop_normalisers,
    request_spec,
)

vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def rules(tiny_recommender):
    from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

    vocab = ItemicVocab.load(tiny_recommender.model_dir)
    width = vocab.max_id + 1 + 5  # the model's logits are wider than the tokenizer
    constraint = _constraint(tiny_recommender.model_dir, tiny_recommender.catalog_dir, width)
    video = vocab.begin_id("video")
    reqs = [  # (rule, temperature, prompt, outputs so far)
        (TokenRule(forced=(7, 9), first=(video,), trie=True), 0.8, [5, 6, 11], [7, 9]),  # item start
        (TokenRule(first=tuple(constraint.live_begin_ids), trie=True), 1.3, [5, 6], [video]),  # inside an item
        (TokenRule(banned=(3, 4), trie=True), 0.0, [5, 6, 12], [13, 14]),  # reasoning, greedy
        (TokenRule(forced=(21, 22, 23)), 1.0, [5], [21]),  # scoring: forced token
        (TokenRule(banned=(3,)), 2.0, [5, 8], [9]),  # unconstrained reasoning
    ]
    return vocab, width, constraint, reqs


def _params(rule, temperature, tiny, num_valid, key):
    spec = request_spec(rule, tiny.model_dir, tiny.catalog_dir, num_valid, key)
    return vllm.SamplingParams(temperature=temperature, extra_args={REQUEST_ARG: spec})


def _expected(logits, rules, constraint, num_valid, width):
    rows, norms = [], []
    for b, (rule, temperature, prompt, outputs) in enumerate(rules):
        mask = rule_masks([rule], [len(outputs)], [prompt + outputs], num_valid, width, constraint)[0]
        z = logits[b].double()
        masked = z.masked_fill(~mask, float("-inf"))
        t = temperature if temperature > 0 else 1.0
        c = torch.logsumexp(masked / t, 0) - torch.logsumexp(z, 0) / t
        rows.append(masked)
        norms.append(None if int(mask.sum()) == 1 else float(c))
    return torch.stack(rows), norms


def _check(got_logits, got_norms, want_logits, want_norms):
    torch.testing.assert_close(got_logits.double(), want_logits, atol=1e-6, rtol=0)
    assert len(got_norms) == len(want_norms)
    for g, w in zip(got_norms, want_norms):
        assert (g is None) == (w is None) and (w is None or abs(g - w) < 1e-5)


def test_v1_and_v2_processors_mask_by_the_rule_and_record_the_sampling_normaliser(rules, tiny_recommender):
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

    from megatron_onereason.generation.vllm_logits_processor import ItemicLogitsProcessor, ItemicLogitsProcessorV2

    vocab, width, constraint, reqs = rules
    num_valid = vocab.max_id + 1  # ids past it are padding rows of the model
    logits = torch.randn(len(reqs), width, generator=torch.Generator().manual_seed(0)) * 3
    want_logits, want_norms = _expected(logits, reqs, constraint, num_valid, width)

    # V1: requests join the persistent batch at rows 0..B-1 (one unrelated request sits in between, untouched)
    v1 = ItemicLogitsProcessor(None, torch.device("cpu"), False)
    added = [(b + (b >= 2), _params(r, t, tiny_recommender, num_valid, f"v1-{b}"), p, list(o))
             for b, (r, t, p, o) in enumerate(reqs)]
    added.append((2, vllm.SamplingParams(temperature=1.0), [1], []))
    v1.update_state(BatchUpdate(batch_size=len(added), removed=[], added=added, moved=[]))
    batch = torch.zeros(len(added), width)
    batch[[b + (b >= 2) for b in range(len(reqs))]] = logits
    out = v1.apply(batch.clone())
    assert torch.equal(out[2], batch[2])
    norms = pop_normalisers([f"v1-{b}" for b in range(len(reqs))], "v1-")
    _check(out[[b + (b >= 2) for b in range(len(reqs))]],
           [norms[f"v1-{b}"][len(o)] for b, (_, _, _, o) in enumerate(reqs)], want_logits, want_norms)

    # V2: requests in shuffled slots; the runner's token buffer holds prompt + outputs, this step's input token last
    slots = [3, 0, 6, 2, 5]
    length = 16
    all_tokens = torch.zeros(8, length, dtype=torch.int64)
    prompt_len = np.zeros(8, dtype=np.int32)
    v2 = ItemicLogitsProcessorV2(None, SimpleNamespace(all_token_ids=SimpleNamespace(gpu=all_tokens),
                                                       prompt_len=SimpleNamespace(np=prompt_len)))
    pos, inputs = [], []
    for b, ((r, t, p, o), slot) in enumerate(zip(reqs, slots)):
        assert v2.add_request(slot, _params(r, t, tiny_recommender, num_valid, f"v2-{b}"))
        seq = p + o
        all_tokens[slot, :len(seq) - 1] = torch.tensor(seq[:-1])  # the input token is not committed yet
        prompt_len[slot] = len(p)
        pos.append(len(seq) - 1)
        inputs.append(seq[-1])
    assert not v2.add_request(7, vllm.SamplingParams(temperature=1.0))
    order = [4, 1, 0, 3, 2]  # rows arrive in any order
    mapping = torch.tensor([slots[b] for b in order] + [7])
    ctx = LogitsContext(expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=mapping.numpy(),
                        expanded_local_pos=torch.zeros(len(mapping), dtype=torch.long),
                        input_ids=torch.tensor([inputs[b] for b in order] + [1]),
                        pos=torch.tensor([pos[b] for b in order] + [0]),
                        seq_lens_upper_bound_np=np.zeros(len(mapping), dtype=np.int32))
    extra = torch.randn(1, width)
    out = v2.apply(torch.cat([logits[order], extra]), ctx)
    assert torch.equal(out[-1], extra[0])
    norms = pop_normalisers([f"v2-{b}" for b in range(len(reqs))], "v2-")
    inverse = [order.index(b) for b in range(len(reqs))]
    _check(out[inverse], [norms[f"v2-{b}"][len(o)] for b, (_, _, _, o) in enumerate(reqs)], want_logits, want_norms)


def test_behaviour_logprob_is_the_log_of_the_sampling_distribution():
    z = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[[3, 8, 20, 41]] = True
    for temperature in (0.0, 0.5, 1.7):
        t = temperature or 1.0
        c = float(torch.logsumexp(z[allowed] / t, 0) - torch.logsumexp(z, 0) / t)
        raw = torch.log_softmax(z, 0)
        sampling = torch.log_softmax(z.masked_fill(~allowed, float("-inf")) / t, 0)
        for token in (3, 20, 41):
            assert math.isclose(behaviour_logprob(float(raw[token]), temperature, c), float(sampling[token]),
                                abs_tol=1e-12)
    assert behaviour_logprob(-3.2, 0.7, None) == 0.0  # a forced step
