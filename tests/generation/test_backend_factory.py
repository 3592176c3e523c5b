"""make_backend: one factory for every role (rollout, teachers, reference, evaluation), per-role device and dtype."""
import importlib.util

import pytest
import torch

from megatron_onereason.generation.backend import make_backend, resolve_dtype
from megatron_onereason.generation.hf_backend import TransformersBackend


def test_dtype_defaults_to_bf16_on_gpu_and_fp32_on_cpu():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cuda:1") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype 'int8' is not one of"):
        resolve_dtype("int8", "cpu")


def test_make_backend_builds_the_transformers_backend_and_refuses_bad_requests(tiny_recommender):
    backend = make_backend("hf", tiny_recommender.model_dir, tiny_recommender.catalog_dir, device="cpu",
                           dtype="bf16")
    assert isinstance(backend, TransformersBackend) and not backend.supports_sleep
    assert {p.dtype for p in backend.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="backend 'sglang' is not one of"):
        make_backend("sglang", tiny_recommender.model_dir)
    with pytest.raises(ValueError, match="takes no engine arguments"):
        make_backend("hf", tiny_recommender.model_dir, tensor_parallel_size=2)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_a_vllm_device_the_installed_build_cannot_run_is_refused_before_start(tiny_recommender):
    from vllm.platforms import current_platform

    other = "cuda" if current_platform.is_cpu() else "cpu"
    with pytest.raises(ValueError, match=f"device='{other}', but the installed vLLM runs on"):
        make_backend("vllm", tiny_recommender.model_dir, tiny_recommender.catalog_dir, device=other)
