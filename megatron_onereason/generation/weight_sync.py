"""Direct weight sync: actor ranks broadcast the policy to the inference engines (no driver, no object store).

The pattern of vLLM's RLHF examples, OpenRLHF and verl: a process group *separate* from megatron's (and from the
inference engine's own groups) joins one sender and R receivers through a TCP store, and the sender broadcasts
the weights in buckets. Backends: ``gloo`` on CPU tensors, ``nccl`` on GPU tensors (torch's own process-group
classes, created without the default group, so a process may be in megatron's world and in any number of
channels at once).

Who sends: for every pipeline stage, the actor rank with tensor-parallel rank 0 and data-parallel rank 0 (the
"stage leader") opens one channel per receiving role; all TP ranks of the stage gather each tensor together and the
leader converts it to its Hugging Face name(s) (:func:`megatron_onereason.generation.weights.hf_named_tensors`,
the converter's mapping) and broadcasts. The P stages send at the same time over their own channels; a receiver
reads its P channels in parallel threads. Who receives: every inference process that holds a full copy of the
weights it loads (the HF worker; each vLLM worker through the worker extension), as channel ranks ``1..R``.

Wire protocol, per bucket (sender = rank 0): ``int64[2] = [meta_bytes, payload_bytes]``, then ``uint8[meta_bytes]``
(a pickled ``[(name, dtype, shape, offset), ...]``), then ``uint8[payload_bytes]`` (the tensors' bytes, each
starting at a 16-byte aligned offset). ``[0, 0]`` ends a sync. Buckets hold whole tensors up to ``bucket_bytes``
(a larger tensor travels alone), so a receiver holds at most one bucket per channel at a time.

Engine side: :func:`serve_channel` on the sender (starts the store), then :func:`join_channel` on every member
at the same time; per sync :func:`send_weights` on the senders while the receivers run :func:`receive_weights`.
"""
from __future__ import annotations

import datetime
import pickle
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

NamedTensors = List[Tuple[str, torch.Tensor]]
_ALIGN = 16
DEFAULT_BUCKET_BYTES = 512 * 2**20


@dataclass(frozen=True)
class ChannelSpec:
    """How to join one channel (picklable): made by :func:`serve_channel`, handed to every member."""

    name: str  # e.g. "rollout/pp1": one channel per (receiving role, pipeline stage)
    host: str  # the sender's node address (it hosts the store)
    port: int
    world_size: int  # 1 sender + the receivers
    backend: str  # "gloo" (CPU tensors) | "nccl" (GPU tensors)
    timeout_s: float = 1800.0


@dataclass
class SyncStats:
    """What one side of a sync moved: logged per step as ``sync/*``."""

    bytes: int = 0
    tensors: int = 0
    buckets: int = 0
    seconds: float = 0.0

    def add(self, other: "SyncStats") -> "SyncStats":
        return SyncStats(self.bytes + other.bytes, self.tensors + other.tensors, self.buckets + other.buckets,
                         max(self.seconds, other.seconds))  # channels run in parallel


class SyncChannel:
    """One member's end of a channel: broadcasts from rank 0 on a private process group."""

    def __init__(self, spec: ChannelSpec, rank: int, store, device: torch.device):
        from torch.distributed import PrefixStore

        if not 0 <= rank < spec.world_size:
            raise ValueError(f"channel {spec.name}: rank {rank} outside its world of {spec.world_size}")
        self.spec, self.rank, self.device = spec, rank, device
        self._store = store  # the sender's store object hosts the server: keep it alive with the channel
        prefixed = PrefixStore(f"weight_sync/{spec.name}", store)
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        if spec.backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            options = ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [ProcessGroupGloo.create_default_device()]
            self.group = ProcessGroupGloo(prefixed, rank, spec.world_size, options)
        elif spec.backend == "nccl":
            from torch.distributed import ProcessGroupNCCL

            options = ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = ProcessGroupNCCL(prefixed, rank, spec.world_size, options)
        else:
            raise ValueError(f"channel {spec.name}: backend must be 'gloo' or 'nccl', got {spec.backend!r}")

    def broadcast(self, tensor: torch.Tensor) -> None:
        from torch.distributed.distributed_c10d import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([tensor], opts).wait()
        if self.spec.backend == "nccl":
            torch.cuda.current_stream(self.device).synchronize()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> str:
    """This node's address as the other Ray nodes reach it."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray: a single machine
        return "127.0.0.1"


def serve_channel(name: str, world_size: int, backend: str, timeout_s: float = 1800.0):
    """On the sender: start the channel's store; returns ``(spec, store)`` (pass both to :func:`join_channel`)."""
    from torch.distributed import TCPStore

    host = node_address()
    store = TCPStore(host, 0, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                     wait_for_workers=False)
    return ChannelSpec(name, host, store.port, world_size, backend, timeout_s), store


def join_channel(spec: ChannelSpec, rank: int, store=None, device: Optional[torch.device] = None) -> SyncChannel:
    """Join ``spec`` as ``rank`` (every member at the same time: it blocks until all have joined).

    ``store``: the sender's (from :func:`serve_channel`); receivers connect to it. ``device``: where received
    tensors land (default: the current CUDA device for ``nccl``, CPU for ``gloo``).
    """
    from torch.distributed import TCPStore

    if store is None:
        store = TCPStore(spec.host, spec.port, spec.world_size, False,
                         timeout=datetime.timedelta(seconds=spec.timeout_s))
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if spec.backend == "nccl" else torch.device("cpu")
    return SyncChannel(spec, rank, store, device)


# ------------------------------------------------------------------------------------------------ buckets
def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def buckets(named_tensors: Iterable[Tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[NamedTensors]:
    """Consecutive tensors grouped into buckets of at most ``bucket_bytes`` (a larger tensor forms its own)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: NamedTensors = []
    size = 0
    for name, t in named_tensors:
        nbytes = _aligned(t.numel() * t.element_size())
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def flatten_bucket(bucket: NamedTensors, device: torch.device) -> Tuple[bytes, torch.Tensor]:
    """``(meta, payload)``: the pickled layout and one uint8 buffer holding every tensor's bytes."""
    layout, offset = [], 0
    for name, t in bucket:
        layout.append((name, t.dtype, tuple(t.shape), offset))
        offset += _aligned(t.numel() * t.element_size())
    payload = torch.empty(offset, dtype=torch.uint8, device=device)
    for (name, t), (_, _, _, start) in zip(bucket, layout):
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        payload[start:start + flat.numel()].copy_(flat)
    return pickle.dumps(layout), payload


def unflatten_bucket(meta: bytes, payload: torch.Tensor) -> NamedTensors:
    """The tensors of a bucket as views into ``payload`` (inverse of :func:`flatten_bucket`)."""
    out = []
    for name, dtype, shape, offset in pickle.loads(meta):
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out.append((name, payload[offset:offset + nbytes].view(dtype).reshape(shape)))
    return out


# ------------------------------------------------------------------------------------------------ send / receive
def send_weights(channel: SyncChannel, named_tensors: Iterable[Tuple[str, torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> SyncStats:
    """On the sender (rank 0): broadcast ``(hf_name, tensor)`` pairs in buckets, then the end marker."""
    if channel.rank != 0:
        raise ValueError(f"channel {channel.spec.name}: only rank 0 sends (this is rank {channel.rank})")
    start = time.perf_counter()
    stats = SyncStats()
    for bucket in buckets(named_tensors, bucket_bytes):
        meta, payload = flatten_bucket(bucket, channel.device)
        header = torch.tensor([len(meta), payload.numel()], dtype=torch.int64, device=channel.device)
        channel.broadcast(header)
        channel.broadcast(torch.frombuffer(bytearray(meta), dtype=torch.uint8).to(channel.device))
        channel.broadcast(payload)
        stats.bytes += payload.numel()
        stats.tensors += len(bucket)
        stats.buckets += 1
    channel.broadcast(torch.zeros(2, dtype=torch.int64, device=channel.device))
    stats.seconds = time.perf_counter() - start
    return stats


def _receive_buckets(channel: SyncChannel) -> Iterator[Tuple[NamedTensors, int]]:
    while True:
        header = torch.empty(2, dtype=torch.int64, device=channel.device)
        channel.broadcast(header)
        meta_len, payload_len = header.tolist()
        if meta_len == 0:
            return
        meta = torch.empty(meta_len, dtype=torch.uint8, device=channel.device)
        channel.broadcast(meta)
        payload = torch.empty(payload_len, dtype=torch.uint8, device=channel.device)
        channel.broadcast(payload)
        yield unflatten_bucket(meta.cpu().numpy().tobytes(), payload), payload_len


def receive_weights(channels: Sequence[SyncChannel], load: Callable[[NamedTensors], None]) -> SyncStats:
    """On a receiver: read every channel to its end marker, calling ``load(bucket)`` per bucket.

    Channels (one per pipeline stage) are read in parallel threads; ``load`` runs in the calling thread, one bucket
    at a time, on tensors that are views into a buffer reused after it returns (copy what you keep).
    """
    if any(c.rank == 0 for c in channels):
        raise ValueError("rank 0 of a channel is its sender; receivers have ranks 1..R")
    start = time.perf_counter()
    stats = SyncStats()
    done = object()
    handoff: "queue.Queue" = queue.Queue(maxsize=len(channels))
    errors: List[BaseException] = []

    def read(channel: SyncChannel) -> None:
        try:
            if channel.device.type == "cuda":
                torch.cuda.set_device(channel.device)
            for item in _receive_buckets(channel):
                handoff.put(item)
        except BaseException as e:  # surfaced in the calling thread
            errors.append(e)
        finally:
            handoff.put(done)

    threads = [threading.Thread(target=read, args=(c,), daemon=True, name=f"weight-sync {c.spec.name}")
               for c in channels]
    for t in threads:
        t.start()
    finished = 0
    while finished < len(channels):
        item = handoff.get()
        if item is done:
            finished += 1
            continue
        bucket, nbytes = item
        if not errors:  # after a failure keep draining: the senders finish their broadcasts either way
            try:
                load(bucket)
            except BaseException as e:
                errors.append(e)
        stats.bytes += nbytes
        stats.tensors += len(bucket)
        stats.buckets += 1
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    stats.seconds = time.perf_counter() - start
    return stats
