"""Ray workers of the actor-rollout engine and their placement.

* :class:`ActorGroup`: the TP×PP×DP megatron ranks (one Ray actor each, one megatron process group: gloo on CPU,
  NCCL on GPU), each running a :class:`~megatron_onereason.rl.actor.MegatronActor`. Work is SPMD: scoring and
  training split the tree packs over the DP ranks (every rank of a DP replica gets the same share).
* :class:`InferenceWorker`: one inference engine in its own process — a rollout engine (vLLM or the transformers
  backend: constrained two-stage generation), a domain teacher or the reference policy (HF: log-probs of tree
  packs in one forward, with the tree mask and positions).

Placement (:func:`plan_placement`): one placement group; the actor ranks get one bundle each; ``colocated`` puts
each inference engine on an actor bundle (round robin: on GPUs they share that rank's device and vLLM sleeps while
the actor trains), ``disaggregated`` gives each engine its own bundle.

Weights go actor → engines directly over :mod:`megatron_onereason.generation.weight_sync` channels (one per pipeline stage
and receiving role; NCCL when sender and receivers have their own GPUs, gloo otherwise), never through the driver.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_onereason.rl.tree_pack import TreePack

log = logging.getLogger("megatron_onereason.rl")


def hf_tree_logprobs(model, pack: TreePack) -> torch.Tensor:
    """Per-position log-probs ``[S]`` of ``pack.labels`` under a HF causal LM (tree mask, explicit positions); at
    ``pack.item_allowed`` positions renormalised over the allowed ids, as the actor scores them (rl/sampling.py)."""
    from megatron_onereason.rl.sampling import renormalised_logprobs, vocab_parallel_allowed_log_mass

    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(pack.tokens[None].to(dev), attention_mask=pack.allowed[None, None].to(dev),
                       position_ids=pack.position_ids[None].to(dev)).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, pack.labels[:, None].to(dev))[:, 0].cpu()
    if pack.item_allowed is not None:
        positions, ids = pack.item_allowed
        mass = vocab_parallel_allowed_log_mass(logits[positions.to(dev)], ids.to(dev)).cpu()
        logp[positions] = renormalised_logprobs(logp[positions], mass)
    return logp


# ------------------------------------------------------------------------------------------------ placement
@dataclass(frozen=True)
class EngineSpec:
    """One inference engine to place: its role name (``rollout/0``, ``teacher/1``, ``reference``) and resources."""

    name: str
    gpus: float


@dataclass
class Placement:
    bundles: List[Dict[str, float]]
    actor: List[int]  # bundle of each actor rank
    engines: Dict[str, int] = field(default_factory=dict)  # engine name -> bundle


def plan_placement(layout: str, actor_ranks: int, actor_gpus: float, engines: Sequence[EngineSpec]) -> Placement:
    """Bundles of the placement group: actor rank ``r`` on bundle ``r``; engines after them (disaggregated) or on
    the actor's bundles round robin (colocated; without an actor every engine gets its own bundle)."""
    bundles = [{"CPU": 1.0, **({"GPU": actor_gpus} if actor_gpus else {})} for _ in range(actor_ranks)]
    placement = Placement(bundles, list(range(actor_ranks)))
    for i, engine in enumerate(engines):
        if layout == "colocated" and actor_ranks:
            b = i % actor_ranks
            bundles[b]["CPU"] += 1.0
            if engine.gpus:
                bundles[b]["GPU"] = bundles[b].get("GPU", 0.0) + engine.gpus
        else:
            b = len(bundles)
            bundles.append({"CPU": 1.0, **({"GPU": engine.gpus} if engine.gpus else {})})
        placement.engines[engine.name] = b
    for b, bundle in enumerate(bundles):
        gpus = bundle.get("GPU", 0.0)
        if gpus > 1 and gpus != int(gpus):
            names = [e.name for e in engines if placement.engines[e.name] == b]
            raise ValueError(f"ray.layout={layout}: bundle {b} (actor rank {b} + {names}) would need {gpus:g} GPUs; "
                             "give fractions that sum to 1 (actor.gpus_per_rank, rollout/teachers/reference.gpus) "
                             "or whole GPUs")
    return placement


def wait_for(refs: Sequence, what: str, every_s: float = 10.0) -> List:
    """``ray.get(refs)``, logging progress every ``every_s`` seconds (worker start-up takes tens of seconds)."""
    import ray

    start, pending = time.time(), list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=every_s)
        if pending:
            log.info("%s: %d of %d ready after %.0f s", what, len(refs) - len(pending), len(refs),
                     time.time() - start)
    results = ray.get(list(refs))
    log.info("%s: ready in %.1f s", what, time.time() - start)
    return results


def dp_shards(items: Sequence, dp: int, empty) -> Tuple[List[List], List[int]]:
    """Contiguous near-equal shares of ``items`` for ``dp`` data-parallel ranks, in order, and how many real items
    each holds: a rank that would get none gets ``[empty(items[0])]`` (every rank must run the step: the gradient
    all-reduce is collective)."""
    if not items:
        raise ValueError("nothing to share over the data-parallel ranks")
    bounds = [round(i * len(items) / dp) for i in range(dp + 1)]
    shares = [list(items[a:b]) for a, b in zip(bounds, bounds[1:])]
    return [share or [empty(items[0])] for share in shares], [len(share) for share in shares]


def _scheduling(placement_group, bundle: int):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=bundle)


# ------------------------------------------------------------------------------------------------ actor
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
        return self.actor.iteration, self.actor.topology()

    def call(self, method: str, *args, **kwargs):
        from megatron_onereason.platform import enter_cpu_device_mode

        enter_cpu_device_mode()  # the CPU patches' device mode is per thread; Ray may run us on another one
        return getattr(self.actor, method)(*args, **kwargs)


class ActorGroup:
    """The megatron actor's ranks; ``start`` returns at once, :meth:`ready` waits for them (with progress)."""

    def __init__(self, spec, placement_group, bundles: Sequence[int], resume_from: Optional[str], gpus: float):
        import ray

        p = spec.parallel
        self.world = len(bundles)
        remote = ray.remote(_ActorRank)
        self.ranks = [remote.options(num_cpus=1, num_gpus=gpus,
                                     scheduling_strategy=_scheduling(placement_group, b)).remote() for b in bundles]
        addr, port = ray.get(self.ranks[0].address.remote())
        self._init = [a.init.remote(r, self.world, addr, port, spec, resume_from) for r, a in enumerate(self.ranks)]
        self.pp = p.pipeline_model_parallel_size

    def ready(self) -> None:
        results = wait_for(self._init, f"actor: {self.world} megatron ranks")
        self.iteration = results[0][0]
        self.topology = [t for _, t in results]  # per rank: {"dp", "tp", "pp"}
        self.dp = 1 + max(t["dp"] for t in self.topology)

    def call(self, method: str, *args, **kwargs) -> List:
        import ray

        return ray.get([a.call.remote(method, *args, **kwargs) for a in self.ranks])

    def _call_sharded(self, method: str, shards: Sequence[Sequence], *args) -> List:
        """Rank ``r`` gets ``shards[dp(r)]`` (as its first argument) and ``args``."""
        import ray

        return ray.get([a.call.remote(method, list(shards[t["dp"]]), *args)
                        for a, t in zip(self.ranks, self.topology)])

    def logprobs(self, packs: Sequence[TreePack]) -> List[torch.Tensor]:
        """Per-position log-probs of every pack (DP ranks score their shares; output ranks return them)."""
        shards, counts = dp_shards(list(packs), self.dp, lambda p: p)
        results = self._call_sharded("logprobs", shards)
        out: List[torch.Tensor] = []
        for d, count in enumerate(counts):
            mine = next(r for r, t in zip(results, self.topology) if t["dp"] == d and r is not None)
            out.extend(mine[:count])
        return out

    def train(self, method: str, micro_batches: Sequence, *args) -> Dict[str, float]:
        """One optimizer step over ``micro_batches`` split across the DP ranks (loss over the global batch)."""
        from megatron_onereason.rl.actor import without_loss

        results = self._call_sharded(method, dp_shards(list(micro_batches), self.dp, without_loss)[0], *args)
        return max(results, key=len)  # the last pipeline stage also reports the loss metrics

    # -------------------------------------------------------------------------------------------- weights
    def open_weight_channels(self, role: str, receivers: int, backend: str):
        """Serve one channel per pipeline stage for ``receivers`` receiving processes.

        Returns ``(specs by stage, refs)``: hand the specs to the receivers and wait for ``refs`` together with
        theirs (joining blocks until every member is in)."""
        import ray

        specs = [s for s in self.call("serve_weight_channel", role, 1 + receivers, backend) if s is not None]
        specs.sort(key=lambda s: s.name)
        refs = [a.call.remote("join_weight_channel", role) for a in self.ranks]
        if len(specs) != self.pp:
            ray.get(refs)
            raise RuntimeError(f"expected {self.pp} weight-sync channels for {role}, got {len(specs)}")
        return specs, refs

    def send_weights(self, role: str, bucket_bytes: int) -> List:
        """Start a sync to ``role`` on every rank (TP ranks gather, stage leaders send): object refs."""
        return [a.call.remote("send_weights", role, bucket_bytes) for a in self.ranks]


# ------------------------------------------------------------------------------------------------ inference
def pack_logprobs_from_scores(pack: TreePack, scores) -> torch.Tensor:
    """Per-position log-probs ``[S]`` of a tree pack from per-tree ``TreeScores`` (a backend's ``score``): each
    token's log-prob at the position that predicts it in the pack (0 elsewhere), as the actor reports them."""
    out = torch.zeros(pack.tokens.numel())
    for i, tree in enumerate(scores):
        trace = torch.tensor(tree.trace, dtype=torch.float32)
        out[pack.trace_index[i, : len(trace)]] = trace
        for j, child in enumerate(tree.children):
            out[pack.child_index[i, j, : len(child)]] = torch.tensor(child, dtype=torch.float32)
    return out


class InferenceWorker:
    """An inference engine in its own process: generation (rollout; RFT teachers; the evaluator), scoring of given
    tokens (MOPD teachers, the reference), and the receiving end of the weight sync — any
    :class:`~megatron_onereason.generation.backend.GenerationBackend` (``backend``: a kind of ``make_backend``)."""

    def __init__(self, backend: str, model_dir: str, catalog_dir: Optional[str], gpus: float, dtype: str,
                 tensor_parallel_size: int = 1, engine_args: Optional[Dict[str, Any]] = None, seed: int = 0,
                 sleep: bool = False):
        from megatron_onereason.generation.backend import make_backend

        torch.manual_seed(seed)
        device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
        self.backend = make_backend(backend, model_dir, catalog_dir, device=device,
                                    dtype=None if dtype == "auto" else dtype, seed=seed, enable_sleep=sleep,
                                    tensor_parallel_size=tensor_parallel_size, **(engine_args or {}))

    def ready(self) -> str:
        return socket.gethostname()

    def generate(self, prompts, params):
        return self.backend.generate(prompts, params)

    def tree_logprobs(self, packs: Sequence[TreePack], trees: Sequence[Sequence]) -> List[torch.Tensor]:
        """Per-position log-probs of each pack's labels; ``trees[i]``: pack i's ``TreeSequence`` list, in order.

        A model in this process: one forward per pack with the tree mask; an engine in its own processes (vLLM):
        the backend's ``score`` (prompt log-probs + forced decoding from the prefix cache), placed at the pack's
        positions."""
        model = self.backend.in_process_model
        if model is not None:
            return [hf_tree_logprobs(model, p) for p in packs]
        if any(p.item_allowed is not None for p in packs):
            raise ValueError("vLLM given-token scoring has no renormalised (constrained) log-probs: set "
                             "teachers.backend=hf / reference.backend=hf, or rollout.sampling=unconstrained")
        return [pack_logprobs_from_scores(p, self.backend.score(t)) for p, t in zip(packs, trees)]

    # -------------------------------------------------------------------------------------------- weights
    def weight_receivers(self) -> int:
        return self.backend.weight_receivers

    def open_weight_channels(self, specs, first_rank: int) -> None:
        self.backend.open_weight_channels(specs, first_rank)

    def receive_weights(self):
        return self.backend.receive_weights()

    def sleep(self) -> None:
        """Colocated layout: free the engine's accelerator memory while the actor trains. Level 2 drops the weights
        too (the next sync refills every tensor); a no-op where the backend has no sleep mode (CPU, HF)."""
        self.backend.sleep(level=2)

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        self.backend.wake_up(tags)

    def close(self) -> None:
        """Stop the engine's own processes (vLLM's engine core) before Ray ends this one."""
        self.backend.close()


def start_inference_worker(placement_group, bundle: int, gpus: float, env: Dict[str, str], *args, **kwargs):
    import ray

    return ray.remote(InferenceWorker).options(
        num_cpus=1, num_gpus=gpus, scheduling_strategy=_scheduling(placement_group, bundle),
        runtime_env={"env_vars": dict(env)} if env else None).remote(*args, gpus=gpus, **kwargs)

