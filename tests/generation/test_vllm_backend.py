"""vLLM backend: a clear error without vLLM; on a GPU machine with vLLM, legal N×K rollouts (skipped otherwise)."""
import importlib.util

import pytest
import torch

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_without_vllm_the_backend_says_what_it_needs(tmp_path):
    from megatron_onereason.generation.vllm_backend import VLLMBackend

    with pytest.raises(ImportError, match=r"vllm >= 0\.11"):
        VLLMBackend(str(tmp_path))


@pytest.mark.skipif(not HAS_VLLM or not torch.cuda.is_available(), reason="needs vLLM and a GPU")
def test_vllm_two_stage_rollouts_are_legal(tmp_path):
    from megatron_onereason.eval.tiny_recommender import build_tiny_recommender
    from megatron_onereason.generation.params import GenerationParams, Prompt
    from megatron_onereason.generation.prompts import chat_prompt_ids
    from megatron_onereason.generation.vllm_backend import VLLMBackend
    from megatron_onereason.tokenizer.item_catalog import ItemCatalog

    tiny = build_tiny_recommender(str(tmp_path / "tiny"))
    backend = VLLMBackend(tiny.model_dir, tiny.catalog_dir, gpu_memory_utilization=0.3, enforce_eager=True)
    catalog = ItemCatalog.load(tiny.catalog_dir)
    legal = {(d, tuple(int(c) for c in codes)) for d, codes in zip(catalog.domains, catalog.codes)}
    prompt = Prompt(chat_prompt_ids(backend.tokenizer, [{"role": "user", "content": "Next video?"}], True), "video")
    out = backend.generate([prompt], GenerationParams(num_traces=2, num_items=4, max_think_tokens=16, seed=0))[0]
    assert len(out.traces) == 2
    for trace in out.traces:
        assert len(trace.completions) == 4
        assert all((c.domain, c.codes) in legal and c.domain == "video" for c in trace.completions)
