"""The RL runtime: what every algorithm step stands on (OneReason §6).

Placement (one Ray placement group: the actor's megatron ranks and the inference engines), the engines themselves
(rollout, domain teachers, the KL reference, the evaluator), generation over the rollout replicas, the weight sync
actor → engines, sleep / wake of colocated rollout engines, tree packs (with the allowed item ids of the sampling
distribution) and the actor's mini-batch optimizer steps. The algorithm steps (``rl/grpo_step.py``,
``rl/mopd_step.py``, ``rl/rft_step.py``) are functions of a runtime; ``rl/engine.py`` is the loop over them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_onereason.cli import UserError
from megatron_onereason.generation.params import GenerationParams
from megatron_onereason.rl.actor import ActorSpec
from megatron_onereason.rl.config import CPU_ENGINE_MAX_PARAMS, RayLayout, RLConfig
from megatron_onereason.rl.data import RLPrompt
from megatron_onereason.rl.metrics import ItemValidity, mean_over_minibatches
from megatron_onereason.rl.rollout_batch import group_into_packs, tree_length, trees_within
from megatron_onereason.rl.sampling import item_allowed_ids
from megatron_onereason.rl.tree_pack import pack_trees
from megatron_onereason.rl.workers import (
    ActorGroup,
    EngineSpec,
    plan_placement,
    role_needs,
    start_inference_worker,
    wait_for,
    wait_for_placement,
)
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

log = logging.getLogger("megatron_onereason.rl")


def _ray_connect_remedy() -> str:
    """What to check when the driver cannot join a running cluster; a token-authenticated cluster (Ray's
    RAY_AUTH_MODE=token) refuses a driver without the head's token with nothing but a connection failure."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return ("RAY_AUTH_TOKEN is set: check that it is the token the head node was started with, and that the head "
                "is reachable at that address")
    return ("If the cluster was started with token authentication (RAY_AUTH_MODE=token), export RAY_AUTH_TOKEN=<the "
            "head's token> here as on the head node; otherwise check that the head is running at that address")


def init_ray(r: RayLayout, local_cpus: int) -> bool:
    """Join the cluster at ``ray.address`` (no resource arguments: the cluster has its own), or start a local one.

    A local cluster is started explicitly (``address="local"``): a stale ``/tmp/ray/ray_current_cluster`` left by
    an earlier ``ray start`` would otherwise make ``ray.init()`` try to join a cluster that no longer exists.
    Returns whether this call connected (a caller that did not, e.g. a test sharing one cluster, keeps Ray up).
    """
    import ray

    if ray.is_initialized():
        return False
    if r.address:
        log.info("joining the Ray cluster at %s", r.address)
        try:
            ray.init(address=r.address, include_dashboard=False, log_to_driver=r.log_to_driver)
        except ConnectionError as e:
            raise UserError(f"ray.address={r.address}: {e}. {_ray_connect_remedy()}") from e
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        log.info("Ray cluster: %d node(s), resources %s", len(nodes), ray.cluster_resources())
    else:
        ray.init(address="local", num_cpus=r.num_cpus or local_cpus, include_dashboard=False,
                 log_to_driver=r.log_to_driver)
    return True


@dataclass
class EnginePlan:
    """What a run starts: the actor's ranks and the inference engines, and where Recall@K is evaluated."""

    actor_ranks: int
    engines: List[EngineSpec]
    teachers: List[str]  # HF directories, in the order of the teacher/<i> engines
    reference: bool
    evaluator: Optional[str]  # None: no evaluation; "rollout": on the rollout engines; "own": its own engine


def engine_plan(cfg: RLConfig, external_rollouts: bool = False) -> EnginePlan:
    """The actor ranks and engines of ``cfg`` (``external_rollouts``: rollout engines come from the caller)."""
    r, p = cfg.rollout, cfg.actor.parallel
    trains = cfg.algorithm != "rft"  # RFT only samples the teachers
    teachers = [] if cfg.algorithm == "grpo" else sorted(
        set(cfg.mopd.teachers.values()) | ({cfg.mopd.general_teacher} - {None}))
    reference = cfg.grpo.kl_coef > 0 and cfg.algorithm == "grpo"
    evaluator = None
    if trains and cfg.eval_interval and cfg.data.eval_prompts:
        # The rollout engines hold the current policy: evaluate there when they sit beside the actor (colocated);
        # disaggregated rollout engines keep rolling out, the evaluator has its own.
        evaluator = "rollout" if cfg.ray.layout == "colocated" else "own"
    own_rollouts = 0 if external_rollouts or not trains else r.replicas
    engines = [EngineSpec(f"rollout/{i}", r.gpus) for i in range(own_rollouts)]
    engines += [EngineSpec(f"teacher/{i}", (r if cfg.algorithm == "rft" else cfg.teachers).gpus)
                for i in range(len(teachers))]
    engines += [EngineSpec("reference", cfg.reference.gpus)] if reference else []
    engines += [EngineSpec("evaluator", cfg.evaluator.gpus)] if evaluator == "own" else []
    world = (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * cfg.actor.data_parallel_size
             if trains else 0)
    return EnginePlan(world, engines, teachers, reference, evaluator)


def check_engine_devices(cfg: RLConfig, plan: EnginePlan) -> None:
    """Refuse, in one line naming the field, an engine of a large model that the config puts on CPU (its section's
    ``gpus: 0``): fp32 on the host, an 8B evaluator or teacher would stall the run or exhaust host memory."""
    from megatron_onereason.model.qwen3_config import Qwen3Config

    roles = [("rollout", cfg.rollout.model_dir)] if any(e.name.startswith("rollout/") for e in plan.engines) else []
    section = "rollout" if cfg.algorithm == "rft" else "teachers"
    roles += [(section, path) for path in plan.teachers]
    roles += [("reference", cfg.rollout.model_dir)] if plan.reference else []
    roles += [("evaluator", cfg.rollout.model_dir)] if plan.evaluator == "own" else []
    for role, model_dir in roles:
        if getattr(cfg, role).gpus > 0 or not model_dir:
            continue
        params = Qwen3Config.from_hf_dir(model_dir).num_parameters()
        if params > CPU_ENGINE_MAX_PARAMS:
            raise ValueError(f"{role}.gpus=0 would run a {params / 1e9:.1f}B-parameter model ({model_dir}) on CPU; "
                             f"give it GPUs ({role}.gpus: 1{', dtype: bfloat16' if role != 'rollout' else ''})")


class RLRuntime:
    def __init__(self, cfg: RLConfig, rollouts: Optional[Sequence] = None, resume: Optional[str] = None):
        """Start the actor (resumed from ``resume`` when given) and the engines of ``cfg``, then sync the actor's
        weights into the rollout (and reference) engines. ``rollouts``: running rollout engines
        (:class:`~megatron_onereason.rl.workers.InferenceWorker` handles serving ``rollout.model_dir``) to use
        instead of starting ``rollout.replicas`` new ones — e.g. one vLLM engine kept across several runs; they get
        this run's weights at start and are left running at shutdown."""
        import ray
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.catalog = ItemCatalog.load(cfg.data.catalog)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.rollout.model_dir)
        self.vocab = ItemicVocab.load(cfg.rollout.model_dir)
        self.scheme = self.vocab.scheme
        self.trie = ItemTrie.from_catalog(self.catalog, self.scheme)
        self.item_validity = ItemValidity(self.trie, self.vocab)  # invalid itemic tokens of unconstrained decoding
        self.constraint = self._constraint()
        self._load_inputs()  # before anything starts: bad data stops the run in seconds

        r, p = cfg.rollout, cfg.actor.parallel
        plan = engine_plan(cfg, external_rollouts=rollouts is not None)
        world, engines, teachers = plan.actor_ranks, plan.engines, plan.teachers
        self.evaluates_on_rollouts = plan.evaluator == "rollout"
        check_engine_devices(cfg, plan)
        self._owns_ray = init_ray(cfg.ray, world + len(engines) + 1)
        placement = plan_placement(cfg.ray.layout, world, cfg.actor.gpus_per_rank, engines)
        self.pg = ray.util.placement_group(placement.bundles, strategy="PACK")
        wait_for_placement(self.pg, role_needs(world, cfg.actor.gpus_per_rank, engines),
                           int(sum(b["CPU"] for b in placement.bundles)), cfg.ray.placement_timeout_s)
        nodes = set(ray.util.placement_group_table(self.pg)["bundles_to_node_id"].values())
        log.info("placement: %d actor rank(s), %d inference engine(s) on %d node(s) (ray.layout=%s)", world,
                 len(engines), len(nodes), cfg.ray.layout)

        # Start everything, then wait for all of it: megatron ranks and engines load at the same time.
        spec = ActorSpec(cfg.actor.model, p, cfg.actor.precision, cfg.actor.optim, cfg.actor.pack_length,
                         total_steps=max(cfg.steps * cfg.actor.mini_batches, 1), seed=cfg.seed)
        self.actor = ActorGroup(spec, self.pg, placement.actor, resume, cfg.actor.gpus_per_rank) if world else None

        def engine(name, section, model_dir, catalog, backend=None):
            # vLLM sleeps while the actor trains where it shares the actor's devices (the colocated layout).
            sleep = cfg.ray.layout == "colocated" and name.startswith("rollout/")
            return start_inference_worker(
                self.pg, placement.engines[name], section.gpus, cfg.ray.worker_env, backend or section.backend,
                model_dir, catalog, dtype=section.dtype, seed=cfg.seed,
                tensor_parallel_size=section.tensor_parallel_size, engine_args=section.engine_args, sleep=sleep)

        self.rollouts = [engine(e.name, r, r.model_dir, cfg.data.catalog) for e in engines
                         if e.name.startswith("rollout/")]
        self._started = list(self.rollouts)
        self.rollouts += list(rollouts or [])
        # MOPD teachers score the student's tokens; RFT teachers generate (rollout engines: the rollout settings).
        # The general teacher (OpenOneRec §5.2) is the original Qwen3: scoring only, no itemic vocabulary.
        self.teachers = {}
        for i, path in enumerate(teachers):
            if cfg.algorithm == "mopd" and path == cfg.mopd.general_teacher:
                section = dataclasses.replace(cfg.teachers, tensor_parallel_size=1, engine_args={})
                self.teachers[path] = engine(f"teacher/{i}", section, path, None, backend="plain")
            else:
                section = r if cfg.algorithm == "rft" else cfg.teachers
                self.teachers[path] = engine(f"teacher/{i}", section, path, cfg.data.catalog)
        self.reference = engine("reference", cfg.reference, r.model_dir, None) if plan.reference else None
        self.evaluator = (engine("evaluator", cfg.evaluator, r.model_dir, cfg.data.catalog)
                          if plan.evaluator == "own" else None)
        self._started += [w for w in [*self.teachers.values(), self.reference, self.evaluator] if w is not None]
        workers = list(rollouts or []) + self._started
        wait_for([w.ready.remote() for w in workers], f"inference engines ({len(workers)})")
        self.sync_stats: Dict[str, float] = {}
        if self.actor is not None:
            self.actor.ready()
            self._open_weight_channels("rollout", self.rollouts, r.gpus)
            self.sync_stats = self.sync_weights()  # the rollout starts from the actor's weights (fresh or resumed)
            log.info("weight sync to %d rollout engine(s): %.1f MB in %.2f s", len(self.rollouts),
                     self.sync_stats["sync/bytes"] / 2**20, self.sync_stats["sync/seconds"])
            if self.reference is not None and not resume:  # the reference is the initial policy
                self._open_weight_channels("reference", [self.reference], cfg.reference.gpus)
                self.sync_weights("reference")
            if self.evaluator is not None:
                self._open_weight_channels("evaluator", [self.evaluator], cfg.evaluator.gpus)

    def _load_inputs(self) -> None:
        """What a subclass reads before the engines start (the loop: its prompts and the resume lineage)."""

    def _constraint(self):
        """The catalog trie the actor renormalises item tokens with (rollout.sampling=constrained), else None."""
        if self.cfg.rollout.sampling != "constrained":
            return None
        from megatron_onereason.generation.constrained import ItemicConstraint
        from megatron_onereason.model.qwen3_config import Qwen3Config

        return ItemicConstraint(self.trie, self.vocab, Qwen3Config.from_hf_dir(self.cfg.rollout.model_dir).vocab_size)

    # ------------------------------------------------------------------------------------------- generation
    def params(self, step: int, **overrides) -> GenerationParams:
        """The rollout's generation settings at ``step`` (seeded by it); ``overrides`` replace fields."""
        r = self.cfg.rollout
        constrained = r.sampling == "constrained"  # the one sampling distribution (rl/sampling.py)
        values = dict(thinking=r.thinking, num_traces=r.num_traces, num_items=r.num_items, temperature=r.temperature,
                      item_temperature=r.item_temperature, max_think_tokens=r.max_think_tokens,
                      constrained=constrained, constrain_reasoning=constrained, seed=self.cfg.seed * 100003 + step)
        values.update(overrides)
        return GenerationParams(**values)

    def generate(self, instances: Sequence[RLPrompt], params: GenerationParams, workers=None):
        """Roll out ``instances`` on the rollout engines (contiguous shares, one per replica), in order."""
        import ray

        workers = workers or self.rollouts
        prompts = [i.prompt for i in instances]
        bounds = [round(w * len(prompts) / len(workers)) for w in range(len(workers) + 1)]
        refs = [w.generate.remote(prompts[a:b], params) for w, a, b in zip(workers, bounds, bounds[1:]) if b > a]
        return [o for part in ray.get(refs) for o in part]

    # ------------------------------------------------------------------------------------------- weights
    def _open_weight_channels(self, role: str, workers, engine_gpus: float) -> None:
        import ray

        receivers = ray.get([w.weight_receivers.remote() for w in workers])
        # NCCL needs a GPU per member: the actor's and the engines' own (colocated engines share the actor's).
        nccl = self.cfg.actor.gpus_per_rank > 0 and engine_gpus > 0 and self.cfg.ray.layout == "disaggregated"
        specs, refs = self.actor.open_weight_channels(role, sum(receivers), "nccl" if nccl else "gloo")
        first = 1
        for w, n in zip(workers, receivers):
            refs.append(w.open_weight_channels.remote(specs, first))
            first += n
        wait_for(refs, f"weight-sync channels to {role} ({len(specs)} stage(s) x {sum(receivers)} receiver(s), "
                       f"{specs[0].backend})")

    def sync_weights(self, role: str = "rollout") -> Dict[str, float]:
        """Actor stage leaders broadcast the policy to ``role``'s engines; returns ``sync/*`` metrics."""
        import ray

        workers = {"rollout": self.rollouts, "reference": [self.reference], "evaluator": [self.evaluator]}[role]
        start = time.time()
        sends = self.actor.send_weights(role, self.cfg.ray.sync_bucket_mb * 2**20)
        results = ray.get(sends + [w.receive_weights.remote() for w in workers])
        seconds = time.time() - start
        sent = [s for s in results[: len(sends)] if s is not None]
        nbytes = float(sum(s.bytes for s in sent))
        return {"sync/seconds": seconds, "sync/bytes": nbytes, "sync/buckets": float(sum(s.buckets for s in sent)),
                "sync/gbytes_per_sec": nbytes / 1e9 / max(seconds, 1e-9)}

    def sleep_rollouts(self) -> None:
        """Colocated layout: the rollout engines free their memory while the actor trains (where supported)."""
        import ray

        if self.cfg.ray.layout == "colocated":
            ray.get([w.sleep.remote() for w in self.rollouts])

    def _wake_rollouts(self, tags: Sequence[str]) -> None:
        import ray

        if self.cfg.ray.layout == "colocated":
            ray.get([w.wake_up.remote(list(tags)) for w in self.rollouts])

    def finish_step(self, t_rollout: float, t_train: float) -> Dict[str, float]:
        """Wake the rollout engines, sync the new weights; the step's rollout / train / sync time split."""
        t0 = time.time()
        self._wake_rollouts(["weights"])  # weights first: the sync writes them before the KV cache comes back
        sync = self.sync_weights()
        self._wake_rollouts(["kv_cache"])
        t_sync = time.time() - t0
        total = t_rollout + t_train + t_sync
        return {"time/rollout": t_rollout, "time/train": t_train, "time/sync": t_sync,
                "time_share/rollout": t_rollout / total, "time_share/train": t_train / total,
                "time_share/sync": t_sync / total, **sync}

    # ------------------------------------------------------------------------------------------- actor
    def fitting_trees(self, trees, idx: Sequence[int]) -> List[int]:
        """The trees of ``idx`` that fit one pack (``actor.pack_length``), in order. A longer one (a long prompt with
        the reasoning budget and K items) cannot be trained: it is left out, counted in ``trees_too_long``."""
        kept = trees_within(trees, idx, self.cfg.actor.pack_length)
        if len(kept) < len(idx):
            log.warning("%d of %d rollout trees are longer than actor.pack_length=%d and are not trained (raise "
                        "actor.pack_length or lower rollout.max_think_tokens)", len(idx) - len(kept), len(idx),
                        self.cfg.actor.pack_length)
        return kept

    def packs(self, trees, idx: Sequence[int], instances: Optional[Sequence[RLPrompt]] = None):
        """Tree packs over trees ``idx`` (in order): ``[(TreePack, [tree indices])]``. With constrained sampling
        (and ``instances`` to read the forced begin tokens from) each pack carries the allowed ids of its item
        positions, so the actor scores them under the same renormalised distribution the rollout sampled from."""
        groups = group_into_packs([tree_length(trees[i].tree) for i in idx], self.cfg.actor.pack_length)
        packs = []
        for grp in groups:
            members = [idx[g] for g in grp]
            pack = pack_trees([trees[m].tree for m in members], self.cfg.actor.pack_length)
            if self.constraint is not None and instances is not None:
                pack.item_allowed = item_allowed_ids(pack, [trees[m].tree for m in members],
                                                     [instances[trees[m].prompt_index].domain for m in members],
                                                     self.constraint)
            packs.append((pack, members))
        return packs

    @staticmethod
    def scoring_args(trees, packs):
        """``(packs, trees per pack)`` for a scoring engine's ``tree_logprobs``."""
        return [p for p, _ in packs], [[trees[i].tree for i in members] for _, members in packs]

    def train_minibatches(self, method: str, micro: Sequence, *args) -> Dict[str, float]:
        """``actor.mini_batches`` optimizer steps over ``micro`` (in order); metrics averaged over all of them,
        weighted by their token (GRPO) / trajectory (MOPD) counts."""
        results = [self.actor.train(method, [micro[c] for c in chunk], *args)
                   for chunk in np.array_split(np.arange(len(micro)), min(self.cfg.actor.mini_batches, len(micro)))]
        counts = [r.pop("count", 1.0) for r in results]
        metrics = mean_over_minibatches(results, counts if sum(counts) > 0 else None)
        metrics["optimizer_steps"] = float(len(results))
        return metrics

    def shutdown(self) -> None:
        import ray

        ray.get([w.close.remote() for w in self._started])
        ray.util.remove_placement_group(self.pg)  # ends the actor ranks and engines placed in it
        if self._owns_ray:
            ray.shutdown()
