"""The training loader: this data-parallel rank's packs in training order, prepared ahead by background workers.

:class:`PackSampler` yields pack indices in exactly the order the trainer consumes them — global batch ``i``
holds packs ``[consumed + i·B, consumed + (i+1)·B)`` (mod the dataset size), split into contiguous equal shares
over DP ranks — starting from a ``consumed_samples`` position, so a resumed run reads what an uninterrupted one
would. :func:`make_pack_loader` wraps it in a ``torch.utils.data.DataLoader``: ``num_workers`` processes assemble
packs from the memory-mapped corpora ahead of time (``prefetch_factor`` each) and, on CUDA, a pinning thread puts
them in page-locked memory so the host→device copies of :func:`~megatron_onereason.model.forward.pack_to_device`
run asynchronously.
"""
from __future__ import annotations

import ctypes
import signal
import sys
from typing import Dict, Iterator, List

import torch

from megatron_onereason.data.packed_dataset import PackedDataset


class PackSampler(torch.utils.data.Sampler):
    """Pack indices of one DP rank, endless, starting at ``consumed_samples`` (global packs already trained on)."""

    def __init__(self, num_packs: int, global_batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int):
        if num_packs < 1:
            raise ValueError("the dataset holds no pack: is the blend empty?")
        if global_batch_size % dp_size or not 0 <= dp_rank < dp_size:
            raise ValueError(f"global batch {global_batch_size} must split evenly over DP={dp_size} "
                             f"(rank {dp_rank})")
        self.num_packs, self.global_batch_size = num_packs, global_batch_size
        self.dp_rank, self.per_rank = dp_rank, global_batch_size // dp_size
        self.consumed_samples = consumed_samples

    def __iter__(self) -> Iterator[int]:
        consumed = self.consumed_samples
        while True:
            start = consumed + self.dp_rank * self.per_rank
            for i in range(self.per_rank):
                yield (start + i) % self.num_packs
            consumed += self.global_batch_size


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere a no-op): a killed or crashed
    trainer leaves no orphaned worker behind holding its files and terminal open."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _worker_init(_worker_id: int) -> None:
    # SLURM's pre-emption SIGTERM reaches the workers too: they must outlive it while the trainer saves, or the
    # trainer dies of "DataLoader worker killed" instead of exiting cleanly. They end when the trainer closes the
    # loader (TrainingPacks.close, also on errors) or, if it is killed, with it (parent-death signal).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()


def make_pack_loader(dataset: PackedDataset, sampler: PackSampler, num_workers: int = 2,
                     prefetch_factor: int = 4) -> torch.utils.data.DataLoader:
    """Endless loader over ``sampler`` (one pack per item); pinned memory when CUDA is available."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None, persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init)


class TrainingPacks:
    """The packs of each iteration for this DP rank: ``next_global_batch()`` → its ``global_batch / DP`` packs."""

    def __init__(self, dataset: PackedDataset, global_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int, num_workers: int = 2):
        self.dataset = dataset
        self.sampler = PackSampler(len(dataset), global_batch_size, dp_rank, dp_size, consumed_samples)
        self._packs = iter(make_pack_loader(dataset, self.sampler, num_workers))

    def next_global_batch(self) -> List[Dict]:
        return [next(self._packs) for _ in range(self.sampler.per_rank)]

    def close(self) -> None:
        """Stop the workers now. Needed on every way out: they ignore SIGTERM, and Python's exit would otherwise
        SIGTERM and then wait for them forever (the hang after an error in the trainer)."""
        shutdown = getattr(self._packs, "_shutdown_workers", None)  # absent with num_workers=0
        if shutdown is not None:
            shutdown()
