"""Methods vLLM mixes into each of its workers (``worker_extension_cls``), called through ``LLM.collective_rpc``.

Weight updates use vLLM's layerwise-reload lifecycle (``initialize_layerwise_reload`` → ``model.load_weights`` per
bucket → ``finalize_layerwise_reload``), the one vLLM's own weight-transfer engines use: each layer's post-load
processing runs again once all of its tensors arrived (on CPU that re-packs the linear weights for oneDNN; a plain
``load_weights`` into a loaded model would leave the packed copies stale). A layer must arrive whole within one
update — q/k/v and gate/up are fused parameters (:data:`~megatron_onereason.generation.weights.FUSED_GROUPS`).
vLLM's reload does not re-process a tied ``lm_head`` (it shares the embedding's tensor but keeps its own packed
copy on CPU), so the extension does.

Tensors reach a worker two ways: ``onereason_load_weight_bucket`` (bytes through the RPC: the backend's
``update_weights``, small models and tests) or the weight-sync channels of :mod:`megatron_onereason.generation.weight_sync`
(``onereason_open_weight_channels`` / ``onereason_receive_weights``: a private process group, gloo on CPU, NCCL on
GPU). Names are Hugging Face names. Method names carry a prefix: vLLM refuses extensions that shadow its workers'.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_onereason.generation.vllm_logits_processor import pop_normalisers

EncodedTensor = Tuple[str, str, List[int], bytes]  # (name, dtype name, shape, raw bytes)


def encode_tensors(named: Iterable[Tuple[str, torch.Tensor]]) -> List[EncodedTensor]:
    """Tensors as plain data for vLLM's RPC (its msgpack decoder does not rebuild tensors in untyped arguments)."""
    return [(name, str(t.dtype).removeprefix("torch."), list(t.shape),
             t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()) for name, t in named]


def decode_tensors(encoded: Sequence[EncodedTensor]) -> List[Tuple[str, torch.Tensor]]:
    return [(name, torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape))
            for name, dtype, shape, data in encoded]


class VLLMWorkerExtension:
    """Mixed into vLLM's worker class; ``self`` is the worker (``model_runner``, ``model_config``, ``rank``)."""

    _onereason_loaded: Optional[set] = None

    def onereason_pop_normalisers(self, keys: Sequence[str], prefix: str) -> Dict[str, Dict[int, Optional[float]]]:
        return pop_normalisers(keys, prefix)

    # ------------------------------------------------------------------------------------------ weights
    def onereason_begin_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if self._onereason_loaded is not None:
            raise RuntimeError("a weight update is already in progress on this worker")
        initialize_layerwise_reload(self.model_runner.get_model())
        self._onereason_loaded = set()

    def _onereason_load(self, bucket: Sequence[Tuple[str, torch.Tensor]]) -> None:
        if self._onereason_loaded is None:
            raise RuntimeError("weights arrived outside a weight update (call onereason_begin_weight_update first)")
        # The layerwise loader keeps a layer's tensors until the layer is complete: own them (a sender's bucket
        # buffer is reused for the next bucket).
        self.model_runner.get_model().load_weights(weights=[(n, t.clone()) for n, t in bucket])
        self._onereason_loaded.update(n for n, _ in bucket)

    def onereason_load_weight_bucket(self, encoded: Sequence[EncodedTensor]) -> int:
        self._onereason_load(decode_tensors(encoded))
        return len(encoded)

    def onereason_finish_weight_update(self) -> List[str]:
        """Finish the update; returns the loaded names. Raises when a fused group arrived in part."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        from megatron_onereason.generation.weights import incomplete_fused_groups

        loaded, self._onereason_loaded = self._onereason_loaded, None
        if loaded is None:
            raise RuntimeError("no weight update in progress on this worker")
        model = self.model_runner.get_model()
        finalize_layerwise_reload(model, self.model_config)
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if lm_head is not None and embed is not None and lm_head.weight is embed.weight:
            lm_head.quant_method.process_weights_after_loading(lm_head)  # tied head: its own packed copy (CPU)
        problems = incomplete_fused_groups(loaded, self.model_config.hf_config.num_hidden_layers)
        if problems:
            raise ValueError("weight update left fused parameters half-written (resend whole layers): "
                             + "; ".join(problems))
        return sorted(loaded)

    def onereason_abort_weight_update(self) -> None:
        """After a failed update: put every layer back (the loaded part stays loaded; resend the weights)."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if self._onereason_loaded is not None:
            self._onereason_loaded = None
            finalize_layerwise_reload(self.model_runner.get_model(), self.model_config)

    # ------------------------------------------------------------------------------------------ sync channels
    def onereason_open_weight_channels(self, specs: Sequence[Dict], first_rank: int) -> int:
        """Join the weight-sync channels (``ChannelSpec`` fields as dicts) as ``first_rank + self.rank``."""
        from megatron_onereason.generation.weight_sync import ChannelSpec, join_channel

        rank = first_rank + self.rank
        self._onereason_channels = [join_channel(ChannelSpec(**spec), rank, device=self.device) for spec in specs]
        return rank

    def onereason_receive_weights(self) -> Dict[str, float]:
        """Receive one sync from every channel into the model; returns the ``SyncStats`` fields."""
        from megatron_onereason.generation.weight_sync import receive_weights

        self.onereason_begin_weight_update()
        try:
            stats = receive_weights(self._onereason_channels, self._onereason_load)
        except BaseException:
            self.onereason_abort_weight_update()
            raise
        self.onereason_finish_weight_update()
        return dataclasses.asdict(stats)
