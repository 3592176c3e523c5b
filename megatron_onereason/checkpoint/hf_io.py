"""Hugging Face safetensors checkpoints, read and written tensor by tensor.

Reading memory-maps each file (copy-on-write), so a tensor costs RAM only while it is being used and an 8B
model converts within 24 GB. Writing produces ``model-0000i-of-0000N.safetensors`` shards of at most 5 GB plus
``model.safetensors.index.json``, as ``save_pretrained`` does.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import save_file

from megatron_onereason.model.qwen3_config import Qwen3Config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _mmap_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of one safetensors file as zero-copy views of a copy-on-write memory map."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    size = os.path.getsize(path)
    buf = np.memmap(path, dtype=np.uint8, mode="c") if size > 8 + header_len else np.zeros(0, np.uint8)
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if base + end > size:
            raise ValueError(f"{path}: tensor {name} extends past the end of the file (truncated download?)")
        raw_bytes = torch.from_numpy(buf[base + start: base + end])
        tensors[name] = raw_bytes.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


class HFCheckpointReader:
    """Tensors of a HF model directory by name (single ``model.safetensors`` or sharded with an index)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX_FILE)
        single = os.path.join(hf_dir, SINGLE_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not weight_map:
                raise ValueError(f"{index_path}: no weight_map")
            self._file_of = {name: os.path.join(hf_dir, fn) for name, fn in weight_map.items()}
        elif os.path.exists(single):
            self._file_of = None
            self._files = {single: _mmap_safetensors(single)}
        else:
            found = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else []
            raise FileNotFoundError(
                f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found[:10]}); only safetensors is supported"
            )
        if self._file_of is not None:
            self._files = {}
            for path in sorted(set(self._file_of.values())):
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{path}: listed in {index_path} but missing")

    def _tensors(self, path: str) -> Dict[str, torch.Tensor]:
        if path not in self._files:
            self._files[path] = _mmap_safetensors(path)
        return self._files[path]

    def names(self) -> List[str]:
        if self._file_of is not None:
            return sorted(self._file_of)
        return sorted(next(iter(self._files.values())))

    def get(self, name: str) -> torch.Tensor:
        path = self._file_of.get(name) if self._file_of is not None else next(iter(self._files))
        tensors = self._tensors(path) if path is not None else {}
        if name not in tensors:
            raise KeyError(f"{self.hf_dir}: tensor {name!r} not found in the checkpoint")
        return tensors[name]

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.get(name).shape)

    def check_against(self, expected: Dict[str, Tuple[int, ...]]) -> None:
        """Every expected tensor present with its shape; nothing unexpected (tied lm_head copies allowed)."""
        present = set(self.names())
        missing = [n for n in expected if n not in present]
        if missing:
            raise ValueError(f"{self.hf_dir}: {len(missing)} tensors missing for this config.json, e.g. {missing[:3]}")
        for name, shape in expected.items():
            if self.shape(name) != tuple(shape):
                raise ValueError(
                    f"{self.hf_dir}: tensor {name} has shape {self.shape(name)}, config.json implies {tuple(shape)}"
                )
        extra = sorted(present - set(expected) - {"lm_head.weight"})
        if extra:
            raise ValueError(f"{self.hf_dir}: {len(extra)} tensors not part of a Qwen3 model, e.g. {extra[:3]}")


class ShardedSafetensorsWriter:
    """Write tensors one at a time into shards of at most ``max_shard_bytes``; :meth:`finish` names them."""

    def __init__(self, out_dir: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: List[Tuple[str, List[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        tmp_name = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, os.path.join(self.out_dir, tmp_name), metadata={"format": "pt"})
        self._shards.append((tmp_name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> List[str]:
        if self._pending:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.rename(os.path.join(self.out_dir, self._shards[0][0]), os.path.join(self.out_dir, SINGLE_FILE))
            return [SINGLE_FILE]
        weight_map, files = {}, []
        for i, (tmp_name, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.out_dir, tmp_name), os.path.join(self.out_dir, final))
            weight_map.update({name: final for name in names})
            files.append(final)
        with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return files


def copy_hf_assets(src_dir: str, dst_dir: str, skip: Iterable[str] = ("config.json",)) -> List[str]:
    """Copy tokenizer and other non-weight files (tokenizer.json, chat template, itemic_tokens.json, ...)."""
    copied = []
    skip = set(skip)
    for fn in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, fn)
        if fn in skip or fn.endswith(WEIGHT_SUFFIXES) or not os.path.isfile(path) or fn.startswith("."):
            continue
        shutil.copy2(path, os.path.join(dst_dir, fn))
        copied.append(fn)
    return copied


def write_hf_config(out_dir: str, cfg: Qwen3Config, template: Optional[dict] = None, dtype: str = "bfloat16") -> None:
    """``config.json`` for ``cfg``: the source config's other fields (token ids, ...) kept, architecture replaced."""
    d = dict(template or {})
    for stale in ("rope_parameters", "rope_scaling", "layer_types", "torch_dtype", "dtype"):
        d.pop(stale, None)  # rewritten below from cfg; rope fields must not contradict rope_theta
    d.update(cfg.to_hf_dict())
    d["torch_dtype"] = dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
