"""The RL loop (OneReason §6): GRPO, MOPD, or RFT data selection, over the runtime of :mod:`megatron_onereason.rl.runtime`.

Per step: the step's prompts (deterministic in seed and step, so a resumed run samples what the uninterrupted one
would have) → the algorithm's step (:func:`~megatron_onereason.rl.grpo_step.grpo_step`,
:func:`~megatron_onereason.rl.mopd_step.mopd_step`; RFT: :func:`~megatron_onereason.rl.rft_step.rft_dataset` once)
→ Recall@K on held-out users every ``eval_interval`` steps → metrics, checkpoints.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_onereason.config import to_dict
from megatron_onereason.eval.rec_eval import ranked_item_ids, rec_metrics
from megatron_onereason.metrics_log import MetricsLogger, directory_run_id, format_eta
from megatron_onereason.rl.config import RLConfig
from megatron_onereason.rl.data import RLPrompt, load_run_prompts, prompt_renderer
from megatron_onereason.rl.grpo_step import grpo_step
from megatron_onereason.rl.lineage import (
    EngineState,
    catalog_fingerprint,
    check_catalog,
    read_engine_state,
    write_engine_state,
)
from megatron_onereason.rl.mopd_step import load_general_domain, mopd_step, with_general_prompts
from megatron_onereason.rl.rft_step import rft_dataset
from megatron_onereason.rl.runtime import RLRuntime
from megatron_onereason.training.checkpointing import has_checkpoint

log = logging.getLogger("megatron_onereason.rl")


# Settings an engine reads every step (RLEngine.reconfigure may change them); the rest shape the engines it starts.
_PER_STEP_SETTINGS = ("steps", "seed", "eval_interval", "eval_k", "metrics_jsonl", "tensorboard_dir", "wandb_project",
                      "wandb_entity", "wandb_run_name", "wandb_mode", "wandb_dir", "grpo", "rft",
                      "actor.mini_batches", "rollout.num_traces", "rollout.num_items", "rollout.temperature",
                      "rollout.item_temperature", "rollout.max_think_tokens", "rollout.sampling",
                      "data.prompts_per_step")


def _config_differences(a, b, prefix: str = "") -> set:
    """Dotted names of the settings that differ between two ``to_dict`` configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {d for k in set(a) | set(b) for d in _config_differences(a.get(k), b.get(k), f"{prefix}{k}.")}
    return set() if a == b else {prefix.rstrip(".")}


def _metrics_logger(cfg: RLConfig) -> MetricsLogger:
    """JSONL, TensorBoard and W&B; a run resumed from the same ``save`` directory continues its W&B run."""
    return MetricsLogger(cfg.tensorboard_dir, cfg.metrics_jsonl,
                         wandb=cfg.wandb(directory_run_id(cfg.save) if cfg.save else None, to_dict(cfg)))


class RLEngine(RLRuntime):
    def __init__(self, cfg: RLConfig, rollouts: Optional[Sequence] = None):
        """Check the inputs and the resume lineage, then start the runtime (``rollouts``: see
        :class:`~megatron_onereason.rl.runtime.RLRuntime`)."""
        cfg.check_model_dirs()
        self._resume = cfg.save if has_checkpoint(cfg.save) else None
        self.step = 0
        super().__init__(cfg, rollouts, self._resume)
        self.logger = _metrics_logger(cfg)
        self._evaluator_step: Optional[int] = None  # the step whose weights the evaluator holds

    def _load_inputs(self) -> None:
        """The resume lineage (the engine state the actor checkpoint's tracker commits, rl/lineage.py) and the
        prompts: training, held out, MOPD general-domain."""
        cfg = self.cfg
        if self._resume:
            state = read_engine_state(self._resume)
            check_catalog(state, self.catalog, cfg.data.catalog, self._resume)
            self.step = state.step
        self.renderer = prompt_renderer(cfg, self.tokenizer, self.scheme)
        self.general = load_general_domain(cfg, self.tokenizer, self.vocab, self.renderer)
        train, held_out = load_run_prompts(cfg, self.catalog, self.renderer)
        self.train_set = train.prompts
        self.eval_set = held_out.prompts if held_out else []
        if not self.eval_set and cfg.eval_interval and cfg.algorithm != "rft":
            log.warning("eval_interval=%s but no data.eval_prompts: no Recall@K evaluation in this run",
                        cfg.eval_interval)

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
        self.logger = _metrics_logger(cfg)

    def batch_for_step(self, step: int) -> List[RLPrompt]:
        """Deterministic in (seed, step), so a resumed run samples what the uninterrupted one would have."""
        rng = np.random.default_rng([self.cfg.seed, step])
        n = min(self.cfg.data.prompts_per_step, len(self.train_set))
        return [self.train_set[i] for i in rng.choice(len(self.train_set), size=n, replace=False)]

    def train_step(self, step: int) -> Dict[str, float]:
        """One step of the configured algorithm (GRPO or MOPD)."""
        if self.cfg.algorithm == "grpo":
            return grpo_step(self, self.batch_for_step(step), step)
        batch = with_general_prompts(self.batch_for_step(step), self.general, self.cfg, step)
        return mopd_step(self, batch, step, self.general)

    def evaluate(self, instances: Optional[Sequence[RLPrompt]] = None) -> Dict[str, float]:
        """Recall@K / Pass@K on the held-out prompts (``data.eval_prompts``; none: ``{}``): one greedy trace, beam
        search of width K over items, ``eval_batch`` prompts per call — on the evaluator engine (synced to the
        current policy first) or on the rollout engines (colocated, a beam-searching backend)."""
        instances = list(instances or self.eval_set)
        if not instances:
            return {}
        k = self.cfg.eval_k
        # Items always from the catalog trie, whatever rollout.sampling: Recall@K ranks catalog items (§6.1 evaluates
        # with constrained beam search), so the unconstrained ablation is compared on the same metric.
        params = self.params(0, num_items=k, num_traces=1, item_strategy="beam", temperature=0.0, constrained=True)
        workers = None
        if self.evaluator is not None:
            if self._evaluator_step != self.step:
                self.sync_weights("evaluator")
                self._evaluator_step = self.step
            workers = [self.evaluator]
        scores = []
        for start in range(0, len(instances), self.cfg.eval_batch):
            chunk = instances[start:start + self.cfg.eval_batch]
            outputs = self.generate(chunk, params, workers)
            scores += [rec_metrics(ranked_item_ids(o, self.catalog), i.targets, [k]) for o, i in zip(outputs, chunk)]
        return {f"eval/{name}": float(np.mean([s[name] for s in scores])) for name in scores[0]}

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
            stats = rft_dataset(self, self.train_set, cfg.rft_output or "rft.jsonl")
            self.logger.log(0, stats)
            return [stats]
        start, start_step = time.time(), self.step
        while self.step < cfg.steps:
            metrics = self.train_step(self.step)
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
