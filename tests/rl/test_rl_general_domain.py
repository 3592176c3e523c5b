"""General-domain MOPD (OpenOneRec §5.2): a general prompt is answered in sampled free text — no forced item — and
MOPD trains exactly the sampled tokens, with or without a reasoning trace."""
import pytest
import torch

from megatron_onereason.generation.backend import make_backend
from megatron_onereason.generation.params import GenerationParams
from megatron_onereason.rl.data import PromptRenderer, general_prompts
from megatron_onereason.rl.mopd_step import trained_mask
from megatron_onereason.rl.rollout_batch import rollout_trees


@pytest.fixture(scope="module")
def backend(tiny_recommender):
    return make_backend("hf", tiny_recommender.model_dir, tiny_recommender.catalog_dir, device="cpu")


@pytest.mark.parametrize("thinking", [True, False])
def test_a_general_prompt_trains_its_sampled_free_text_answer(backend, thinking):
    renderer = PromptRenderer(backend.tokenizer, backend.vocab.scheme, thinking, 4096)
    (prompt,) = general_prompts([[{"role": "user", "content": "What is two plus two?"}]], renderer, "general.jsonl")
    assert prompt.task == "general" and prompt.domain is None and not prompt.targets
    params = GenerationParams(thinking=thinking, num_traces=2, num_items=1, answer="text", max_answer_tokens=12,
                              max_think_tokens=3, temperature=1.0, seed=0, constrained=True)
    (output,) = backend.generate([prompt.prompt], params)
    stops = set(backend.chat_tokens.stop_ids)
    for trace, tree in zip(output.traces, rollout_trees([output])):
        (answer,) = trace.completions
        tokens = answer.token_ids
        # Free text: up to an end-of-turn token or the budget, not an item (no begin token forced in front).
        assert 1 <= len(tokens) <= 12 and all(t not in stops for t in tokens[:-1])
        assert len(tokens) == 12 or tokens[-1] in stops
        # Every answer token was sampled (a forced token would have behaviour log-prob 0).
        assert all(lp < 0 for lp in answer.logprobs) and len(answer.logprobs) == len(tokens)
        mask = trained_mask(tree)
        # Trained: every sampled reasoning token (none without thinking) and every answer token.
        expected = torch.tensor(list(trace.sampled) + [True] * len(tokens))
        assert torch.equal(mask, expected)
        assert mask[len(trace.token_ids):].all() and mask.sum() >= len(tokens) > 0
        if not thinking:
            assert not trace.token_ids


def test_a_text_answer_is_one_completion():
    with pytest.raises(ValueError, match="num_items=1"):
        GenerationParams(answer="text", num_items=2)
