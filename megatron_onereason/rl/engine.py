"""The actor-rollout RL engine (OneReason §6): GRPO with the two-stage rollout, MOPD, and RFT data selection.

Per GRPO step: sample users → two-stage rollout on the rollout engine (N traces × K item completions, sampled from
the one sampling distribution of ``rollout.sampling``; a beam of K items for the Rollout-Beam rewards) → rewards
R = R_acc × R_div (eqs. 7–9) → group advantages over each user's rollouts (eq. 5) → π_old recomputed by the actor
on tree packs (each trace once), with truncated importance weights π_old/μ against the rollout engine's
sampling-distribution log-probs μ (``grpo.old_logp``, rl/losses.py) → shared-prefix, stage-wise clipped, non-hit
down-weighted loss (eqs. 10–13) in ``actor.mini_batches`` optimizer steps (clipping acts from the second one) →
weight sync actor → rollout. MOPD (eqs. 16–20) routes each prompt to its domain teacher (general-domain prompts to
the plain Qwen3 teacher, with OpenOneRec's itemic penalty), scores only the student's sampled tokens, filters by
information gain and trains with truncated IS weights. RFT samples the domain teachers, keeps verified hits that
pass the reasoning filters (eq. 14, rl/rft.py) and writes chat SFT data.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from megatron_onereason.eval.benchmark import TaskInstance, load_benchmark, task_instances, task_messages
from megatron_onereason.eval.rec_eval import completion_item_id, ranked_item_ids, rec_metrics
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.generation.prompts import chat_prompt_ids
from megatron_onereason.config import to_dict
from megatron_onereason.metrics_log import MetricsLogger, format_eta
from megatron_onereason.rl.actor import ActorSpec, GRPOMicroBatch, MOPDMicroBatch
from megatron_onereason.rl.advantages import group_advantages
from megatron_onereason.rl.config import RayLayout, RLConfig
from megatron_onereason.rl.distill import (
    check_teacher_vocabulary,
    general_itemic_penalty,
    information_gain_filter,
    information_gain_scores,
    itemic_token_mask,
    load_general_prompts,
    mopd_advantages,
    route_to_teachers,
    teacher_input_ids,
)
from megatron_onereason.rl.lineage import (
    EngineState,
    catalog_fingerprint,
    check_catalog,
    read_engine_state,
    write_engine_state,
)
from megatron_onereason.rl.losses import hit_sample_weights, importance_weights
from megatron_onereason.rl.metrics import (
    ItemValidity,
    importance_weight_stats,
    logprob_gap_stats,
    mean_over_minibatches,
)
from megatron_onereason.rl.rewards import BEAM_REWARDS, two_stage_rewards
from megatron_onereason.rl.rollout_batch import (
    group_into_packs,
    pad_stack,
    predicted_codes,
    rollout_trees,
    split_layout,
    target_codes,
    tree_length,
)
from megatron_onereason.rl.sampling import item_allowed_ids
from megatron_onereason.rl.tree_pack import pack_trees, tree_logprobs_layout
from megatron_onereason.rl.workers import (
    ActorGroup,
    EngineSpec,
    plan_placement,
    start_inference_worker,
    wait_for,
)
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab
from megatron_onereason.training.checkpointing import has_checkpoint

log = logging.getLogger("megatron_onereason.rl")


# Settings an engine reads every step (RLEngine.reconfigure may change them); the rest shape the engines it starts.
_PER_STEP_SETTINGS = ("steps", "seed", "eval_interval", "eval_k", "metrics_jsonl", "tensorboard_dir", "grpo", "rft",
                      "actor.mini_batches", "rollout.num_traces", "rollout.num_items", "rollout.temperature",
                      "rollout.item_temperature", "rollout.max_think_tokens", "rollout.sampling",
                      "data.prompts_per_step")


def _config_differences(a, b, prefix: str = "") -> set:
    """Dotted names of the settings that differ between two ``to_dict`` configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {d for k in set(a) | set(b) for d in _config_differences(a.get(k), b.get(k), f"{prefix}{k}.")}
    return set() if a == b else {prefix.rstrip(".")}


class GeneralInstance(NamedTuple):
    """A general-domain MOPD prompt (data.general_prompts): chat messages, no domain, no target."""

    messages: List[Dict[str, str]]
    domain: Optional[str] = None
    task: str = "general"


def _flat_tokens(lay, trace_old, child_old, child_mask, renormalised: bool):
    """The trained tokens of one pack as flat ``(π_old, rollout, μ, is_item)`` vectors. ``rollout`` is what the
    rollout engine computed for the distribution the actor scored: the raw policy, except at item tokens the actor
    renormalises over the trie (``renormalised``), where it is μ (the same renormalisation)."""
    t, c = lay.trace_mask, child_mask
    child_rollout = lay.child_behaviour_logp if renormalised else lay.child_rollout_logp
    return (torch.cat([trace_old[t], child_old[c]]).float(),
            torch.cat([lay.trace_rollout_logp[t], child_rollout[c]]).float(),
            torch.cat([lay.trace_behaviour_logp[t], lay.child_behaviour_logp[c]]).float(),
            torch.cat([torch.zeros(int(t.sum()), dtype=torch.bool), torch.ones(int(c.sum()), dtype=torch.bool)]))


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
        ray.init(address=r.address, include_dashboard=False, log_to_driver=r.log_to_driver)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        log.info("Ray cluster: %d node(s), resources %s", len(nodes), ray.cluster_resources())
    else:
        ray.init(address="local", num_cpus=r.num_cpus or local_cpus, include_dashboard=False,
                 log_to_driver=r.log_to_driver)
    return True


class RLEngine:
    def __init__(self, cfg: RLConfig, rollouts: Optional[Sequence] = None):
        """``rollouts``: running rollout engines (:class:`~megatron_onereason.rl.workers.InferenceWorker` handles
        serving ``rollout.model_dir``) to use instead of starting ``rollout.replicas`` new ones — e.g. one vLLM
        engine kept across several runs; they get this run's weights at start and are left running at shutdown."""
        import ray
        from transformers import AutoTokenizer

        cfg.check_model_dirs()
        self.cfg = cfg
        self.catalog = ItemCatalog.load(cfg.data.catalog)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.rollout.model_dir)
        self.vocab = ItemicVocab.load(cfg.rollout.model_dir)
        self.scheme = self.vocab.scheme
        self.trie = ItemTrie.from_catalog(self.catalog, self.scheme)
        self.item_validity = ItemValidity(self.trie, self.vocab)  # invalid itemic tokens of unconstrained decoding
        self.constraint = self._constraint()
        self.general: List[List[Dict[str, str]]] = []  # MOPD general-domain prompts (OpenOneRec §5.2)
        if cfg.algorithm == "mopd" and cfg.data.general_prompts:
            general = load_general_prompts(cfg.data.general_prompts, self.scheme)
            self.general = general.prompts
            log.info("%s: %d general-domain prompts (skipped: %s)", cfg.data.general_prompts, len(self.general),
                     general.skipped)
            teacher_tokenizer = AutoTokenizer.from_pretrained(cfg.mopd.general_teacher)
            check_teacher_vocabulary(self.tokenizer.get_vocab(), teacher_tokenizer.get_vocab(), self.vocab,
                                     cfg.mopd.general_teacher)
            self._teacher_pad_id = teacher_tokenizer.pad_token_id or 0
        self.train_set = self._instances(cfg.data.benchmark, cfg.data.tasks)
        # Recall@K is a recommendation metric: held-out users are scored on their rec instances only.
        self.eval_set = self._instances(cfg.data.eval_benchmark, ("rec",)) if cfg.data.eval_benchmark else []
        resume = cfg.save if has_checkpoint(cfg.save) else None
        self.step = 0
        if resume:  # the engine state the actor checkpoint's tracker commits (rl/lineage.py)
            state = read_engine_state(resume)
            check_catalog(state, self.catalog, cfg.data.catalog, resume)
            self.step = state.step

        r, p = cfg.rollout, cfg.actor.parallel
        trains = cfg.algorithm != "rft"  # RFT only samples the teachers
        teachers = sorted(set(cfg.mopd.teachers.values()) | ({cfg.mopd.general_teacher} - {None}))
        if cfg.algorithm == "grpo":
            teachers = []
        with_reference = cfg.grpo.kl_coef > 0 and cfg.algorithm == "grpo"
        # Recall@K ranks items by beam search, which the vLLM backend does not do: a HF evaluator gets the weights.
        with_evaluator = trains and bool(cfg.eval_interval) and r.backend != "hf"
        own_rollouts = 0 if rollouts is not None or not trains else r.replicas
        engines = [EngineSpec(f"rollout/{i}", r.gpus) for i in range(own_rollouts)]
        engines += [EngineSpec(f"teacher/{i}", (r if cfg.algorithm == "rft" else cfg.teachers).gpus)
                    for i in range(len(teachers))]
        engines += [EngineSpec("reference", cfg.reference.gpus)] if with_reference else []
        engines += [EngineSpec("evaluator", cfg.evaluator.gpus)] if with_evaluator else []
        world = (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * cfg.actor.data_parallel_size
                 if trains else 0)
        self._owns_ray = init_ray(cfg.ray, world + len(engines) + 1)
        placement = plan_placement(cfg.ray.layout, world, cfg.actor.gpus_per_rank, engines)
        self.pg = ray.util.placement_group(placement.bundles, strategy="PACK")
        wait_for([self.pg.ready()], f"placement group of {len(placement.bundles)} bundles {placement.bundles}")
        nodes = set(ray.util.placement_group_table(self.pg)["bundles_to_node_id"].values())
        log.info("placement: %d actor rank(s), %d inference engine(s) on %d node(s) (ray.layout=%s)", world,
                 len(engines), len(nodes), cfg.ray.layout)

        # Start everything, then wait for all of it: megatron ranks and engines load at the same time.
        spec = ActorSpec(cfg.actor.model, p, cfg.actor.precision, cfg.actor.optim, cfg.actor.pack_length,
                         total_steps=max(cfg.steps * cfg.actor.mini_batches, 1), seed=cfg.seed)
        self.actor = (ActorGroup(spec, self.pg, placement.actor, resume, cfg.actor.gpus_per_rank) if trains
                      else None)

        def engine(name, section, model_dir, catalog):
            # vLLM sleeps while the actor trains where it shares the actor's devices (the colocated layout).
            sleep = cfg.ray.layout == "colocated" and name.startswith("rollout/")
            return start_inference_worker(
                self.pg, placement.engines[name], section.gpus, cfg.ray.worker_env, section.backend, model_dir,
                catalog, dtype=section.dtype, seed=cfg.seed, tensor_parallel_size=section.tensor_parallel_size,
                engine_args=section.engine_args, sleep=sleep)

        self.rollouts = [engine(f"rollout/{i}", r, r.model_dir, cfg.data.catalog) for i in range(own_rollouts)]
        self._started = list(self.rollouts)
        self.rollouts += list(rollouts or [])
        # MOPD teachers score the student's tokens; RFT teachers generate (rollout engines: the rollout settings).
        # The general teacher (OpenOneRec §5.2) is the original Qwen3: scoring only, no itemic vocabulary.
        self.teachers = {}
        for i, path in enumerate(teachers):
            section = r if cfg.algorithm == "rft" else cfg.teachers
            if cfg.algorithm == "mopd" and path == cfg.mopd.general_teacher:
                section = dataclasses.replace(cfg.teachers, backend="plain", tensor_parallel_size=1, engine_args={})
            self.teachers[path] = engine(f"teacher/{i}", section, path, cfg.data.catalog)
        self.reference = engine("reference", cfg.reference, r.model_dir, None) if with_reference else None
        self.evaluator = engine("evaluator", cfg.evaluator, r.model_dir, cfg.data.catalog) if with_evaluator else None
        self._evaluator_step: Optional[int] = None  # the step whose weights the evaluator holds
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
        self.logger = MetricsLogger(cfg.tensorboard_dir, cfg.metrics_jsonl)

    # ------------------------------------------------------------------------------------------- data
    def _instances(self, path: str, tasks: Sequence[str]) -> List[TaskInstance]:
        """The instances of ``tasks`` (data.tasks: R3 ``rec``, R2 ``evolution`` for Mix-RL) in ``path``."""
        instances = task_instances(load_benchmark(path, self.catalog), tasks, self.cfg.data.domains)
        if not instances:
            raise ValueError(f"{path}: no instance of tasks {list(tasks)} for domains {self.cfg.data.domains}")
        return instances

    def _prompt(self, instance: TaskInstance) -> Prompt:
        messages = (instance.messages if instance.task == "general"
                    else task_messages(instance, self.catalog, self.scheme))
        ids = chat_prompt_ids(self.tokenizer, messages, self.cfg.rollout.thinking)
        return Prompt(tuple(ids), instance.domain)

    def _constraint(self):
        """The catalog trie the actor renormalises item tokens with (rollout.sampling=constrained), else None."""
        if self.cfg.rollout.sampling != "constrained":
            return None
        from megatron_onereason.generation.constrained import ItemicConstraint
        from megatron_onereason.model.qwen3_config import Qwen3Config

        return ItemicConstraint(self.trie, self.vocab, Qwen3Config.from_hf_dir(self.cfg.rollout.model_dir).vocab_size)

    def reconfigure(self, cfg: RLConfig) -> None:
        """Continue with ``cfg``, which may differ from the running config only in per-step settings (the reward,
        clipping, sampling, rollout sizes, mini-batches, steps): a fresh run from step 0 on the engines already
        started — with the policy where the previous run left it (for smoke runs of several variants; comparisons
        start each variant from the same weights in its own engine)."""
        differ = _config_differences(to_dict(self.cfg), to_dict(cfg)) - set(_PER_STEP_SETTINGS)
        differ = {d for d in differ if not any(d.startswith(p + ".") for p in _PER_STEP_SETTINGS)}
        if (cfg.grpo.kl_coef > 0) != (self.cfg.grpo.kl_coef > 0):
            differ.add("grpo.kl_coef (the reference engine)")
        if differ or cfg.save:
            raise ValueError(f"reconfigure: {sorted(differ) or ['save']} need a new engine (only per-step settings "
                             "may change, and nothing is saved)")
        self.logger.close()
        self.cfg, self.step = cfg, 0
        self.constraint = self._constraint()
        self.logger = MetricsLogger(cfg.tensorboard_dir, cfg.metrics_jsonl)

    def batch_for_step(self, step: int) -> List[TaskInstance]:
        """Deterministic in (seed, step), so a resumed run samples what the uninterrupted one would have."""
        rng = np.random.default_rng([self.cfg.seed, step])
        n = min(self.cfg.data.prompts_per_step, len(self.train_set))
        return [self.train_set[i] for i in rng.choice(len(self.train_set), size=n, replace=False)]

    def _params(self, step: int, **overrides) -> GenerationParams:
        r = self.cfg.rollout
        constrained = r.sampling == "constrained"  # the one sampling distribution (rl/sampling.py)
        values = dict(thinking=r.thinking, num_traces=r.num_traces, num_items=r.num_items, temperature=r.temperature,
                      item_temperature=r.item_temperature, max_think_tokens=r.max_think_tokens,
                      constrained=constrained, constrain_reasoning=constrained, seed=self.cfg.seed * 100003 + step)
        values.update(overrides)
        return GenerationParams(**values)

    def generate(self, instances: Sequence[TaskInstance], params: GenerationParams, workers=None):
        """Roll out ``instances`` on the rollout engines (contiguous shares, one per replica), in order."""
        import ray

        workers = workers or self.rollouts
        prompts = [self._prompt(i) for i in instances]
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

    def _sleep_rollouts(self) -> None:
        """Colocated layout: the rollout engines free their memory while the actor trains (where supported)."""
        import ray

        if self.cfg.ray.layout == "colocated":
            ray.get([w.sleep.remote() for w in self.rollouts])

    def _wake_rollouts(self, tags: Sequence[str]) -> None:
        import ray

        if self.cfg.ray.layout == "colocated":
            ray.get([w.wake_up.remote(list(tags)) for w in self.rollouts])

    @staticmethod
    def _scoring_args(trees, packs):
        """``(packs, trees per pack)`` for a scoring engine's ``tree_logprobs``."""
        return [p for p, _ in packs], [[trees[i].tree for i in members] for _, members in packs]

    # ------------------------------------------------------------------------------------------- GRPO
    def _packs(self, trees, idx: Sequence[int], instances: Optional[Sequence[TaskInstance]] = None):
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

    def _train_minibatches(self, method: str, micro: Sequence, *args) -> Dict[str, float]:
        """``actor.mini_batches`` optimizer steps over ``micro`` (in order); metrics averaged over all of them,
        weighted by their token (GRPO) / trajectory (MOPD) counts."""
        results = [self.actor.train(method, [micro[c] for c in chunk], *args)
                   for chunk in np.array_split(np.arange(len(micro)), min(self.cfg.actor.mini_batches, len(micro)))]
        counts = [r.pop("count", 1.0) for r in results]
        metrics = mean_over_minibatches(results, counts if sum(counts) > 0 else None)
        metrics["optimizer_steps"] = float(len(results))
        return metrics

    def _grpo_advantages(self, rewards, beam: bool) -> torch.Tensor:
        """Eq. 5 per user. Sampled items: over the user's N×K rollouts. A beam (Rollout-Beam rewards): over the
        user's N reasoning traces — the trace is the rollout, its K beam items one deterministic search."""
        u, n, k = rewards.reward.shape
        if beam:
            per_trace = group_advantages(rewards.reward[..., 0].reshape(-1).double(),
                                         torch.arange(u).repeat_interleave(n))
            return per_trace.reshape(u, n, 1).expand(u, n, k).float()
        groups = torch.arange(u).repeat_interleave(n * k)
        return group_advantages(rewards.reward.reshape(-1).double(), groups).reshape(u, n, k).float()

    def grpo_step(self, step: int) -> Dict[str, float]:
        import ray

        g = self.cfg.grpo
        beam = g.reward in BEAM_REWARDS  # OneRec-Think eq. 7: stage 2 is a beam search of width K
        t0 = time.time()
        instances = self.batch_for_step(step)
        outputs = self.generate(instances, self._params(step, item_strategy="beam" if beam else "sample"))
        t_rollout = time.time() - t0
        self._sleep_rollouts()
        codes = predicted_codes(outputs, self.catalog)
        rewards = two_stage_rewards(codes, target_codes([i.targets for i in instances], self.catalog),
                                    diversity=g.diversity, accuracy=g.reward)
        u, n, k = rewards.reward.shape
        advantages = self._grpo_advantages(rewards, beam)
        weights = hit_sample_weights(rewards.hit, g.nonhit_weight)
        keep_user = [not g.dynamic_sampling or bool(rewards.reward[i].std() > 0) for i in range(u)]
        trees = rollout_trees(outputs)
        idx = [t for t, tree in enumerate(trees) if keep_user[tree.prompt_index]]
        completions = [c.token_ids for o in outputs for t in o.traces for c in t.completions]
        metrics = {
            "reward": rewards.reward.float().mean().item(), "hit_rate": rewards.hit.float().mean().item(),
            "diversity": rewards.diversity.float().mean().item(), "users_kept": float(sum(keep_user)),
            "rollout_traces": float(sum(len(o.traces) for o in outputs)),
            "rollout_item_completions": float(u * n * k),
            "generated_tokens": float(sum(o.generated_tokens for o in outputs)),
            "independent_rollout_tokens": float(sum(o.independent_rollout_tokens for o in outputs)),
            **self.item_validity.rates(completions),  # Fig. 16: invalid itemic tokens (0 under the constraint)
        }
        t1 = time.time()
        if idx:
            packs = self._packs(trees, idx, instances)
            metrics["actor_packs"] = float(len(packs))
            recompute = g.old_logp == "recompute"
            old = self.actor.logprobs([p for p, _ in packs]) if recompute else None
            ref = (ray.get(self.reference.tree_logprobs.remote(*self._scoring_args(trees, packs))) if self.reference
                   else None)
            micro, flat = [], []
            for j, (pack, members) in enumerate(packs):
                lay = split_layout(trees, members)
                child_mask = torch.zeros_like(lay.child_mask) if beam else lay.child_mask  # beam items: no samples
                if recompute:
                    trace_old, child_old = tree_logprobs_layout(old[j], pack)
                else:  # π_old = μ: the rollout engine's sampling-distribution log-probs
                    trace_old, child_old = lay.trace_behaviour_logp, lay.child_behaviour_logp
                is_w = (None, None)
                if recompute and g.is_high is not None:
                    is_w = tuple(importance_weights(o, b, m, g.is_low, g.is_high)[0] for o, b, m in (
                        (trace_old, lay.trace_behaviour_logp, lay.trace_mask),
                        (child_old, lay.child_behaviour_logp, child_mask)))
                flat.append(_flat_tokens(lay, trace_old, child_old, child_mask, pack.item_allowed is not None))
                tr = [(trees[m].prompt_index, trees[m].trace_index) for m in members]
                ref_layout = tree_logprobs_layout(ref[j], pack) if ref else (None, None)
                micro.append(GRPOMicroBatch(pack, lay.trace_mask, child_mask, trace_old, child_old,
                                            torch.stack([advantages[a, b] for a, b in tr]),
                                            torch.stack([weights[a, b] for a, b in tr]), *ref_layout, *is_w))
            metrics.update(self._behaviour_metrics(flat, recompute, g))
            train = self._train_minibatches("train_grpo", micro, g.clip_cot, g.clip_item, g.kl_coef,
                                            g.kl_estimator)
            metrics.update({f"train/{k}": v for k, v in train.items()})
        metrics.update(self._finish_step(t_rollout, time.time() - t1))
        metrics["rollout_tokens_per_sec"] = metrics["generated_tokens"] / max(t_rollout, 1e-9)
        return metrics

    @staticmethod
    def _behaviour_metrics(flat, recompute: bool, g) -> Dict[str, float]:
        """Actor–rollout agreement and the importance weights of the step, over the trained tokens."""
        old, raw, behaviour, item = (torch.cat([f[i] for f in flat])[None] for i in range(4))
        mask = torch.ones_like(item)
        # π_old vs the rollout engine's log-probs of the same distribution: the weight sync (0 up to numerics); vs μ:
        # what the importance weights correct (temperature, masks the actor does not apply).
        out = {"train_rollout_logprob_abs_diff": (old - raw).abs().mean().item() if old.numel() else 0.0}
        if old.numel():
            out.update({f"behaviour/{k}": v for k, v in logprob_gap_stats(old, behaviour, mask, item).items()})
            if recompute and g.is_high is not None:
                w, ratio = importance_weights(old, behaviour, mask, g.is_low, g.is_high)
                out.update(importance_weight_stats(w, ratio, mask))
        return out

    def _finish_step(self, t_rollout: float, t_train: float) -> Dict[str, float]:
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

    # ------------------------------------------------------------------------------------------- MOPD
    def _teacher_for(self, instance) -> str:
        """A recommendation prompt goes to its domain's teacher; a general-domain prompt to the general teacher."""
        if instance.task == "general":
            return self.cfg.mopd.general_teacher
        teacher = self.cfg.mopd.teachers.get(instance.domain)
        if teacher is None:
            raise ValueError(f"no MOPD teacher for domain {instance.domain!r} of a {instance.task} prompt "
                             f"(mopd.teachers has {sorted(self.cfg.mopd.teachers)}; the general teacher takes "
                             "data.general_prompts only)")
        return teacher

    def _mopd_batch(self, step: int) -> List:
        """The step's recommendation prompts, then (with data.general_prompts) its general-domain prompts."""
        batch = self.batch_for_step(step)
        if self.general:
            rng = np.random.default_rng([self.cfg.seed, step, 1])
            n = min(self.cfg.data.general_prompts_per_step, len(self.general))
            batch += [GeneralInstance(self.general[i]) for i in rng.choice(len(self.general), size=n, replace=False)]
        return batch

    def mopd_step(self, step: int) -> Dict[str, float]:
        import ray

        m = self.cfg.mopd
        t0 = time.time()
        instances = self._mopd_batch(step)
        outputs = self.generate(instances, self._params(step, num_items=1))
        t_rollout = time.time() - t0
        self._sleep_rollouts()
        t1 = time.time()
        trees = rollout_trees(outputs)
        general = [instances[t.prompt_index].task == "general" for t in trees]
        teacher_of = [self._teacher_for(instances[t.prompt_index]) for t in trees]
        # Per tree: (trace part, item part) of the teacher's and the student's log-probs of the sampled tokens.
        teacher_lp: Dict[int, tuple] = {}
        student_lp: Dict[int, tuple] = {}
        for teacher, members in route_to_teachers(teacher_of, {p: p for p in self.teachers}).items():
            # Student and teacher score the sampled tokens under the rollout's sampling distribution (item tokens
            # renormalised over the trie when constrained, rl/sampling.py), so eq. 16 compares like with like.
            packs = self._packs(trees, members.tolist(), instances)
            plain = teacher == m.general_teacher  # no itemic vocabulary: it reads itemic ids as padding
            scored, trees_of = self._scoring_args(trees, packs)
            t_lp = ray.get(self.teachers[teacher].tree_logprobs.remote(
                [self._plain_teacher_pack(p) for p in scored] if plain else scored, trees_of))
            s_lp = self.actor.logprobs([p for p, _ in packs])
            for j, (pack, mem) in enumerate(packs):
                for lp, out in ((t_lp[j], teacher_lp), (s_lp[j], student_lp)):
                    trace, child = tree_logprobs_layout(lp, pack)
                    for r, i in enumerate(mem):
                        out[i] = (trace[r, : len(trees[i].trace_mask)], child[r, 0, : trees[i].child_mask.shape[1]])
        adv, masks, gaps, scores = {}, {}, [], []
        for i, t in enumerate(trees):
            # A general prompt's rollout is its reasoning: the item stage after it is not a general-domain answer.
            child_mask = torch.zeros_like(t.child_mask[0]) if general[i] else t.child_mask[0]
            mask = torch.cat([t.trace_mask, child_mask])[None]
            tokens = torch.tensor(list(t.tree.trace) + list(t.tree.children[0]))[None]
            # OpenOneRec §5.2: itemic tokens in a general-domain rollout get log-prob −1e9, the rollout ends there.
            teacher, keep = general_itemic_penalty(torch.cat(teacher_lp[i])[None], itemic_token_mask(tokens, self.vocab),
                                                   torch.tensor([general[i]]))
            student = torch.cat(student_lp[i])[None]
            mask = mask & keep
            a = mopd_advantages(teacher, student, mask, clip=m.adv_clip)
            adv[i], masks[i] = a[0], mask[0]
            gaps.append((student - teacher).abs()[mask])
            scores.append(information_gain_scores(a, mask)[0])
        kept = information_gain_filter(torch.stack(scores), m.rho).tolist()

        def layout(parts: Dict[int, torch.Tensor], members, fill):
            """Tree rows in the pack's ``[trace | item]`` layout (as ``MegatronActor.train_mopd`` builds it)."""
            split = [(parts[i][: len(trees[i].trace_mask)], parts[i][len(trees[i].trace_mask):]) for i in members]
            return torch.cat([pad_stack([a for a, _ in split], fill), pad_stack([b for _, b in split], fill)], dim=1)

        # μ of eq. 17: the student's sampling distribution in the inference engine.
        behaviour = {i: torch.cat([t.trace_behaviour_logp, t.child_behaviour_logp[0]]) for i, t in enumerate(trees)}
        micro = [MOPDMicroBatch(pack, layout(masks, mem, False), layout(adv, mem, 0.0), layout(behaviour, mem, 0.0))
                 for pack, mem in self._packs(trees, kept, instances)]
        train = self._train_minibatches("train_mopd", micro, m.is_low, m.is_high)
        t_train = time.time() - t1
        student_all = torch.cat([torch.cat(student_lp[i])[masks[i]] for i in range(len(trees))])
        # The rollout's log-probs of the distribution the student scored (as _flat_tokens does for GRPO): item
        # tokens renormalised over the trie (μ) when constrained, the raw policy otherwise.
        renormalised = self.constraint is not None
        raw_all = torch.cat([torch.cat([t.trace_rollout_logp, (t.child_behaviour_logp if renormalised
                                                                else t.child_rollout_logp)[0]])[masks[i]]
                             for i, t in enumerate(trees)])
        gap = torch.cat(gaps)
        metrics = {"student_teacher_logp_abs_gap": gap.mean().item() if gap.numel() else 0.0,
                   "ig_kept_share": len(kept) / len(trees), "general_prompts": float(sum(general)),
                   "train_rollout_logprob_abs_diff": (student_all - raw_all).abs().mean().item(),
                   **{f"behaviour/{k}": v for k, v in logprob_gap_stats(
                       student_all[None], torch.cat([behaviour[i][masks[i]] for i in range(len(trees))])[None],
                       torch.ones(1, student_all.numel(), dtype=torch.bool)).items()},
                   **self._finish_step(t_rollout, t_train)}
        metrics.update({f"train/{k}": v for k, v in train.items()})
        return metrics

    def _plain_teacher_pack(self, pack):
        """``pack`` as the plain general teacher reads it: itemic ids (inputs and labels) replaced by padding."""
        return dataclasses.replace(pack, item_allowed=None,
                                   tokens=teacher_input_ids(pack.tokens, itemic_token_mask(pack.tokens, self.vocab),
                                                            self._teacher_pad_id),
                                   labels=teacher_input_ids(pack.labels, itemic_token_mask(pack.labels, self.vocab),
                                                            self._teacher_pad_id))

    # ------------------------------------------------------------------------------------------- RFT
    def rft_dataset(self, out_path: str) -> Dict[str, float]:
        """Sample every domain teacher on its users, keep verified hits that pass the reasoning filters (eq. 14,
        ``rft`` section), write chat SFT JSONL; the drop count of every filter is in the returned stats."""
        from megatron_onereason.rl.rft import select_rft_trajectories

        samples, hits = [], []
        for domain, teacher in sorted(self.cfg.mopd.teachers.items()):
            users = [i for i in self.train_set if i.domain == domain]
            if not users:
                continue
            outputs = self.generate(users, self._params(0), [self.teachers[teacher]])
            for inst, out in zip(users, outputs):
                targets = set(inst.targets)
                history = [(self.catalog.domain_for(i), self.catalog.codes_for(i)) for i in inst.user.history]
                for trace in out.traces:
                    reasoning = self._reasoning_only(self.tokenizer.decode(trace.token_ids))
                    for c in trace.completions:
                        answer = self.tokenizer.decode(c.token_ids)
                        think = f"<think>\n{reasoning}\n</think>\n\n" if self.cfg.rollout.thinking else ""
                        samples.append({"user_id": inst.user.user_id, "domain": domain,
                                        "messages": task_messages(inst, self.catalog, self.scheme),
                                        "response": think + answer, "answer": answer, "reasoning": reasoning,
                                        "closed_by_model": trace.closed_by_model,
                                        "reasoning_tokens": sum(trace.sampled), "history": history})
                        hits.append(completion_item_id(self.catalog, c) in targets)
        legal = {(d, tuple(int(x) for x in codes)) for d, codes in zip(self.catalog.domains, self.catalog.codes)}
        selection = select_rft_trajectories(samples, hits, dedupe=True, legal_items=legal, filters=self.cfg.rft,
                                            scheme=self.scheme)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            for s in selection.kept:
                turn = {"role": "assistant", "content": s["answer"]}
                if self.cfg.rollout.thinking:
                    turn["reasoning"] = s["reasoning"]
                f.write(json.dumps({"messages": s["messages"] + [turn], "source": f"rft/{s['domain']}"}) + "\n")
        os.replace(tmp, out_path)
        stats = {"rft_samples": float(len(samples)), "rft_kept": float(len(selection.kept)),
                 **{f"rft_dropped/{k}": float(v) for k, v in selection.dropped.items()}}
        log.info("RFT: kept %d of %d teacher samples (%s) -> %s", len(selection.kept), len(samples),
                 selection.dropped, out_path)
        return stats

    def _reasoning_only(self, trace_text: str) -> str:
        return trace_text.split("</think>")[0].strip() if self.cfg.rollout.thinking else ""

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, instances: Optional[Sequence[TaskInstance]] = None) -> Dict[str, float]:
        """Recall@K / Pass@K on held-out users: one greedy trace, beam search of width K over items (on the HF
        evaluator, synced to the current policy first, when the rollout engines are vLLM)."""
        instances = list(instances or self.eval_set or self.train_set)
        k = self.cfg.eval_k
        # Items always from the catalog trie, whatever rollout.sampling: Recall@K ranks catalog items (§6.1 evaluates
        # with constrained beam search), so the unconstrained ablation is compared on the same metric.
        params = self._params(0, num_items=k, num_traces=1, item_strategy="beam", temperature=0.0, constrained=True)
        workers = None
        if self.evaluator is not None:
            if self._evaluator_step != self.step:
                self.sync_weights("evaluator")
                self._evaluator_step = self.step
            workers = [self.evaluator]
        outputs = self.generate(instances, params, workers)
        scores = [rec_metrics(ranked_item_ids(o, self.catalog), i.targets, [k]) for o, i in zip(outputs, instances)]
        return {f"eval/{name}": float(np.mean([s[name] for s in scores])) for name in scores[0]}

    # ------------------------------------------------------------------------------------------- loop
    def save(self) -> None:
        if not self.cfg.save:
            return
        # The engine state of the iteration first, then the actor checkpoint, whose tracker commits both.
        iteration = self.actor.call("checkpoint_iteration")[0]
        write_engine_state(self.cfg.save, iteration, EngineState(self.step, catalog_fingerprint(self.catalog),
                                                                 os.path.abspath(self.cfg.data.catalog)))
        self.actor.call("save", self.cfg.save)

    def run(self) -> List[Dict[str, float]]:
        cfg = self.cfg
        history = []
        if cfg.algorithm == "rft":
            stats = self.rft_dataset(cfg.rft_output or "rft.jsonl")
            self.logger.log(0, stats)
            return [stats]
        step_fn = self.grpo_step if cfg.algorithm == "grpo" else self.mopd_step
        start, start_step = time.time(), self.step
        while self.step < cfg.steps:
            metrics = step_fn(self.step)
            self.step += 1
            if cfg.eval_interval and (self.step % cfg.eval_interval == 0 or self.step == cfg.steps):
                metrics.update(self.evaluate())
            self.logger.log(self.step, metrics)
            history.append({"step": self.step, **metrics})
            rate = (time.time() - start) / (self.step - start_step)
            log.info("step %d/%d | %s | ETA %s", self.step, cfg.steps, " | ".join(
                f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and not k.startswith("time/")
                and k in ("reward", "hit_rate", "student_teacher_logp_abs_gap", "train_rollout_logprob_abs_diff",
                          "eval/recall@%d" % cfg.eval_k, "train/loss")), format_eta(rate * (cfg.steps - self.step)))
            if cfg.save_interval and self.step % cfg.save_interval == 0:
                self.save()
        if cfg.save and (not cfg.save_interval or self.step % cfg.save_interval):
            self.save()
        self.logger.close()
        return history

    def shutdown(self) -> None:
        import ray

        ray.get([w.close.remote() for w in self._started])
        ray.util.remove_placement_group(self.pg)  # ends the actor ranks and engines placed in it
        if self._owns_ray:
            ray.shutdown()
