"""Model FLOPs of a training step and MFU, by one documented formula.

Per token and layer, the forward pass costs ``2·h·(n_q·d + 2·n_kv·d)`` (QKV) + ``2·n_q·d·h`` (output projection)
+ ``6·h·f`` (SwiGLU gate, up, down) multiply-adds×2, and the output layer ``2·h·V``. Causal attention over a
document of length L costs ``2·L²·n_q·d`` per layer (QKᵀ and AV, each ``2·L²·d`` per head, halved by the causal
mask); packed documents never attend across each other, so packs are charged by their documents' lengths, not
by the pack length. Training is 3× the forward (backward = 2×), 4× with full activation recomputation. This is
the "model FLOPs" of MFU: work done only because of recomputation does not count as useful.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from megatron_onereason.model.qwen3_config import Qwen3Config

H100_BF16_DENSE_TFLOPS = 989.0


def forward_flops(cfg: Qwen3Config, doc_lengths: Iterable[int], vocab_rows: Optional[int] = None) -> float:
    """Forward FLOPs of one packed sequence whose documents have ``doc_lengths`` tokens."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_query_groups
    lengths = [int(n) for n in doc_lengths]
    tokens = sum(lengths)
    dense_per_token = cfg.num_layers * (2 * h * (nq * d + 2 * nkv * d) + 2 * nq * d * h + 6 * h * f)
    attention = cfg.num_layers * sum(2 * n * n * nq * d for n in lengths)
    logits = 2 * h * (vocab_rows or cfg.vocab_size) * tokens
    return float(tokens * dense_per_token + attention + logits)


def training_flops(cfg: Qwen3Config, doc_lengths: Iterable[int], vocab_rows: Optional[int] = None) -> float:
    return 3.0 * forward_flops(cfg, doc_lengths, vocab_rows)


def default_peak_tflops() -> Optional[float]:
    """bf16 dense peak of the local accelerator when known (H100/H200); None on CPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return H100_BF16_DENSE_TFLOPS if ("H100" in name or "H200" in name) else None
