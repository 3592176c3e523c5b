"""Weights for an inference engine, named the Hugging Face way, from megatron-named (or HF-named) full tensors.

The RL engine syncs the policy into the generation backend after each step with TP-gathered megatron tensors
(``decoder.layers.3.self_attention.linear_qkv.weight``, ``embedding.word_embeddings.weight`` with padded vocab
rows, ...). The per-layer layouts (QKV de-interleave, fc1 split, local-spec norm names) come from
:func:`megatron_onereason.checkpoint.hf_mapping.mcore_tensor_to_hf`, the converter's mapping; HF names pass
through unchanged.
"""
from __future__ import annotations

from typing import Iterable, Iterator, List, Tuple

import torch

from megatron_onereason.checkpoint.hf_mapping import (
    EMBEDDING,
    FINAL_NORM,
    HF_NAME_OF_TOP_KEY,
    LAYER_PREFIX,
    OUTPUT_LAYER,
    expected_hf_shapes,
    hf_layer_name,
    mcore_tensor_to_hf,
)
from megatron_onereason.model.qwen3_config import Qwen3Config

_WRAPPER_PREFIX = "module."  # DDP / Float16Module wrappers of a gathered megatron state dict
# HF tensors an inference engine stores as one fused parameter (vLLM: qkv_proj, gate_up_proj): loaded together.
FUSED_GROUPS = (("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                ("mlp.gate_proj.weight", "mlp.up_proj.weight"))


def hf_named_tensors(named_tensors: Iterable[Tuple[str, torch.Tensor]],
                     cfg: Qwen3Config) -> Iterator[Tuple[str, str, torch.Tensor]]:
    """``(source_name, hf_name, tensor)`` per HF tensor; padded vocab rows are cut to ``cfg.vocab_size``.

    Accepts megatron checkpoint or module names (local or TE spec; ``module.`` prefixes stripped; TE
    ``_extra_state`` entries skipped) and HF names. Unknown names raise ``KeyError`` naming the tensor.
    """
    for name, tensor in named_tensors:
        mc_name = name
        while mc_name.startswith(_WRAPPER_PREFIX):
            mc_name = mc_name[len(_WRAPPER_PREFIX):]
        if mc_name.endswith("_extra_state"):
            continue
        if mc_name.startswith(("model.", "lm_head.")):
            yield name, mc_name, tensor
        elif mc_name in (EMBEDDING, OUTPUT_LAYER):
            if mc_name == OUTPUT_LAYER and cfg.tie_word_embeddings:
                raise KeyError(f"{name}: the model ties its embeddings, so it has no separate output layer")
            if tensor.shape[0] < cfg.vocab_size:
                raise ValueError(f"{name}: {tensor.shape[0]} rows, fewer than the vocabulary's {cfg.vocab_size}")
            yield name, HF_NAME_OF_TOP_KEY[mc_name], tensor[: cfg.vocab_size]
        elif mc_name == FINAL_NORM:
            yield name, HF_NAME_OF_TOP_KEY[FINAL_NORM], tensor
        elif mc_name.startswith(LAYER_PREFIX):
            layer_str, _, suffix = mc_name[len(LAYER_PREFIX):].partition(".")
            if not layer_str.isdigit() or not 0 <= int(layer_str) < cfg.num_layers:
                raise KeyError(f"{name}: expected {LAYER_PREFIX}<layer in [0, {cfg.num_layers})>.<tensor>")
            try:
                hf_tensors = mcore_tensor_to_hf(suffix, tensor, int(layer_str), cfg)
            except KeyError as e:
                raise KeyError(f"{name}: {e.args[0]}") from None
            for hf_name, hf_tensor in hf_tensors.items():
                yield name, hf_name, hf_tensor
        else:
            raise KeyError(f"{name}: not a megatron or HF Qwen3 weight name")


def checked_hf_tensors(named_tensors: Iterable[Tuple[str, torch.Tensor]],
                       cfg: Qwen3Config) -> Iterator[Tuple[str, str, torch.Tensor]]:
    """:func:`hf_named_tensors`, each checked against the model's HF names and shapes (``expected_hf_shapes``).

    A name the model does not have raises ``KeyError``, a wrong shape ``ValueError``; both name the source tensor.
    """
    shapes = expected_hf_shapes(cfg)
    for source, hf_name, tensor in hf_named_tensors(named_tensors, cfg):
        shape = shapes.get(hf_name)
        if shape is None:
            raise KeyError(f"{source}: the model has no parameter {hf_name}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{source}: shape {tuple(tensor.shape)}, the model's {hf_name} is {shape}")
        yield source, hf_name, tensor


def incomplete_fused_groups(hf_names: Iterable[str], num_layers: int) -> List[str]:
    """Fused groups (:data:`FUSED_GROUPS`) of which ``hf_names`` holds some members but not all, one line each."""
    present = set(hf_names)
    problems = []
    for layer in range(num_layers):
        for group in FUSED_GROUPS:
            names = [hf_layer_name(layer, n) for n in group]
            missing = [n for n in names if n not in present]
            if 0 < len(missing) < len(names):
                problems.append(f"layer {layer}: {', '.join(missing)} missing beside the rest of its fused group")
    return problems
