"""HF safetensors ⇄ megatron-core ``torch_dist`` conversion of Qwen3, streaming tensor by tensor."""
from __future__ import annotations

import json
import logging
import os
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
from megatron_onereason.checkpoint.integrity import SAVED_WITH_CHECKSUMS, check_directory, write_manifest
from megatron_onereason.cli import raise_on_sigterm, run_cli
from megatron_onereason.fileio import atomic_directory, is_no_space, no_space_message
from megatron_onereason.metrics_log import RateLog
from megatron_onereason.model.builder import ModelBuildConfig, check_parallel_layout
from megatron_onereason.model.qwen3_config import Qwen3Config, padded_vocab_size

log = logging.getLogger(__name__)


def _ensure_process_group() -> None:
    """dist_checkpointing needs a process group; a converter run alone gets a single-process one."""
    from megatron_onereason.platform import initialize_distributed

    initialize_distributed()


def finite(name: str, tensor: torch.Tensor, where: str) -> torch.Tensor:
    """``tensor``, after checking it holds no NaN/inf (a diverged model must not be converted silently)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{where}: tensor {name} has {bad} non-finite (NaN/inf) values of {tensor.numel()}; the "
                         "model diverged or the file is damaged (export an earlier iteration with --iteration N)")
    return tensor


def _check_tokenizer_fits(hf_dir: str, vocab_size: int, require_tokenizer: bool) -> None:
    """Refuse a model with fewer embedding rows than its tokenizer has ids (those tokens would index past the
    table), and one without tokenizer files unless ``require_tokenizer`` is false (then said once)."""
    from megatron_onereason.tokenizer.fingerprint import tokenizer_fingerprint

    try:
        fingerprint = tokenizer_fingerprint(hf_dir)
    except FileNotFoundError:
        if require_tokenizer:
            raise FileNotFoundError(f"{hf_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json): the "
                                    "checkpoint and its HF export would have none and its data could not be checked "
                                    "against it. Copy the tokenizer in, or pass --no-tokenizer") from None
        log.warning("%s has no tokenizer files: the checkpoint and its HF export will have none", hf_dir)
        return
    if fingerprint["max_id"] >= vocab_size:
        raise ValueError(f"{hf_dir}: config.json vocab_size={vocab_size}, but its tokenizer has ids up to "
                         f"{fingerprint['max_id']}: those tokens have no embedding row. Resize the embeddings to the "
                         "tokenizer (tools/extend_vocab.py does it when adding itemic tokens) or use the tokenizer "
                         "the model was trained with")


def convert_hf_to_mcore(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, overwrite: bool = False,
                        make_vocab_size_divisible_by: int = 128,
                        require_tokenizer: bool = False) -> CheckpointModelInfo:
    """Write ``out_dir`` as a megatron checkpoint of the HF model in ``hf_dir``.

    ``tp`` fixes the vocab padding (a multiple of ``128 × tp``) and is validated against the heads, like ``pp``
    against the layers; the stored tensors are global, so the checkpoint loads at any TP dividing the padded
    vocab and any PP dividing the layers. Every tensor is checked to be finite; the files get checksums. A tokenizer
    with ids past ``vocab_size`` is refused; none at all only with ``require_tokenizer`` (the CLI's default).
    """
    from megatron.core import dist_checkpointing

    cfg = Qwen3Config.from_hf_dir(hf_dir)
    _check_tokenizer_fits(hf_dir, cfg.vocab_size, require_tokenizer)
    check_parallel_layout(cfg, ModelBuildConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    reader = HFCheckpointReader(hf_dir)
    reader.check_against(expected_hf_shapes(cfg))
    padded = padded_vocab_size(cfg.vocab_size, tp, make_vocab_size_divisible_by)
    info = CheckpointModelInfo(cfg, padded)
    _ensure_process_group()
    start = time.time()
    progress = RateLog(log, "hf_to_mcore: layers read", cfg.num_layers, unit="layers")

    def get(name: str) -> torch.Tensor:
        return finite(name, reader.get(name), hf_dir)

    def layers():
        for i in range(cfg.num_layers):
            tensors = hf_layer_to_mcore(get, i, cfg)
            progress.update(i + 1)
            yield i, tensors

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        sd = global_sharded_state_dict(
            cfg,
            padded,
            embedding=get("model.embed_tokens.weight"),
            final_norm=get("model.norm.weight"),
            output_layer=None if cfg.tie_word_embeddings else get("lm_head.weight"),
            layers=layers(),
        )
        sd[SAVED_WITH_CHECKSUMS] = True
        iter_dir = os.path.join(tmp, RELEASE)
        os.makedirs(iter_dir)
        log.info("hf_to_mcore: writing %s", out_dir)
        dist_checkpointing.save(sd, iter_dir)
        write_manifest(iter_dir)
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
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, iteration: Optional[int] = None) -> Qwen3Config:
    """Write ``out_dir`` as a HF model directory (sharded safetensors, config.json, tokenizer files).

    Exports the iteration the tracker names, or ``iteration``. The checkpoint's checksums are verified first and
    every tensor is checked to be finite.
    """
    info = CheckpointModelInfo.load(mcore_dir)
    cfg = info.config
    iter_dir = checkpoint_iteration_dir(mcore_dir, iteration)
    _ensure_process_group()
    check_directory(iter_dir)
    assets = os.path.join(mcore_dir, HF_ASSETS)
    template = None
    if os.path.exists(os.path.join(assets, "config.json")):
        with open(os.path.join(assets, "config.json")) as f:
            template = json.load(f)
    key_shapes = checkpoint_key_shapes(iter_dir, info)
    meta_plan = [(name, tuple(t.shape), t.dtype)
                  for key, (shape, dtype) in key_shapes.items()
                  for name, t in hf_tensors_of_key(key, torch.empty(shape, dtype=dtype, device="meta"), cfg)]
    progress = RateLog(log, "mcore_to_hf: checkpoint keys read", len(key_shapes), unit="keys")

    def checked():
        for done, (key, tensor) in enumerate(iter_checkpoint_tensors(iter_dir, info), 1):
            finite(key, tensor, iter_dir)
            progress.update(done)
            yield from hf_tensors_of_key(key, tensor, cfg)

    tensors = checked()
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
                  tolerance: Optional[float] = 1e-4, iteration: Optional[int] = None) -> float:
    """Max |Δ| between HF and megatron (TP1, PP1, fp32, CPU or GPU) logits on random tokens.

    Raises ``AssertionError`` if it exceeds ``tolerance`` or if either side's logits are not finite (NaN is never
    "within tolerance"). Needs memory for both models in fp32.
    """
    import transformers

    from megatron_onereason.checkpoint.mcore_io import build_model_from_checkpoint
    from megatron_onereason.model.forward import forward_logits
    from megatron_onereason.platform import device

    _ensure_process_group()
    model, info = build_model_from_checkpoint(mcore_dir, layer_spec="local", iteration=iteration)
    cfg = info.config
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, num_tokens), generator=generator).to(device())
    mc_logits = forward_logits([model], tokens, vocab_size=cfg.vocab_size).float()
    del model
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device()).eval()
    with torch.no_grad():
        hf_logits = hf(tokens).logits.float()
    for name, logits in ((hf_dir, hf_logits), (mcore_dir, mc_logits)):
        if not bool(torch.isfinite(logits).all()):
            raise AssertionError(f"verify: {name} gives non-finite (NaN/inf) logits; its weights are not usable")
    diff = (mc_logits - hf_logits).abs().max().item()
    log.info("verify: max |logits(HF) - logits(megatron)| = %.3g over %s tokens", diff, tuple(tokens.shape))
    if tolerance is not None and not diff <= tolerance:
        raise AssertionError(f"logits differ by {diff:.3g} > {tolerance} between {hf_dir} and {mcore_dir}")
    return diff


def run_converter_cli(prog: str, out_dir: str, action) -> int:
    """Run ``action()`` for a converter CLI: one-line errors (exit 1), time and peak memory on success.

    SIGTERM and Ctrl-C remove the partial output on the way out; leftovers of killed runs are removed at the next
    start (:func:`megatron_onereason.fileio.atomic_directory`).
    """
    from megatron_onereason.checkpoint.peak_memory import peak_rss_gib

    raise_on_sigterm()
    start = time.time()

    def run():
        try:
            action()
        except OSError as e:
            if is_no_space(e):
                raise OSError(no_space_message(out_dir, "the converted checkpoint")) from None
            raise
        except RuntimeError as e:  # torch's zip writer reports a full disk as "unexpected pos"
            if is_no_space(e):
                raise OSError(no_space_message(out_dir, "the converted checkpoint")) from None
            raise
        print(f"{prog}: wrote {out_dir} in {time.time() - start:.1f}s, peak RSS {peak_rss_gib():.2f} GiB")

    return run_cli(prog, run)
