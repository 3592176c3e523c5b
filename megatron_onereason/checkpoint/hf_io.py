"""Hugging Face safetensors checkpoints, read and written tensor by tensor.

Nothing here materialises a whole checkpoint. Reading memory-maps each file (copy-on-write), so a tensor costs
RAM only while it is used and an 8B model converts within 24 GB; byte-range copies (:func:`source_tensors`,
:func:`write_safetensors`) rewrite a shard leaving untouched tensors bit-identical. Writing converted models
produces ``model-0000i-of-0000N.safetensors`` shards of at most 5 GB plus ``model.safetensors.index.json``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_onereason.model.qwen3_config import Qwen3Config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".h5",
                   ".msgpack", ".gguf")

_COPY_BLOCK = 64 << 20  # bytes per read when copying a byte range
# Bytes per element of the safetensors dtype names (https://github.com/huggingface/safetensors, format spec).
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


# ---------------------------------------------------------------------------------------------- files
def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` (free for multi-GB shards), copying when the filesystem refuses."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ---------------------------------------------------------------------------------------------- weight maps
def read_weight_map(hf_dir: str) -> Tuple[Dict[str, str], Optional[Dict[str, Any]]]:
    """``(tensor name -> safetensors file name, index json or None)`` of a single-file or sharded directory."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: no such directory")
    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        if not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{index_path}: no 'weight_map' object")
        for fname in sorted(set(index["weight_map"].values())):
            if not os.path.exists(os.path.join(hf_dir, fname)):
                held = sorted(name for name, shard in index["weight_map"].items() if shard == fname)
                more = f" and {len(held) - 1} more tensors" if len(held) > 1 else ""
                raise FileNotFoundError(f"{index_path}: shard {fname} is listed but missing (it holds {held[0]}{more}); "
                                        "copy it from the model's source again")
        return dict(index["weight_map"]), index
    single = os.path.join(hf_dir, SINGLE_FILE)
    if not os.path.exists(single):
        raise FileNotFoundError(f"{hf_dir}: no weights: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors "
                                "are supported; a model saved as .bin: load and save_pretrained it again)")
    header, _ = read_safetensors_header(single)
    return {name: SINGLE_FILE for name in header if name != "__metadata__"}, None


# ---------------------------------------------------------------------------------------------- safetensors
def read_safetensors_header(path: str) -> Tuple[Dict[str, Any], int]:
    """The header dict of a safetensors file and the file offset where its data buffer starts."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        raw = f.read(header_len)
    if len(raw) != header_len:
        raise ValueError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path}: safetensors header is not JSON ({e})") from None
    return header, 8 + header_len


def read_byte_range(path: str, start: int, end: int) -> Iterator[bytes]:
    """The bytes ``[start, end)`` of a file, in bounded blocks."""
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(left, _COPY_BLOCK))
            if not block:
                raise ValueError(f"{path}: ends before byte {end}")
            left -= len(block)
            yield block


@dataclass(frozen=True)
class TensorBytes:
    """One tensor to write: name, safetensors dtype, shape, and a producer of its raw little-endian bytes."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    chunks: Callable[[], Iterable[Any]]  # each item supports the buffer protocol (bytes, a uint8 array)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_ITEMSIZE[self.dtype]


def source_tensors(path: str) -> List[TensorBytes]:
    """Every tensor of a safetensors file as a byte-range copy, in file order."""
    header, data_start = read_safetensors_header(path)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    return [
        TensorBytes(
            name,
            info["dtype"],
            tuple(info["shape"]),
            lambda s=data_start + info["data_offsets"][0], e=data_start + info["data_offsets"][1]: read_byte_range(
                path, s, e
            ),
        )
        for name, info in entries
    ]


def write_safetensors(path: str, tensors: Sequence[TensorBytes], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file tensor by tensor (memory: one chunk), checking each tensor's byte count."""
    header: Dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header so the data buffer is 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            written = 0
            for chunk in t.chunks():
                f.write(chunk)
                written += memoryview(chunk).nbytes
            if written != t.nbytes:
                raise ValueError(f"{path}: tensor {t.name} produced {written} bytes, expected {t.nbytes}")


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _mmap_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of one safetensors file as zero-copy views of a copy-on-write memory map."""
    header, base = read_safetensors_header(path)
    size = os.path.getsize(path)
    buf = np.memmap(path, dtype=np.uint8, mode="c") if size > base else np.zeros(0, np.uint8)
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
        weight_map, _ = read_weight_map(hf_dir)
        self._file_of = {name: os.path.join(hf_dir, fn) for name, fn in weight_map.items()}
        self._files: Dict[str, Dict[str, torch.Tensor]] = {}

    def _tensors(self, path: str) -> Dict[str, torch.Tensor]:
        if path not in self._files:
            self._files[path] = _mmap_safetensors(path)
        return self._files[path]

    def names(self) -> List[str]:
        return sorted(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"{self.hf_dir}: tensor {name!r} not found in the checkpoint")
        return self._tensors(self._file_of[name])[name]

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


SAFETENSORS_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def write_sharded_safetensors(out_dir: str, plan: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]],
                              tensors: Iterator[Tuple[str, torch.Tensor]],
                              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> List[str]:
    """Write ``tensors`` (arriving in ``plan`` order) into shards of at most ``max_shard_bytes``, streaming.

    ``plan`` lists every ``(name, shape, dtype)`` up front, so shard headers are known before the data and each
    tensor goes to disk as it arrives: memory holds only what the producer holds. Writes the index json when
    there is more than one shard, like ``save_pretrained``.
    """
    entries = [TensorBytes(name, SAFETENSORS_DTYPE_NAMES[dtype], tuple(shape), None) for name, shape, dtype in plan]
    shards: List[List[TensorBytes]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes

    def pull(expected: TensorBytes):
        name, tensor = next(tensors)
        if name != expected.name or tuple(tensor.shape) != expected.shape:
            raise ValueError(f"expected tensor {expected.name} {expected.shape}, got {name} {tuple(tensor.shape)}")
        yield tensor.contiguous().view(torch.uint8).numpy()

    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(files, shards):
        streamed = [TensorBytes(e.name, e.dtype, e.shape, lambda e=e: pull(e)) for e in shard]
        write_safetensors(os.path.join(out_dir, fname), streamed, metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {e.name: fname for fname, shard in zip(files, shards) for e in shard}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}, f,
                      indent=2)
    return files


def copy_hf_assets(src_dir: str, dst_dir: str, skip: Iterable[str] = ("config.json",)) -> List[str]:
    """Copy everything but weights: tokenizer files, chat template, itemic_tokens.json, README, subfolders."""
    copied = []
    skip = set(skip)
    for fn in sorted(os.listdir(src_dir)):
        path = os.path.join(src_dir, fn)
        if fn in skip or fn.endswith(WEIGHT_SUFFIXES) or fn.startswith("."):
            continue
        (shutil.copytree if os.path.isdir(path) else shutil.copy2)(path, os.path.join(dst_dir, fn))
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
