"""Packs onto the device and forward passes through megatron-core's pipeline schedules (evaluation, conversion checks).

The training step must never wait for the GPU: :func:`pack_to_device` copies a (pinned) pack without blocking and
builds its ``packed_seq_params`` from the host copy of ``cu_seqlens``, so nothing is read back from the device.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megatron_onereason.model.pack_layout import PackLayout
from megatron_onereason.model.packed_attention import pack_params


def pack_to_device(pack: Dict, device: torch.device) -> Dict:
    """A pack (an item of :class:`~megatron_onereason.data.packed_dataset.PackedDataset`, on the host) with its
    tensors on ``device`` and its ``packed_seq_params`` (built from the host ``cu_seqlens``). Nothing is read back
    from the device, and the copies do not block: from pinned memory (the training loader pins on CUDA) they
    overlap the previous micro-batch's kernels."""
    from megatron_onereason.model.packed_attention import document_params

    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in pack.items()}
    out["packed_seq_params"] = document_params(pack["cu_seqlens"], device)
    return out


def forward_logits(
    model_chunks: List[torch.nn.Module],
    tokens: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    labels: Optional[torch.Tensor] = None,
    layout: Optional[PackLayout] = None,
) -> Optional[torch.Tensor]:
    """Logits ``[B, S, V]`` (gathered over TP, cut to ``vocab_size``) on the last pipeline stage; None elsewhere.

    With ``labels`` ``[B, S]``: megatron's per-token cross-entropy ``[B, S]`` (vocab-parallel) instead of logits.

    ``cu_seqlens`` (host-side) marks packed documents (``B`` must be 1): each attends only within itself and its
    positions restart at 0. ``layout`` gives any pack structure instead (documents or RL trees, see
    :mod:`megatron_onereason.model.pack_layout`). Every rank of the model-parallel group calls this with the same
    ``tokens``.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if cu_seqlens is not None:
        if layout is not None:
            raise ValueError("give cu_seqlens or layout, not both")
        layout = PackLayout.from_cu_seqlens(cu_seqlens)
    if layout is not None and tokens.size(0) != 1:
        raise ValueError(f"packed forward takes one pack per call, got batch {tokens.size(0)}")
    batch, seq = tokens.shape
    position_ids = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, -1)
    psp = pack_params(layout, tokens.device) if layout is not None else None

    def forward_step(data_iterator, model):
        toks = next(data_iterator)
        # The loss is vocab-parallel: gather the logits over TP only when they are what is returned.
        out = model(toks, position_ids, None, labels=labels, packed_seq_params=psp,
                    runtime_gather_output=labels is None)
        return out, lambda output, non_loss_data=True: output

    for chunk in model_chunks:
        chunk.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter([tokens]) for _ in model_chunks] if len(model_chunks) > 1 else iter([tokens]),
            model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=batch,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    result = outputs[0]
    return result[..., :vocab_size] if vocab_size is not None and labels is None else result
