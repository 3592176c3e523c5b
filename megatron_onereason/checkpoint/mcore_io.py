"""megatron-core ``dist_checkpointing`` (``torch_dist``) checkpoints of Qwen3.

Layout of a checkpoint directory (Megatron-LM's, plus two files of ours)::

    CKPT/latest_checkpointed_iteration.txt   "release" or the iteration number
    CKPT/release/ | CKPT/iter_0000100/       the torch_dist checkpoint (metadata.json, *.distcp, common.pt)
    CKPT/onereason_model.json                Qwen3Config + padded vocab size
    CKPT/hf/                                 HF config.json and tokenizer files carried along for export

``torch_dist`` stores *global* tensors (the layout does not depend on TP/PP), so one process can write a
checkpoint from full tensors and any TP/PP can load it, as long as TP divides the stored padded vocab size.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from megatron_onereason.checkpoint.hf_mapping import (
    EMBEDDING,
    FC1,
    FINAL_NORM,
    LAYER_PREFIX,
    OUTPUT_LAYER,
    LayerTensor,
    expected_layer_shapes,
)
from megatron_onereason.checkpoint.integrity import check_directory
from megatron_onereason.model.qwen3_config import Qwen3Config

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_JSON = "onereason_model.json"
HF_ASSETS = "hf"
RELEASE = "release"


@dataclass(frozen=True)
class CheckpointModelInfo:
    config: Qwen3Config
    padded_vocab_size: int

    def save(self, ckpt_root: str) -> None:
        with open(os.path.join(ckpt_root, MODEL_JSON), "w") as f:
            json.dump({"qwen3": self.config.to_dict(), "padded_vocab_size": self.padded_vocab_size}, f, indent=2)

    @classmethod
    def load(cls, ckpt_root: str) -> "CheckpointModelInfo":
        path = os.path.join(ckpt_root, MODEL_JSON)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: not a megatron_onereason checkpoint (no {MODEL_JSON})")
        try:
            with open(path) as f:
                d = json.load(f)
            return cls(Qwen3Config.from_dict(d["qwen3"]), int(d["padded_vocab_size"]))
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{path}: damaged ({what}); it is written with the checkpoint: copy it from the "
                             "checkpoint's source, or convert again") from None


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def saved_iterations(ckpt_root: str) -> List[int]:
    """Iterations with an ``iter_XXXXXXX`` directory under ``ckpt_root``, ascending (complete or not)."""
    if not os.path.isdir(ckpt_root):
        return []
    return sorted(int(n[5:]) for n in os.listdir(ckpt_root)
                  if re.fullmatch(r"iter_\d{7}", n) and os.path.isdir(os.path.join(ckpt_root, n)))


def tracker_value(ckpt_root: str) -> Optional[str]:
    """What ``latest_checkpointed_iteration.txt`` says (``"release"`` or an iteration number), None if absent."""
    tracker = os.path.join(ckpt_root, TRACKER_FILE)
    if not os.path.exists(tracker):
        return None
    with open(tracker) as f:
        value = f.read().strip()
    if value != RELEASE and not value.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number or 'release', found {value!r}")
    return value


def committed_iteration(ckpt_root: str) -> Optional[int]:
    """The iteration the tracker names (None: none yet, or a converted ``release`` checkpoint)."""
    value = tracker_value(ckpt_root)
    return None if value is None or value == RELEASE else int(value)


def checkpoint_iteration_dir(ckpt_root: str, iteration: Optional[int] = None) -> str:
    """The directory the tracker file points at (``release`` or ``iter_XXXXXXX``), or that of ``iteration``."""
    if iteration is not None:
        path = os.path.join(ckpt_root, iteration_dir_name(iteration))
        if not os.path.isdir(path):
            saved = saved_iterations(ckpt_root) or "none"
            raise FileNotFoundError(f"{path}: no such iteration; saved iterations: {saved}")
        return path
    value = tracker_value(ckpt_root)
    if value is None:
        raise FileNotFoundError(f"{os.path.join(ckpt_root, TRACKER_FILE)}: missing; {ckpt_root} is not a complete "
                                "megatron checkpoint")
    path = os.path.join(ckpt_root, RELEASE if value == RELEASE else iteration_dir_name(int(value)))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: named by {os.path.join(ckpt_root, TRACKER_FILE)} but missing")
    return path


def _layer_key(suffix: str) -> str:
    return LAYER_PREFIX + suffix


def _sharded(key: str, tensor: torch.Tensor, layer: Optional[int], num_layers: int, extra_offsets=()):
    from megatron.core.dist_checkpointing import ShardedTensor

    if layer is None:
        return ShardedTensor.from_rank_offsets(key, tensor, *extra_offsets, replica_id=0)
    return ShardedTensor.from_rank_offsets(key, tensor, (0, layer, num_layers), *extra_offsets, replica_id=0,
                                           prepend_axis_num=1)


def pad_vocab_rows(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    if weight.shape[0] == padded_rows:
        return weight
    pad = weight.new_zeros((padded_rows - weight.shape[0],) + tuple(weight.shape[1:]))
    return torch.cat([weight, pad], dim=0)


def global_sharded_state_dict(
    cfg: Qwen3Config,
    padded_vocab: int,
    embedding: torch.Tensor,
    final_norm: torch.Tensor,
    output_layer: Optional[torch.Tensor],
    layers: Iterator[Tuple[int, Dict[str, LayerTensor]]],
) -> Dict[str, object]:
    """A sharded state dict of full tensors that megatron-core's ``GPTModel`` loads at any TP/PP.

    The SwiGLU ``FC1`` pair is written as two shards of one key (gate rows first), exactly as megatron's
    SwiGLU factory does, so nothing is concatenated in memory.
    """
    sd = {
        EMBEDDING: _sharded(EMBEDDING, pad_vocab_rows(embedding, padded_vocab), None, cfg.num_layers),
        FINAL_NORM: _sharded(FINAL_NORM, final_norm, None, cfg.num_layers),
    }
    if output_layer is not None:
        sd[OUTPUT_LAYER] = _sharded(OUTPUT_LAYER, pad_vocab_rows(output_layer, padded_vocab), None, cfg.num_layers)
    for layer, tensors in layers:
        for suffix, t in tensors.items():
            key = _layer_key(suffix)
            if suffix == FC1:
                gate, up = t
                sd[f"{key}.{layer}.gate"] = _sharded(key, gate, layer, cfg.num_layers, [(1, 0, 2)])
                sd[f"{key}.{layer}.up"] = _sharded(key, up, layer, cfg.num_layers, [(1, 1, 2)])
            else:
                sd[f"{key}.{layer}"] = _sharded(key, t, layer, cfg.num_layers)
    return sd


def checkpoint_tensor_shapes(iter_dir: str) -> Dict[str, Tuple[int, ...]]:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(iter_dir)
    return {k: tuple(v.global_shape) for k, v in meta.items()}


def validate_checkpoint(iter_dir: str, info: CheckpointModelInfo) -> Dict[str, Tuple[int, ...]]:
    """Check every tensor the config needs is in the checkpoint with the right global shape."""
    cfg = info.config
    found = checkpoint_tensor_shapes(iter_dir)
    expected = {_layer_key(s): (cfg.num_layers,) + shape for s, shape in expected_layer_shapes(cfg).items()}
    expected[EMBEDDING] = (info.padded_vocab_size, cfg.hidden_size)
    expected[FINAL_NORM] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        expected[OUTPUT_LAYER] = (info.padded_vocab_size, cfg.hidden_size)
    for key, shape in expected.items():
        if key not in found:
            raise ValueError(f"{iter_dir}: tensor {key} missing from the checkpoint (config {MODEL_JSON} needs it)")
        if found[key] != shape:
            raise ValueError(
                f"{iter_dir}: tensor {key} has global shape {found[key]}, but {MODEL_JSON} implies {shape}"
            )
    return found


def _load_full(iter_dir: str, key: str, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """One checkpoint key as a full tensor (all layers of a stacked per-layer key)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load({key: _sharded(key, torch.empty(shape, dtype=dtype), None, 0)}, iter_dir)[key]


def checkpoint_key_shapes(iter_dir: str, info: CheckpointModelInfo) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Model tensor keys in export order, with global shapes (vocab rows cut to the true vocab) and dtypes."""
    from megatron.core import dist_checkpointing

    cfg = info.config
    validate_checkpoint(iter_dir, info)
    meta = dist_checkpointing.load_tensors_metadata(iter_dir)
    keys = [EMBEDDING, FINAL_NORM] + ([] if cfg.tie_word_embeddings else [OUTPUT_LAYER])
    keys += [_layer_key(s) for s in expected_layer_shapes(cfg)]
    out = {}
    for key in keys:
        shape = tuple(meta[key].global_shape)
        if key in (EMBEDDING, OUTPUT_LAYER):
            shape = (cfg.vocab_size,) + shape[1:]
        out[key] = (shape, meta[key].dtype)
    return out


def iter_checkpoint_tensors(iter_dir: str, info: CheckpointModelInfo):
    """Yield ``(key, tensor)`` for every model tensor of the checkpoint, one key in memory at a time.

    Keys are checkpoint keys; per-layer keys come as the full ``[num_layers, ...]`` stack (a single process
    cannot read a subset of one key's shards through ``torch_dist``). Vocab rows are cut to the true vocab.
    """
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(iter_dir)
    for key, (shape, dtype) in checkpoint_key_shapes(iter_dir, info).items():
        tensor = _load_full(iter_dir, key, tuple(meta[key].global_shape), dtype)
        yield key, tensor[: shape[0]] if key in (EMBEDDING, OUTPUT_LAYER) else tensor


def load_into_model(model_chunks: List[torch.nn.Module], ckpt_root: str, strict: bool = True,
                    iteration: Optional[int] = None) -> str:
    """Load a checkpoint's model weights into this rank's model chunks (any TP/PP); returns the iteration dir.

    The files are checked against their checksums first. Missing ``_extra_state`` entries are tolerated (a
    converted checkpoint has none); any other missing tensor, and any shape mismatch, is an error naming the tensor.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    iter_dir = checkpoint_iteration_dir(ckpt_root, iteration)
    check_directory(iter_dir)
    info = CheckpointModelInfo.load(ckpt_root)
    found = validate_checkpoint(iter_dir, info)
    if len(model_chunks) == 1:
        sharded = {"model": model_chunks[0].sharded_state_dict()}
    else:
        sharded = {f"model{i}": m.sharded_state_dict() for i, m in enumerate(model_chunks)}
    _check_model_matches(sharded, found, iter_dir)
    # megatron's naming: "unexpected" = requested but absent from the checkpoint ("missing" = the reverse, e.g.
    # the optimizer state of a training checkpoint loaded for its weights only).
    loaded, _in_checkpoint_only, absent = dist_checkpointing.load(sharded, iter_dir, strict=StrictHandling.RETURN_ALL)
    hard_missing = sorted(k for k in absent if not k.endswith("_extra_state"))
    if hard_missing:
        raise ValueError(f"{iter_dir}: checkpoint lacks {len(hard_missing)} tensors the model needs, e.g. "
                         f"{hard_missing[:3]}")
    for i, chunk in enumerate(model_chunks):
        state = loaded["model" if len(model_chunks) == 1 else f"model{i}"]
        result = chunk.load_state_dict(state, strict=False)
        bad = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if strict and (bad or result.unexpected_keys):
            raise ValueError(f"{iter_dir}: model chunk {i} state mismatch: missing {bad[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")
    return iter_dir


def _check_model_matches(sharded: Dict, found: Dict[str, Tuple[int, ...]], iter_dir: str) -> None:
    """Compare the model's global shapes with the checkpoint's before loading, for a readable error."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor) and value.key in found and tuple(value.global_shape) != found[value.key]:
            raise ValueError(
                f"{iter_dir}: tensor {value.key} has global shape {found[value.key]} in the checkpoint, the model "
                f"built from its config wants {tuple(value.global_shape)} (wrong TP padding or config?)"
            )


def build_model_from_checkpoint(ckpt_root: str, tensor_model_parallel_size: int = 1,
                                pipeline_model_parallel_size: int = 1, layer_spec: str = "auto",
                                iteration: Optional[int] = None, **build_kwargs):
    """This rank's Qwen3 model built from a checkpoint's config and loaded with its weights (parallel state must
    already be initialised with the same TP/PP). Returns ``(model, CheckpointModelInfo)``."""
    from megatron_onereason.model.builder import ModelBuildConfig, build_qwen3_model
    from megatron_onereason.platform import device

    info = CheckpointModelInfo.load(ckpt_root)
    build = ModelBuildConfig(tensor_model_parallel_size=tensor_model_parallel_size,
                             pipeline_model_parallel_size=pipeline_model_parallel_size,
                             padded_vocab_size=info.padded_vocab_size, layer_spec=layer_spec, **build_kwargs)
    model = build_qwen3_model(info.config, build).to(device())
    load_into_model([model], ckpt_root, iteration=iteration)
    return model, info
