"""The actor-rollout RL engine (OneReason §6): GRPO with the two-stage rollout, MOPD, and RFT data selection.

Per GRPO step: sample users → two-stage rollout on the rollout engine (N traces × K constrained item completions)
→ rewards R = R_rule × R_div (eqs. 7–9) → group advantages over each user's N×K rollouts (eq. 5) → old log-probs
recomputed by the actor on tree packs (each trace once) → shared-prefix, stage-wise clipped, non-hit
down-weighted loss (eqs. 10–13) → weight sync actor → rollout. MOPD (eqs. 16–20) routes each prompt to its
domain teacher, scores only the student's sampled tokens, filters by information gain and trains with truncated
IS weights. RFT samples the domain teachers, keeps verified hits (eq. 14) and writes chat SFT data.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron_onereason.eval.benchmark import RecInstance, load_benchmark, rec_instances, rec_messages
from megatron_onereason.eval.rec_eval import completion_item_id, ranked_item_ids, rec_metrics
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.generation.prompts import chat_prompt_ids
from megatron_onereason.metrics_log import MetricsLogger, format_eta
from megatron_onereason.rl.actor import ActorSpec, GRPOMicroBatch, MOPDMicroBatch
from megatron_onereason.rl.advantages import group_advantages
from megatron_onereason.rl.config import RayLayout, RLConfig
from megatron_onereason.rl.distill import (
    information_gain_filter,
    information_gain_scores,
    itemic_penalty,
    itemic_token_mask,
    mopd_advantages,
    route_to_teachers,
)
from megatron_onereason.rl.losses import hit_sample_weights
from megatron_onereason.rl.rewards import two_stage_rewards
from megatron_onereason.rl.rollout_batch import (
    group_into_packs,
    pad_stack,
    predicted_codes,
    rollout_trees,
    split_layout,
    target_codes,
    tree_length,
)
from megatron_onereason.rl.tree_pack import pack_trees, tree_logprobs_layout
from megatron_onereason.rl.workers import (
    ActorGroup,
    EngineSpec,
    plan_placement,
    start_inference_worker,
    wait_for,
)
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.training.checkpointing import has_checkpoint

log = logging.getLogger("megatron_onereason.rl")
ENGINE_STATE = "rl_engine_state.json"


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

        self.cfg = cfg
        self.catalog = ItemCatalog.load(cfg.data.catalog)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.rollout.model_dir)
        self.train_set = self._instances(cfg.data.benchmark)
        self.eval_set = self._instances(cfg.data.eval_benchmark) if cfg.data.eval_benchmark else []
        resume = cfg.save if has_checkpoint(cfg.save) else None
        self.step = 0
        if resume:
            with open(os.path.join(cfg.save, ENGINE_STATE)) as f:
                self.step = json.load(f)["step"]

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
        self.teachers = {path: engine(f"teacher/{i}", r if cfg.algorithm == "rft" else cfg.teachers, path,
                                      cfg.data.catalog) for i, path in enumerate(teachers)}
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
    def _instances(self, path: str) -> List[RecInstance]:
        instances = rec_instances(load_benchmark(path, self.catalog))
        if self.cfg.data.domains:
            instances = [i for i in instances if i.domain in self.cfg.data.domains]
        if not instances:
            raise ValueError(f"{path}: no recommendation instance for domains {self.cfg.data.domains}")
        return instances

    def _prompt(self, instance: RecInstance) -> Prompt:
        ids = chat_prompt_ids(self.tokenizer, rec_messages(instance, self.catalog), self.cfg.rollout.thinking)
        return Prompt(tuple(ids), instance.domain)

    def batch_for_step(self, step: int) -> List[RecInstance]:
        """Deterministic in (seed, step), so a resumed run samples what the uninterrupted one would have."""
        rng = np.random.default_rng([self.cfg.seed, step])
        n = min(self.cfg.data.prompts_per_step, len(self.train_set))
        return [self.train_set[i] for i in rng.choice(len(self.train_set), size=n, replace=False)]

    def _params(self, step: int, **overrides) -> GenerationParams:
        r = self.cfg.rollout
        values = dict(thinking=r.thinking, num_traces=r.num_traces, num_items=r.num_items, temperature=r.temperature,
                      item_temperature=r.item_temperature, max_think_tokens=r.max_think_tokens,
                      seed=self.cfg.seed * 100003 + step)
        values.update(overrides)
        return GenerationParams(**values)

    def generate(self, instances: Sequence[RecInstance], params: GenerationParams, workers=None):
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

    # ------------------------------------------------------------------------------------------- packs
    def _packs(self, trees, idx: Sequence[int]):
        """Tree packs over trees ``idx`` (in order): ``[(TreePack, [tree indices])]``."""
        groups = group_into_packs([tree_length(trees[i].tree) for i in idx], self.cfg.actor.pack_length)
        return [(pack_trees([trees[idx[g]].tree for g in grp], self.cfg.actor.pack_length), [idx[g] for g in grp])
                for grp in groups]

    @staticmethod
    def _scoring_args(trees, packs):
        """``(packs, trees per pack)`` for a scoring engine's ``tree_logprobs``."""
        return [p for p, _ in packs], [[trees[i].tree for i in members] for _, members in packs]

    # ------------------------------------------------------------------------------------------- GRPO
    def grpo_step(self, step: int) -> Dict[str, float]:
        import ray

        cfg, g = self.cfg, self.cfg.grpo
        t0 = time.time()
        instances = self.batch_for_step(step)
        outputs = self.generate(instances, self._params(step))
        t_rollout = time.time() - t0
        self._sleep_rollouts()
        codes = predicted_codes(outputs, self.catalog)
        rewards = two_stage_rewards(codes, target_codes([i.targets for i in instances], self.catalog),
                                    diversity=g.diversity, accuracy=g.reward)
        u, n, k = rewards.reward.shape
        groups = torch.arange(u).repeat_interleave(n * k)
        advantages = group_advantages(rewards.reward.reshape(-1).double(), groups).reshape(u, n, k).float()
        weights = hit_sample_weights(rewards.hit, g.nonhit_weight)
        keep_user = [not g.dynamic_sampling or bool(rewards.reward[i].std() > 0) for i in range(u)]
        trees = rollout_trees(outputs)
        idx = [t for t, tree in enumerate(trees) if keep_user[tree.prompt_index]]
        metrics = {
            "reward": rewards.reward.float().mean().item(), "hit_rate": rewards.hit.float().mean().item(),
            "diversity": rewards.diversity.float().mean().item(), "users_kept": float(sum(keep_user)),
            "invalid_item_rate": (codes < 0).any(-1).float().mean().item(),  # completions that are no catalog item
            "rollout_traces": float(sum(len(o.traces) for o in outputs)),
            "rollout_item_completions": float(u * n * k),
            "generated_tokens": float(sum(o.generated_tokens for o in outputs)),
            "independent_rollout_tokens": float(sum(o.independent_rollout_tokens for o in outputs)),
        }
        t1 = time.time()
        if idx:
            packs = self._packs(trees, idx)
            metrics["actor_packs"] = float(len(packs))
            old = self.actor.logprobs([p for p, _ in packs])
            ref = (ray.get(self.reference.tree_logprobs.remote(*self._scoring_args(trees, packs))) if self.reference
                   else None)
            micro, diffs = [], []
            for j, (pack, members) in enumerate(packs):
                trace_mask, child_mask, trace_roll, child_roll = split_layout(trees, members)
                trace_old, child_old = tree_logprobs_layout(old[j], pack)
                diffs.append(torch.cat([(trace_old - trace_roll).abs()[trace_mask],
                                        (child_old - child_roll).abs()[child_mask]]))
                tr = [(trees[m].prompt_index, trees[m].trace_index) for m in members]
                ref_layout = tree_logprobs_layout(ref[j], pack) if ref else (None, None)
                micro.append(GRPOMicroBatch(pack, trace_mask, child_mask, trace_old, child_old,
                                            torch.stack([advantages[a, b] for a, b in tr]),
                                            torch.stack([weights[a, b] for a, b in tr]), *ref_layout))
            metrics["train_rollout_logprob_abs_diff"] = torch.cat(diffs).mean().item()
            for chunk in np.array_split(np.arange(len(micro)), min(cfg.actor.mini_batches, len(micro))):
                train = self.actor.train("train_grpo", [micro[c] for c in chunk], g.clip_cot, g.clip_item,
                                         g.kl_coef, g.kl_estimator)
            metrics.update({f"train/{k}": v for k, v in train.items()})
        metrics.update(self._finish_step(t_rollout, time.time() - t1))
        metrics["rollout_tokens_per_sec"] = metrics["generated_tokens"] / max(t_rollout, 1e-9)
        return metrics

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
    def _teacher_for(self, instance: RecInstance) -> str:
        teacher = self.cfg.mopd.teachers.get(instance.domain) or self.cfg.mopd.general_teacher
        if teacher is None:
            raise ValueError(f"no MOPD teacher for domain {instance.domain!r} (mopd.teachers / general_teacher)")
        return teacher

    def mopd_step(self, step: int) -> Dict[str, float]:
        import ray

        m = self.cfg.mopd
        t0 = time.time()
        instances = self.batch_for_step(step)
        outputs = self.generate(instances, self._params(step, num_items=1))
        t_rollout = time.time() - t0
        self._sleep_rollouts()
        t1 = time.time()
        trees = rollout_trees(outputs)
        teacher_of = [self._teacher_for(instances[t.prompt_index]) for t in trees]
        # Per tree: (trace part, item part) of the teacher's and the student's log-probs of the sampled tokens.
        teacher_lp: Dict[int, tuple] = {}
        student_lp: Dict[int, tuple] = {}
        for teacher, members in route_to_teachers(teacher_of, {p: p for p in self.teachers}).items():
            packs = self._packs(trees, members.tolist())
            t_lp = ray.get(self.teachers[teacher].tree_logprobs.remote(*self._scoring_args(trees, packs)))
            s_lp = self.actor.logprobs([p for p, _ in packs])
            for j, (pack, mem) in enumerate(packs):
                for lp, out in ((t_lp[j], teacher_lp), (s_lp[j], student_lp)):
                    trace, child = tree_logprobs_layout(lp, pack)
                    for r, i in enumerate(mem):
                        out[i] = (trace[r, : len(trees[i].trace_mask)], child[r, 0, : trees[i].child_mask.shape[1]])
        vocab = self._itemic_vocab()
        adv, masks, gaps, scores = {}, {}, [], []
        for i, t in enumerate(trees):
            mask = torch.cat([t.trace_mask, t.child_mask[0]])[None]
            teacher = torch.cat(teacher_lp[i])[None]
            student = torch.cat(student_lp[i])[None]
            if instances[t.prompt_index].domain not in m.teachers:  # general prompt: no itemic tokens (OpenOneRec)
                tokens = torch.tensor(list(t.tree.trace) + list(t.tree.children[0]))[None]
                teacher, keep = itemic_penalty(teacher, itemic_token_mask(tokens, vocab))
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

        rollout_lp = {i: torch.cat([t.trace_rollout_logp, t.child_rollout_logp[0]]) for i, t in enumerate(trees)}
        micro = [MOPDMicroBatch(pack, layout(masks, mem, False), layout(adv, mem, 0.0), layout(rollout_lp, mem, 0.0))
                 for pack, mem in self._packs(trees, kept)]
        train = self.actor.train("train_mopd", micro, m.is_low, m.is_high)
        t_train = time.time() - t1
        student_all = torch.cat([torch.cat(student_lp[i])[masks[i]] for i in range(len(trees))])
        rollout_all = torch.cat([rollout_lp[i][masks[i]] for i in range(len(trees))])
        metrics = {"student_teacher_logp_abs_gap": torch.cat(gaps).mean().item(), "ig_kept_share": len(kept) / len(trees),
                   "train_rollout_logprob_abs_diff": (student_all - rollout_all).abs().mean().item(),
                   **self._finish_step(t_rollout, t_train)}
        metrics.update({f"train/{k}": v for k, v in train.items()})
        return metrics

    def _itemic_vocab(self):
        from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

        return ItemicVocab.load(self.cfg.rollout.model_dir)

    # ------------------------------------------------------------------------------------------- RFT
    def rft_dataset(self, out_path: str) -> Dict[str, float]:
        """Sample every domain teacher on its users, keep verified hits (eq. 14), write chat SFT JSONL."""
        from megatron_onereason.rl.rft import select_rft_trajectories

        samples, hits = [], []
        for domain, teacher in sorted(self.cfg.mopd.teachers.items()):
            users = [i for i in self.train_set if i.domain == domain]
            if not users:
                continue
            outputs = self.generate(users, self._params(0), [self.teachers[teacher]])
            for inst, out in zip(users, outputs):
                targets = set(inst.targets)
                for trace in out.traces:
                    reasoning = self._reasoning_only(self.tokenizer.decode(trace.token_ids))
                    for c in trace.completions:
                        answer = self.tokenizer.decode(c.token_ids)
                        think = f"<think>\n{reasoning}\n</think>\n\n" if self.cfg.rollout.thinking else ""
                        samples.append({"user_id": inst.user.user_id, "domain": domain,
                                        "messages": rec_messages(inst, self.catalog), "response": think + answer,
                                        "answer": answer, "reasoning": reasoning})
                        hits.append(completion_item_id(self.catalog, c) in targets)
        legal = {(d, tuple(int(x) for x in codes)) for d, codes in zip(self.catalog.domains, self.catalog.codes)}
        selection = select_rft_trajectories(samples, hits, dedupe=True, legal_items=legal)
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
    def evaluate(self, instances: Optional[Sequence[RecInstance]] = None) -> Dict[str, float]:
        """Recall@K / Pass@K on held-out users: one greedy trace, beam search of width K over items (on the HF
        evaluator, synced to the current policy first, when the rollout engines are vLLM)."""
        instances = list(instances or self.eval_set or self.train_set)
        k = self.cfg.eval_k
        params = self._params(0, num_items=k, num_traces=1, item_strategy="beam", temperature=0.0)
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
        self.actor.call("save", self.cfg.save)
        tmp = os.path.join(self.cfg.save, ENGINE_STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"step": self.step}, f)
        os.replace(tmp, os.path.join(self.cfg.save, ENGINE_STATE))

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
