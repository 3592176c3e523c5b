"""Streaming access to HF model directories: atomic output dirs, weight maps, safetensors read/write by byte range.

Nothing here materialises a whole checkpoint: tensors are copied as raw byte ranges of the source file, so a
rewrite of a multi-GB shard costs one copy block of memory and leaves every untouched tensor bit-identical.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_COPY_BLOCK = 64 << 20  # bytes per read when copying a byte range
# Bytes per element of the safetensors dtype names (https://github.com/huggingface/safetensors, format spec).
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


# ---------------------------------------------------------------------------------------------- output dirs
def check_output_dir(out_dir: str, overwrite: bool = False) -> None:
    """Refuse an existing ``out_dir`` unless ``overwrite`` (call early, before expensive work)."""
    if os.path.lexists(out_dir) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(out_dir)}: output directory already exists (pass overwrite to replace it)")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temp dir next to ``out_dir``; on success rename it to ``out_dir``, on error delete it.

    A reader therefore never sees a half-written ``out_dir``. With ``overwrite`` an existing ``out_dir`` is
    replaced only once the new one is complete.
    """
    check_output_dir(out_dir, overwrite)
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    # os.mkdir (not tempfile.mkdtemp, which makes it 0700) so the result gets the usual umask permissions.
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)
    try:
        yield tmp
        if os.path.lexists(out_dir):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` (free for multi-GB shards), copying when the filesystem refuses."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ---------------------------------------------------------------------------------------------- weight maps
def read_weight_map(hf_dir: str) -> Tuple[Dict[str, str], Optional[Dict[str, Any]]]:
    """``(tensor name -> safetensors file name, index json or None)`` of a single-file or sharded directory."""
    index_path = os.path.join(hf_dir, SAFETENSORS_INDEX)
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
        if not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{index_path}: no 'weight_map' object")
        for fname in set(index["weight_map"].values()):
            if not os.path.exists(os.path.join(hf_dir, fname)):
                raise FileNotFoundError(f"{index_path}: shard {fname} is listed but missing")
        return dict(index["weight_map"]), index
    single = os.path.join(hf_dir, SAFETENSORS_SINGLE)
    if not os.path.exists(single):
        raise FileNotFoundError(
            f"{hf_dir}: neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX} found (only safetensors are supported)"
        )
    header, _ = read_safetensors_header(single)
    return {name: SAFETENSORS_SINGLE for name in header if name != "__metadata__"}, None


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
