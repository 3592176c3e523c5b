"""Fused kernels: each megatron-core fusion is on exactly where its kernel exists, and the result is a valid config."""
import dataclasses

import pytest
import torch

from megatron_onereason.model.builder import (
    KernelSupport,
    ModelBuildConfig,
    detect_kernel_support,
    fused_kernel_flags,
    make_transformer_config,
)
from megatron_onereason.model.qwen3_config import qwen3_preset

NGC = KernelSupport(cuda=True, triton=True, apex_wgrad=True, apex_softmax=True, te_rope=True, te_cross_entropy=True)
PLAIN_CUDA = KernelSupport(cuda=True, triton=True, apex_wgrad=False, apex_softmax=False, te_rope=False,
                           te_cross_entropy=False)
CPU = KernelSupport(cuda=False, triton=True, apex_wgrad=False, apex_softmax=False, te_rope=False,
                    te_cross_entropy=False)
FUSIONS = ("gradient_accumulation_fusion", "bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion",
           "cross_entropy_loss_fusion", "masked_softmax_fusion", "persist_layer_norm", "memory_efficient_layer_norm")


def on(flags):
    return {k for k in FUSIONS if flags[k]}


def test_container_with_te_and_apex_turns_every_applicable_fusion_on():
    flags = fused_kernel_flags(NGC)
    assert on(flags) == set(FUSIONS) - {"persist_layer_norm", "memory_efficient_layer_norm"}  # LayerNorm-only kernels
    assert flags["cross_entropy_fusion_impl"] == "te"


def test_plain_cuda_pytorch_gets_the_torch_compile_fusions_only():
    flags = fused_kernel_flags(PLAIN_CUDA)
    assert on(flags) == {"bias_activation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion"}
    assert flags["cross_entropy_fusion_impl"] == "native"


def test_each_missing_kernel_turns_off_only_its_fusion():
    expected_off = {"apex_wgrad": {"gradient_accumulation_fusion"}, "apex_softmax": {"masked_softmax_fusion"},
                    "te_rope": {"apply_rope_fusion"}}
    for field, off in expected_off.items():
        flags = fused_kernel_flags(dataclasses.replace(NGC, **{field: False}))
        assert on(fused_kernel_flags(NGC)) - on(flags) == off, field
    no_te_ce = fused_kernel_flags(dataclasses.replace(NGC, te_cross_entropy=False))
    assert no_te_ce["cross_entropy_loss_fusion"] and no_te_ce["cross_entropy_fusion_impl"] == "native"


def test_cpu_and_disabled_fusions_are_all_off():
    assert on(fused_kernel_flags(CPU)) == set()
    assert on(fused_kernel_flags(NGC, enabled=False)) == set()
    assert fused_kernel_flags(NGC, enabled=False)["cross_entropy_fusion_impl"] == "native"


def test_this_cpu_machine_builds_an_unfused_config():
    support = detect_kernel_support()
    assert support.cuda is torch.cuda.is_available()
    if support.cuda:
        pytest.skip("CPU-only check")
    config = make_transformer_config(qwen3_preset("tiny"), ModelBuildConfig())
    assert {k for k in FUSIONS if getattr(config, k)} == set()


def test_the_fusion_fields_exist_and_validate_in_the_installed_megatron_core():
    """Every flag is a TransformerConfig field here (0.16.1), and the plain-CUDA combination passes megatron's own
    validation for this architecture (SwiGLU, no bias). RoPE fusion's validation imports TE, absent on CPU."""
    from megatron.core.transformer import TransformerConfig

    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(fused_kernel_flags(NGC)) <= known
    config = make_transformer_config(qwen3_preset("tiny"), ModelBuildConfig(), support=PLAIN_CUDA)
    assert config.bias_activation_fusion and config.bias_dropout_fusion and config.cross_entropy_loss_fusion
    without_rope = dataclasses.replace(NGC, te_rope=False)
    config = make_transformer_config(qwen3_preset("tiny"), ModelBuildConfig(), support=without_rope)
    assert config.gradient_accumulation_fusion and config.cross_entropy_fusion_impl == "te"
