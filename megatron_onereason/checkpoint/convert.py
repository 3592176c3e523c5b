"""HF safetensors ⇄ megatron-core ``torch_dist`` conversion of Qwen3, streaming tensor by tensor."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Iterator, Optional, Tuple

import torch

from megatron_onereason.checkpoint.hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    HFCheckpointReader,
    copy_hf_assets,
    write_hf_config,
    write_sharded_safetensors,
)
from megatron_onereason.checkpoint.hf_mapping import (
    HF_NAME_OF_TOP_KEY,
    LAYER_PREFIX,
    expected_hf_shapes,
    hf_layer_to_mcore,
    mcore_tensor_to_hf,
)
from megatron_onereason.checkpoint.mcore_io import (
    HF_ASSETS,
    RELEASE,
    TRACKER_FILE,
    CheckpointModelInfo,
    checkpoint_iteration_dir,
    checkpoint_key_shapes,
    global_sharded_state_dict,
    iter_checkpoint_tensors,
)
from megatron_onereason.fileio import atomic_directory
from megatron_onereason.model.builder import ModelBuildConfig, check_parallel_layout
from megatron_onereason.model.qwen3_config import Qwen3Config, padded_vocab_size

log = logging.getLogger(__name__)


def _ensure_process_group() -> None:
    """dist_checkpointing needs a process group; a converter run alone gets a single-process one."""
    from megatron_onereason.platform import initialize_distributed

    initialize_distributed()


def convert_hf_to_mcore(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, overwrite: bool = False,
                        make_vocab_size_divisible_by: int = 128) -> CheckpointModelInfo:
    """Write ``out_dir`` as a megatron checkpoint of the HF model in ``hf_dir``.

    ``tp`` fixes the vocab padding (a multiple of ``128 × tp``) and is validated against the heads, like ``pp``
    against the layers; the stored tensors are global, so the checkpoint loads at any TP dividing the padded
    vocab and any PP dividing the layers.
    """
    from megatron.core import dist_checkpointing

    cfg = Qwen3Config.from_hf_dir(hf_dir)
    check_parallel_layout(cfg, ModelBuildConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    reader = HFCheckpointReader(hf_dir)
    reader.check_against(expected_hf_shapes(cfg))
    padded = padded_vocab_size(cfg.vocab_size, tp, make_vocab_size_divisible_by)
    info = CheckpointModelInfo(cfg, padded)
    _ensure_process_group()
    start = time.time()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        sd = global_sharded_state_dict(
            cfg,
            padded,
            embedding=reader.get("model.embed_tokens.weight"),
            final_norm=reader.get("model.norm.weight"),
            output_layer=None if cfg.tie_word_embeddings else reader.get("lm_head.weight"),
            layers=((i, hf_layer_to_mcore(reader.get, i, cfg)) for i in range(cfg.num_layers)),
        )
        iter_dir = os.path.join(tmp, RELEASE)
        os.makedirs(iter_dir)
        dist_checkpointing.save(sd, iter_dir)
        info.save(tmp)
        assets = os.path.join(tmp, HF_ASSETS)
        os.makedirs(assets)
        copy_hf_assets(hf_dir, assets, skip=())
        with open(os.path.join(tmp, TRACKER_FILE), "w") as f:  # written last: marks the checkpoint complete
            f.write(RELEASE)
    log.info("converted %s -> %s (%d layers, vocab %d padded to %d) in %.1fs", hf_dir, out_dir, cfg.num_layers,
             cfg.vocab_size, padded, time.time() - start)
    return info


def convert_mcore_to_hf(mcore_dir: str, out_dir: str, overwrite: bool = False,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Qwen3Config:
    """Write ``out_dir`` as a HF model directory (sharded safetensors, config.json, tokenizer files)."""
    info = CheckpointModelInfo.load(mcore_dir)
    cfg = info.config
    iter_dir = checkpoint_iteration_dir(mcore_dir)
    _ensure_process_group()
    assets = os.path.join(mcore_dir, HF_ASSETS)
    template = None
    if os.path.exists(os.path.join(assets, "config.json")):
        with open(os.path.join(assets, "config.json")) as f:
            template = json.load(f)
    meta_plan = [(name, tuple(t.shape), t.dtype)
                  for key, (shape, dtype) in checkpoint_key_shapes(iter_dir, info).items()
                  for name, t in hf_tensors_of_key(key, torch.empty(shape, dtype=dtype, device="meta"), cfg)]
    tensors = (item for key, tensor in iter_checkpoint_tensors(iter_dir, info)
               for item in hf_tensors_of_key(key, tensor, cfg))
    dtype = meta_plan[0][2]
    start = time.time()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_sharded_safetensors(tmp, meta_plan, tensors, max_shard_bytes)
        write_hf_config(tmp, cfg, template, dtype=str(dtype).replace("torch.", ""))
        if os.path.isdir(assets):
            copy_hf_assets(assets, tmp)
    log.info("exported %s -> %s in %.1fs", mcore_dir, out_dir, time.time() - start)
    return cfg


def hf_tensors_of_key(key: str, tensor: torch.Tensor, cfg: Qwen3Config) -> Iterator[Tuple[str, torch.Tensor]]:
    """HF ``(name, tensor)`` pairs of one checkpoint key (a per-layer key holds the ``[layers, ...]`` stack).

    Works on ``meta`` tensors too, which is how the export plans its shards before reading any data.
    """
    if key in HF_NAME_OF_TOP_KEY:
        yield HF_NAME_OF_TOP_KEY[key], tensor
        return
    for layer in range(cfg.num_layers):
        yield from mcore_tensor_to_hf(key[len(LAYER_PREFIX):], tensor[layer], layer, cfg).items()


def verify_logits(hf_dir: str, mcore_dir: str, num_tokens: int = 64, batch: int = 2, seed: int = 0,
                  tolerance: Optional[float] = 1e-4) -> float:
    """Max |Δ| between HF and megatron (TP1, PP1, fp32, CPU or GPU) logits on random tokens.

    Raises ``AssertionError`` if it exceeds ``tolerance``. Needs memory for both models in fp32.
    """
    import transformers

    from megatron_onereason.checkpoint.mcore_io import build_model_from_checkpoint
    from megatron_onereason.model.forward import forward_logits
    from megatron_onereason.platform import device

    _ensure_process_group()
    model, info = build_model_from_checkpoint(mcore_dir, layer_spec="local")
    cfg = info.config
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, num_tokens), generator=generator).to(device())
    mc_logits = forward_logits([model], tokens, vocab_size=cfg.vocab_size).float()
    del model
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device()).eval()
    with torch.no_grad():
        hf_logits = hf(tokens).logits.float()
    diff = (mc_logits - hf_logits).abs().max().item()
    log.info("verify: max |logits(HF) - logits(megatron)| = %.3g over %s tokens", diff, tuple(tokens.shape))
    if tolerance is not None and diff > tolerance:
        raise AssertionError(f"logits differ by {diff:.3g} > {tolerance} between {hf_dir} and {mcore_dir}")
    return diff


def run_converter_cli(prog: str, out_dir: str, action) -> int:
    """Run ``action()`` for a converter CLI: clear one-line errors (exit 1), time and peak memory on success."""
    from megatron_onereason.checkpoint.peak_memory import peak_rss_gib

    start = time.time()
    try:
        action()
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, AssertionError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    print(f"{prog}: wrote {out_dir} in {time.time() - start:.1f}s, peak RSS {peak_rss_gib():.2f} GiB")
    return 0
