"""Ray workers of the actor-rollout engine and their placement.

* :class:`ActorGroup`: TP×PP×DP Ray actors, one megatron process group (gloo on CPU, NCCL on GPU), each running
  a :class:`~megatron_onereason.rl.actor.MegatronActor`; the driver calls every rank with the same arguments.
* :class:`HFWorker`: a ``transformers`` model — the rollout engine (constrained two-stage generation), a domain
  teacher or the reference policy (log-probs of tree packs in one forward, with the tree mask and positions).

Placement: one placement group; ``colocated`` puts the rollout and scorers on the actor's first bundle (on GPUs
they share its device and the actor is idle while they run), ``disaggregated`` gives each its own bundle.
Weights go actor → rollout as HF-named tensors through the Ray object store (shared memory on a node), in
buckets of ``bucket_bytes``; the NCCL broadcast path for GPU clusters is not implemented yet.
"""
from __future__ import annotations

import os
import socket
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from megatron_onereason.rl.tree_pack import TreePack


def hf_tree_logprobs(model, pack: TreePack) -> torch.Tensor:
    """Per-position log-probs ``[S]`` of ``pack.labels`` under a HF causal LM (tree mask, explicit positions)."""
    with torch.no_grad():
        logits = model(pack.tokens[None], attention_mask=pack.allowed[None, None],
                       position_ids=pack.position_ids[None]).logits[0].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, pack.labels[:, None])[:, 0]


def weight_buckets(weights: Dict[str, torch.Tensor], bucket_bytes: int) -> Iterator[Dict[str, torch.Tensor]]:
    bucket: Dict[str, torch.Tensor] = {}
    size = 0
    for name, t in weights.items():
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = t
        size += nbytes
    if bucket:
        yield bucket


class _ActorRank:
    """One actor rank (wrapped by ``ray.remote`` in :class:`ActorGroup`)."""

    def address(self):
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init(self, rank: int, world: int, master_addr: str, master_port: int, spec, resume_from: Optional[str]):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port))
        from megatron_onereason.rl.actor import MegatronActor

        self.actor = MegatronActor(spec, resume_from)
        return self.actor.iteration

    def call(self, method: str, *args, **kwargs):
        from megatron_onereason.platform import enter_cpu_device_mode

        enter_cpu_device_mode()  # the CPU patches' device mode is per thread; Ray may run us on another one
        return getattr(self.actor, method)(*args, **kwargs)


class ActorGroup:
    def __init__(self, spec, placement_group, bundle_offset: int, resume_from: Optional[str], gpus: float):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        p = spec.parallel
        self.world = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        remote = ray.remote(_ActorRank)
        self.ranks = [
            remote.options(num_cpus=1, num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=bundle_offset + r)).remote()
            for r in range(self.world)]
        addr, port = ray.get(self.ranks[0].address.remote())
        iterations = ray.get([a.init.remote(r, self.world, addr, port, spec, resume_from)
                              for r, a in enumerate(self.ranks)])
        self.iteration = iterations[0]

    def call(self, method: str, *args, **kwargs) -> List:
        import ray

        return ray.get([a.call.remote(method, *args, **kwargs) for a in self.ranks])

    def logprobs(self, packs: Sequence[TreePack]) -> List[torch.Tensor]:
        return next(r for r in self.call("logprobs", list(packs)) if r is not None)

    def train(self, method: str, *args, **kwargs) -> Dict[str, float]:
        results = self.call(method, *args, **kwargs)
        return max(results, key=len)  # the last pipeline stage also reports the loss metrics

    def full_weights(self) -> Dict[str, torch.Tensor]:
        merged: Dict[str, torch.Tensor] = {}
        for part in self.call("full_weights"):
            merged.update(part)
        return merged


class HFWorker:
    """A HF model in its own process: generation (rollout engine) and tree-pack scoring (teachers, reference)."""

    def __init__(self, model_dir: str, catalog_dir: Optional[str] = None):
        from megatron_onereason.generation.hf_backend import TransformersBackend

        torch.manual_seed(0)
        self.backend = TransformersBackend.from_pretrained(model_dir, catalog_dir)

    def generate(self, prompts, params):
        return self.backend.generate(prompts, params)

    def update_weights(self, weights: Dict[str, torch.Tensor]) -> int:
        self.backend.update_weights(weights.items())
        return len(weights)

    def tree_logprobs(self, packs: Sequence[TreePack]) -> List[torch.Tensor]:
        return [hf_tree_logprobs(self.backend.model, p) for p in packs]


def start_hf_worker(model_dir: str, catalog_dir: Optional[str], placement_group, bundle: int, gpus: float):
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return ray.remote(HFWorker).options(
        num_cpus=1, num_gpus=gpus,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=bundle),
    ).remote(model_dir, catalog_dir)
