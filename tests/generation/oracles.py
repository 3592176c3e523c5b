"""Independent oracles shared by the generation tests: the catalog rows, teacher-forced log-probs of one full
forward per sequence (no KV cache, no padding), and the full check of a two-stage rollout against them.

Both backends must pass :func:`assert_rollouts_exact` with the transformers model as the oracle.
"""
import torch

from megatron_onereason.checkpoint.hf_mapping import fuse_fc1, hf_layer_to_mcore


def user_prompts(tokenizer):
    """Two rendered chat prompts per mode (``{thinking: [Prompt, ...]}``): one forcing the video domain, one letting
    the model choose."""
    from megatron_onereason.generation.params import Prompt
    from megatron_onereason.generation.prompts import chat_prompt_ids

    texts = (("I watched three cooking videos and a travel vlog yesterday. Recommend the next video for me.",
              "video"),
             ("Here is my recent history of purchases and views. What would I like to see or buy next?", None))
    return {thinking: [Prompt(chat_prompt_ids(tokenizer, [{"role": "user", "content": text}], thinking), domain)
                       for text, domain in texts] for thinking in (True, False)}


def legal_items(catalog, scheme, domain=None):
    """(begin key, codes) of the catalog items a (forced) domain allows: its own items, or all of them when the
    scheme's begin token is shared."""
    return {(scheme.begin_key(d), tuple(int(c) for c in codes)) for d, codes in zip(catalog.domains, catalog.codes)
            if domain is None or scheme.begin_key(d) == scheme.begin_key(domain)}


def oracle_logp(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, from one forward pass over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1), logits


def allowed_item_ids(vocab, catalog, key, forced_domain, prefix_tokens):
    """Token ids allowed at item step len(prefix_tokens), straight from the catalog rows (``key``: the begin key)."""
    if not prefix_tokens:
        if forced_domain is not None:
            return [vocab.begin_id(forced_domain)]
        return sorted({vocab.begin_id(d) for d in catalog.domains})
    codes = [vocab.token(t).code for t in prefix_tokens[1:]]
    level = len(codes)
    if level == vocab.levels:
        return [vocab.item_end_id(key)]
    return sorted({vocab.code_id(level, c[level]) for k, c in legal_items(catalog, vocab.scheme)
                   if k == key and list(c[:level]) == codes})


def assert_rollouts_exact(outputs, prompts, params, model, vocab, chat, catalog, num_valid, atol=2e-4):
    """Shape (N traces x K items), forced tokens, legality, and both log-probs of every token against the oracle:
    ``model_logprobs`` = the raw model, ``logprobs`` = the masked distribution at the sampling temperature (items:
    allowed set from the catalog rows; reasoning: valid non-stop tokens, no begin token of an empty domain).
    Returns how many reasoning tokens were checked."""
    sep = list(chat.answer_separator_ids)
    n, k = params.num_traces, params.num_items
    dead = [vocab.begin_id(d) for d in vocab.domains if d not in set(catalog.domains)]
    checked_reasoning = 0
    assert len(outputs) == len(prompts)
    for prompt, out in zip(prompts, outputs):
        assert out.prompt == prompt
        assert len(out.traces) == n and all(len(t.completions) == k for t in out.traces)
        for trace in out.traces:
            size = len(trace.token_ids)
            assert len(trace.logprobs) == len(trace.model_logprobs) == len(trace.sampled) == size
            if params.thinking:
                assert trace.token_ids[-len(sep) - 1:] == [chat.think_end_id] + sep
                assert sum(trace.sampled) <= params.max_think_tokens
                # forced: the separator always, and </think> when the model did not write it within the budget
                assert trace.sampled[-len(sep):] == [False] * len(sep)
                assert trace.sampled[-len(sep) - 1] == trace.closed_by_model
                assert all(trace.sampled[:-len(sep) - 1])
            else:
                assert size == 0
            assert not set(chat.stop_ids) & set(trace.token_ids)
            assert all(lp == 0.0 for lp, s in zip(trace.logprobs, trace.sampled) if not s)
            for completion in trace.completions:
                assert (completion.domain, completion.codes) in legal_items(catalog, vocab.scheme, prompt.domain)
                assert completion.token_ids == vocab.item_ids(completion.domain, completion.codes)
                seq = list(prompt.token_ids) + trace.token_ids + completion.token_ids
                logp, logits = oracle_logp(model, seq)
                start = len(prompt.token_ids)
                positions = torch.arange(start - 1, len(seq) - 1)
                expect = logp[positions, torch.tensor(seq[start:])]
                got = torch.tensor(trace.model_logprobs + completion.model_logprobs, dtype=torch.float64)
                torch.testing.assert_close(got, expect, atol=atol, rtol=0)
                scale = params.item_temperature if params.item_temperature > 0 else 1.0
                for step, token in enumerate(completion.token_ids):
                    pos = len(seq) - len(completion.token_ids) - 1 + step
                    allowed = allowed_item_ids(vocab, catalog, completion.domain, prompt.domain,
                                               completion.token_ids[:step])
                    want = torch.log_softmax(logits[pos, allowed] / scale, -1)[allowed.index(token)]
                    assert abs(completion.logprobs[step] - float(want)) <= atol, (step, completion.logprobs)
                scale = params.temperature if params.temperature > 0 else 1.0
                for i, token in enumerate(trace.token_ids):
                    recent = (list(prompt.token_ids) + trace.token_ids[:i])[-vocab.levels - 1:]
                    if not trace.sampled[i] or any(vocab.is_itemic(t) for t in recent):
                        continue
                    ok = torch.ones(logits.shape[1], dtype=torch.bool)
                    ok[num_valid:] = False
                    ok[list(chat.stop_ids) + dead + list(vocab.end_ids.values())] = False
                    want = torch.log_softmax((logits[start - 1 + i] / scale).masked_fill(~ok, float("-inf")), -1)
                    assert abs(trace.logprobs[i] - float(want[token])) <= atol
                    checked_reasoning += 1
        assert out.generated_tokens == sum(len(t.token_ids) + k * vocab.scheme.item_length for t in out.traces)
    return checked_reasoning


def megatron_named(model, cfg, padded_vocab):
    """A HF model's weights as a TP-gathered megatron state dict (local-spec names, padded vocab, DDP prefix)."""
    state = model.state_dict()
    embedding = state["model.embed_tokens.weight"]
    padding = torch.randn(padded_vocab - embedding.shape[0], embedding.shape[1])
    yield "module.embedding.word_embeddings.weight", torch.cat([embedding, padding])
    yield "decoder.final_layernorm.weight", state["model.norm.weight"]
    aliases = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
               "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
    for layer in range(cfg.num_layers):
        for suffix, tensor in hf_layer_to_mcore(state.__getitem__, layer, cfg).items():
            name = aliases.get(suffix, suffix)
            yield f"decoder.layers.{layer}.{name}", fuse_fc1(tensor) if isinstance(tensor, tuple) else tensor
        yield f"decoder.layers.{layer}.self_attention.core_attention._extra_state", torch.zeros(0)
