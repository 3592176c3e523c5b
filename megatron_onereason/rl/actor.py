"""The RL actor: the megatron-core policy (TP/PP/DP) that scores and trains on tree-packed rollouts.

One :class:`MegatronActor` runs in every actor process (SPMD: the engine calls each method on all ranks with the
same arguments). It reuses the trainer's stack (:func:`megatron_onereason.training.setup.setup_model_and_optimizer`,
megatron's pipeline schedules, DDP and optimizer) and adds:

* ``logprobs``: per-position log-probs of tree packs (each trace forwarded once, see :mod:`.tree_pack`);
* ``train_grpo`` / ``train_mopd``: one optimizer step per mini-batch with the shared-prefix GRPO loss (eqs. 10–13)
  or the MOPD loss (eq. 18), normalised per token over the whole mini-batch;
* ``send_weights``: this pipeline stage's weights gathered over TP, converted to HF names by the converter's
  mapping and broadcast by the stage leader to the inference engines (:mod:`megatron_onereason.generation.weight_sync`).

With DP > 1 each DP rank gets its own share of the tree packs; losses are sums over tokens (GRPO) or trajectories
(MOPD) and megatron divides the gradients by the count over all DP ranks (``calculate_per_token_loss``), so the
step is the global-batch mean whatever the DP size.
"""
from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_onereason.checkpoint.hf_mapping import FC1, LAYER_PREFIX, OUTPUT_LAYER
from megatron_onereason.model.packed_attention import pack_params
from megatron_onereason.rl.distill import mopd_loss
from megatron_onereason.rl.losses import shared_prefix_policy_loss
from megatron_onereason.rl.tree_pack import TreePack, tree_logprobs_layout
from megatron_onereason.training.config import ModelSection, OptimSection, ParallelSection, PrecisionSection
from megatron_onereason.training.checkpointing import NonFiniteError
from megatron_onereason.training.numerics import optimizer_step
from megatron_onereason.training.setup import device, install_grad_hooks, setup_model_and_optimizer

GRPO_METRICS = ("clipfrac", "clipfrac_cot", "clipfrac_item", "approx_kl", "ratio_mean")
MOPD_METRICS = ("is_weight_mean", "is_zero_frac", "adv_abs_mean")


@dataclass
class ActorSpec:
    model: ModelSection
    parallel: ParallelSection
    precision: PrecisionSection
    optim: OptimSection
    pack_length: int = 1024  # positions per tree pack (fixed: pipeline p2p shapes)
    total_steps: int = 100  # optimizer steps the LR schedule spans
    seed: int = 1234


@dataclass
class GRPOMicroBatch:
    """One tree pack plus what its loss needs (layouts ``[N, Tr]`` / ``[N, K, Tc]`` / ``[N, K]``)."""

    pack: TreePack
    trace_mask: torch.Tensor  # bool: reasoning tokens the policy sampled (forced tokens carry no loss)
    child_mask: torch.Tensor  # bool: item tokens the policy sampled
    trace_old_logp: torch.Tensor
    child_old_logp: torch.Tensor
    advantages: torch.Tensor
    sample_weight: torch.Tensor
    trace_ref_logp: Optional[torch.Tensor] = None
    child_ref_logp: Optional[torch.Tensor] = None
    # Truncated importance weights π_old/μ of the behaviour-policy correction (rl/losses.py); None: all 1.
    trace_is_weights: Optional[torch.Tensor] = None
    child_is_weights: Optional[torch.Tensor] = None


@dataclass
class MOPDMicroBatch:
    """One tree pack of K=1 student rollouts with per-token MOPD advantages and IS weights (``[N, T]``)."""

    pack: TreePack
    mask: torch.Tensor
    advantages: torch.Tensor
    rollout_logp: torch.Tensor


def without_loss(mb):
    """A copy of micro-batch ``mb`` that trains nothing (all masks off): padding for a DP rank without work."""
    if isinstance(mb, GRPOMicroBatch):
        return dataclasses.replace(mb, trace_mask=torch.zeros_like(mb.trace_mask),
                                   child_mask=torch.zeros_like(mb.child_mask))
    if isinstance(mb, MOPDMicroBatch):
        return dataclasses.replace(mb, mask=torch.zeros_like(mb.mask))
    raise TypeError(f"not a micro-batch: {type(mb).__name__}")


class MegatronActor:
    def __init__(self, spec: ActorSpec, resume_from: Optional[str] = None):
        from megatron.core import parallel_state

        from megatron_onereason.platform import initialize_distributed

        p = spec.parallel
        initialize_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                               p.virtual_pipeline_model_parallel_size, seed=spec.seed)
        self.spec = spec
        self.state = setup_model_and_optimizer(spec.model, p, spec.precision, spec.optim, ["all"], spec.total_steps,
                                               resume_from=resume_from)
        install_grad_hooks(self.state, p)
        self.cfg = self.state.info.config
        self.ps = parallel_state
        self.channels: Dict[str, object] = {}  # receiving role -> weight-sync channel (stage leaders only)
        self._pending_channels: Dict[str, tuple] = {}

    # ------------------------------------------------------------------------------------------- forward passes
    def _forward_step(self, loss_fn, data_iterator, model):
        mb = next(data_iterator)
        pack = mb.pack if hasattr(mb, "pack") else mb
        dev = device()
        chunk = model.module if hasattr(model, "module") else model
        renormalise = pack.item_allowed is not None and getattr(chunk, "post_process", True)
        # The tree structure (RoPE positions, tree attention) travels as packed_seq_params; no S × S mask.
        output = model(pack.tokens.to(dev)[None], pack.position_ids.to(dev)[None], None,
                       labels=None if renormalise else pack.labels.to(dev)[None],
                       packed_seq_params=pack_params(pack.layout, dev))
        if renormalise:  # logits [1, S, V/TP] -> per-token loss under the constrained distribution
            output = self._constrained_nll(chunk, output, pack.labels.to(dev)[None], pack.item_allowed)
        return output, partial(loss_fn, mb)

    def _constrained_nll(self, chunk, logits, labels, item_allowed):
        """``−log μ`` per position ``[1, S]``: the plain cross entropy, renormalised over the allowed tokens at the
        constrained positions (``rl/sampling.py``: ``log μ = log π − log Σ_{a∈A} π(a)``), vocabulary-parallel."""
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        from megatron_onereason.rl.sampling import vocab_parallel_allowed_log_mass

        positions, ids = (t.to(logits.device) for t in item_allowed)
        v_local = logits.shape[-1]
        tp = self.ps.get_tensor_model_parallel_world_size()
        log_mass = vocab_parallel_allowed_log_mass(
            logits[0, positions].float(), ids, self.ps.get_tensor_model_parallel_rank() * v_local,
            self.ps.get_tensor_model_parallel_group() if tp > 1 else None,
            reduce_from_tensor_model_parallel_region if tp > 1 else None)
        nll = chunk.compute_language_model_loss(labels, logits.transpose(0, 1))  # [1, S]
        return nll.index_add(1, positions, log_mass[None].to(nll.dtype))

    def _run(self, micro_batches: Sequence, loss_fn, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for mb in micro_batches:
            length = (mb.pack if hasattr(mb, "pack") else mb).tokens.numel()
            if length != self.spec.pack_length:  # pipeline stages exchange fixed-shape activations
                raise ValueError(f"tree pack has {length} positions, actor.pack_length is {self.spec.pack_length}")
        model = self.state.model
        iterators = [iter(micro_batches) for _ in model] if len(model) > 1 else iter(micro_batches)
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_fn), data_iterator=iterators,
            model=model if len(model) > 1 else model[0], num_microbatches=len(micro_batches),
            seq_length=self.spec.pack_length, micro_batch_size=1, forward_only=forward_only,
            collect_non_loss_data=forward_only)

    def _is_output_rank(self) -> bool:
        return (self.ps.is_pipeline_last_stage(ignore_virtual=True)
                and self.ps.get_tensor_model_parallel_rank() == 0)

    def logprobs(self, packs: Sequence[TreePack]) -> Optional[List[torch.Tensor]]:
        """Per-position log-probs ``[S]`` of each pack's labels (returned on the last stage's TP rank 0)."""
        for m in self.state.model:
            m.eval()
        with torch.no_grad():
            out = self._run(list(packs), lambda mb, loss, non_loss_data=True: -loss[0].float().cpu(), True)
        return list(out) if self._is_output_rank() else None

    def _step(self, micro_batches, loss_fn, keys: Sequence[str]) -> Dict[str, float]:
        """One optimizer step; ``loss_fn`` reports ``[n, loss_sum, n·metric for metric in keys]`` per micro-batch."""
        state = self.state
        for m in state.model:
            m.train()
        # The trainer's step (training/numerics.py): a NaN/inf loss or gradient stops the run before the update,
        # so neither the policy nor anything saved or synced to the rollout holds it.
        label = f"RL actor step {state.iteration + 1}"
        step = optimizer_step(state.model, state.chunks, state.optimizer, state.scheduler,
                              lambda: self._run(list(micro_batches), loss_fn, False),
                              lambda losses: [x["metrics"][1:2] for x in losses], 1, state.row_params, device(), label)
        if not step.health.ok:
            what = "loss" if step.health.loss_nonfinite else "gradients"
            raise NonFiniteError(f"{label}: non-finite (NaN/inf) {what}; stopped before the update, nothing saved. "
                                 "Lower actor.optim.lr or check the rewards/advantages")
        losses, grad_norm = step.losses, step.grad_norm
        state.iteration += 1
        metrics = {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "lr": state.scheduler.get_lr(state.optimizer.param_groups[0])}
        if self.ps.is_pipeline_last_stage(ignore_virtual=True):
            totals = torch.stack([x["metrics"] for x in losses]).sum(0)
            torch.distributed.all_reduce(totals, group=self.ps.get_data_parallel_group())
            n = max(totals[0].item(), 1.0)
            metrics["count"] = totals[0].item()  # tokens (GRPO) / trajectories (MOPD): the mini-batch's weight
            metrics["loss"] = totals[1].item() / n
            metrics.update({k: totals[2 + i].item() / n for i, k in enumerate(keys)})
        return metrics

    def train_grpo(self, micro_batches: Sequence[GRPOMicroBatch], clip_cot, clip_item, kl_coef: float = 0.0,
                   kl_estimator: str = "k3") -> Dict[str, float]:
        """One optimizer step on the shared-prefix GRPO loss (eqs. 10–13), token mean over the mini-batch."""

        def loss_fn(mb: GRPOMicroBatch, per_token_loss):
            trace_logp, child_logp = tree_logprobs_layout(-per_token_loss[0].float(), mb.pack)
            dev = trace_logp.device
            loss, m = shared_prefix_policy_loss(
                trace_logp, mb.trace_old_logp.to(dev), mb.trace_mask.to(dev), child_logp,
                mb.child_old_logp.to(dev), mb.child_mask.to(dev), mb.advantages.to(dev),
                clip_cot=tuple(clip_cot), clip_item=tuple(clip_item), sample_weight=mb.sample_weight.to(dev),
                agg="token-mean", loss_normalizer=1.0,
                trace_ref_logp=None if mb.trace_ref_logp is None else mb.trace_ref_logp.to(dev),
                child_ref_logp=None if mb.child_ref_logp is None else mb.child_ref_logp.to(dev),
                kl_coef=kl_coef, kl_estimator=kl_estimator,
                trace_is_weights=None if mb.trace_is_weights is None else mb.trace_is_weights.to(dev),
                child_is_weights=None if mb.child_is_weights is None else mb.child_is_weights.to(dev))
            k = mb.advantages.shape[1]
            # Tokens of the materialised N×K rollouts: each trace token counts once per child.
            n = (k * mb.trace_mask.sum() + mb.child_mask.sum()).to(dev)
            report = torch.stack([n.double(), loss.detach().double()] +
                                 [n.double() * m[key].detach().double() for key in GRPO_METRICS])
            return loss, n.to(torch.int), {"metrics": report}

        return self._step(micro_batches, loss_fn, GRPO_METRICS)

    def train_mopd(self, micro_batches: Sequence[MOPDMicroBatch], is_low: float, is_high: float) -> Dict[str, float]:
        """One optimizer step on the MOPD loss (eq. 18) with truncated IS weights (eq. 17)."""
        from megatron_onereason.rl.distill import truncated_is_weights

        def loss_fn(mb: MOPDMicroBatch, per_token_loss):
            trace_logp, child_logp = tree_logprobs_layout(-per_token_loss[0].float(), mb.pack)
            logp = torch.cat([trace_logp, child_logp[:, 0]], dim=1)
            dev = logp.device
            mask = mb.mask.to(dev)
            weights = truncated_is_weights(logp.detach(), mb.rollout_logp.to(dev), is_low, is_high, mask=mask)
            # Sum of per-trajectory means; megatron divides by the trajectories of the whole mini-batch.
            loss, m = mopd_loss(logp, mb.advantages.to(dev), weights, mask, loss_normalizer=1.0)
            n = mask.any(-1).sum()  # trajectories with a trained token (none in a DP rank's padding micro-batch)
            report = torch.stack([n.double(), loss.detach().double()] +
                                 [n.double() * m[key].detach().double() for key in MOPD_METRICS])
            return loss, n.to(torch.int), {"metrics": report}

        return self._step(micro_batches, loss_fn, MOPD_METRICS)

    # ------------------------------------------------------------------------------------------- weights
    def topology(self) -> Dict[str, int]:
        return {"dp": self.ps.get_data_parallel_rank(), "tp": self.ps.get_tensor_model_parallel_rank(),
                "pp": self.ps.get_pipeline_model_parallel_rank()}

    def _is_stage_leader(self) -> bool:
        """The rank that sends its pipeline stage's weights: TP rank 0 of DP replica 0."""
        return self.ps.get_tensor_model_parallel_rank() == 0 and self.ps.get_data_parallel_rank() == 0

    def _stage_weights(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """This pipeline stage's weights gathered over TP, one tensor at a time, under megatron names with global
        layer numbers. Every TP rank of the stage must iterate (the gathers are collective); only the stage
        leader gets the tensors."""
        tp_group = self.ps.get_tensor_model_parallel_group()
        tp = self.ps.get_tensor_model_parallel_world_size()
        leader = self._is_stage_leader()
        for chunk in self.state.chunks:
            for name, param in chunk.named_parameters():
                shards = [param.detach()]
                if getattr(param, "tensor_model_parallel", False) and tp > 1:
                    shards = [torch.empty_like(param) for _ in range(tp)]
                    torch.distributed.all_gather(shards, param.detach().contiguous(), group=tp_group)
                if not leader:
                    continue
                if name.startswith(LAYER_PREFIX):
                    local, suffix = name[len(LAYER_PREFIX):].split(".", 1)
                    name = f"{LAYER_PREFIX}{chunk.decoder.layers[int(local)].layer_number - 1}.{suffix}"
                if name.endswith(FC1):
                    halves = [s.chunk(2, dim=0) for s in shards]  # each TP shard is [gate_r; up_r]
                    full = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
                else:
                    full = torch.cat(shards, dim=getattr(param, "partition_dim", 0))
                if name == OUTPUT_LAYER and self.cfg.tie_word_embeddings:
                    continue  # the last stage's copy of the tied embedding
                yield name, full

    def serve_weight_channel(self, role: str, world_size: int, backend: str):
        """Stage leaders start the store of their channel to ``role``; returns its spec (``None`` elsewhere)."""
        from megatron_onereason.generation.weight_sync import serve_channel

        if not self._is_stage_leader():
            return None
        spec, store = serve_channel(f"{role}/pp{self.ps.get_pipeline_model_parallel_rank()}", world_size, backend)
        self._pending_channels[role] = (spec, store)
        return spec

    def join_weight_channel(self, role: str) -> None:
        from megatron_onereason.generation.weight_sync import join_channel

        if role in self._pending_channels:
            spec, store = self._pending_channels.pop(role)
            self.channels[role] = join_channel(spec, 0, store)

    def send_weights(self, role: str, bucket_bytes: int):
        """Broadcast this stage's weights, converted to HF names by the converter's mapping, to ``role``'s
        receivers (stage leaders return the :class:`~megatron_onereason.generation.weight_sync.SyncStats`)."""
        from megatron_onereason.generation.weights import hf_named_tensors
        from megatron_onereason.generation.weight_sync import send_weights

        if self.ps.get_data_parallel_rank() != 0:
            return None  # DP replicas hold the same weights: replica 0 sends
        weights = self._stage_weights()
        if not self._is_stage_leader():
            collections.deque(weights, maxlen=0)  # take part in the TP gathers
            return None
        hf = ((hf_name, t) for _, hf_name, t in hf_named_tensors(weights, self.cfg))
        return send_weights(self.channels[role], hf, bucket_bytes)

    # ------------------------------------------------------------------------------------------- checkpoints
    def checkpoint_iteration(self) -> int:
        """The iteration :meth:`save` writes now (optimizer steps taken)."""
        return self.state.iteration

    def save(self, root: str, consumed: int = 0) -> None:
        from megatron_onereason.training.checkpointing import save_checkpoint

        s = self.state
        save_checkpoint(root, s.iteration, s.chunks, s.optimizer, s.scheduler, consumed, s.info, s.assets,
                        self.spec.parallel.use_distributed_optimizer)

    @property
    def iteration(self) -> int:
        return self.state.iteration
