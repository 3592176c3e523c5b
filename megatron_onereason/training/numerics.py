"""Numerical guards of a training step: non-finite losses and gradients are found before the optimizer update.

The checks reduce each tensor to one number (a sum is NaN/inf exactly when an element is, short of an fp32 overflow
near 1e38, which is as fatal) and leave them on the device; :func:`step_health` folds them with the loss-token count
into one all-reduce, the step's only host synchronisation for these guards. Shared by the trainer and the RL actor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch


def nonfinite(values: Iterable[torch.Tensor]) -> torch.Tensor:
    """0-d float tensor: 1 if any element of ``values`` is NaN/inf, else 0 (no host sync)."""
    sums = [v.detach().sum(dtype=torch.float32) for v in values]
    if not sums:
        return torch.zeros(())
    return (~torch.isfinite(torch.stack(sums).sum())).float()


def gradients(model_chunks: Sequence[torch.nn.Module]) -> Iterable[torch.Tensor]:
    """The gradients megatron accumulated (``main_grad`` under megatron DDP, else ``.grad``)."""
    for chunk in model_chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None:
                yield g


@dataclass(frozen=True)
class StepHealth:
    loss_nonfinite: bool
    grads_nonfinite: bool
    has_loss_tokens: bool

    @property
    def ok(self) -> bool:
        return self.has_loss_tokens and not (self.loss_nonfinite or self.grads_nonfinite)


def step_health(loss_sums: Sequence[torch.Tensor], model_chunks: Sequence[torch.nn.Module], loss_tokens: int,
                device) -> StepHealth:
    """Collective over all ranks: is the loss (where this rank has it) finite, are all gradients finite, does the
    global batch have any loss token. One all-reduce."""
    flags = torch.stack([nonfinite(loss_sums).to(device), nonfinite(gradients(model_chunks)).to(device),
                         torch.tensor(float(loss_tokens > 0), device=device)])
    torch.distributed.all_reduce(flags)
    loss_bad, grads_bad, tokens = flags.tolist()
    return StepHealth(loss_bad > 0, grads_bad > 0, tokens > 0)


@dataclass(frozen=True)
class StepResult:
    losses: list  # what the forward-backward schedule returned (per micro-batch, on the last pipeline stage)
    health: StepHealth
    updated: bool  # False: unhealthy step (the caller decides: stop or skip), or the optimizer skipped it
    grad_norm: Optional[float]


def optimizer_step(model: Sequence[torch.nn.Module], chunks: Sequence[torch.nn.Module], optimizer, scheduler,
                   forward_backward: Callable[[], list], loss_sums: Callable[[list], Sequence[torch.Tensor]],
                   loss_tokens: int, row_params, device, label: str) -> StepResult:
    """One optimizer step of the trainer or the RL actor: zero-grad → forward/backward → frozen rows masked →
    health check (one all-reduce) → update, only when the loss and every gradient are finite and the batch has
    loss tokens. A non-finite gradient norm after the update stops the run (:class:`NonFiniteError`)."""
    from megatron_onereason.training.checkpointing import NonFiniteError
    from megatron_onereason.training.freezing import mask_frozen_row_grads

    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    losses = forward_backward()
    mask_frozen_row_grads(row_params)
    health = step_health(loss_sums(losses), chunks, loss_tokens, device)
    if not health.ok:
        return StepResult(losses, health, False, None)
    updated, grad_norm, _ = optimizer.step()
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise NonFiniteError(f"{label}: the gradient norm is {grad_norm}; stopped, nothing saved. Lower the learning "
                             "rate or check the data")
    if updated:
        scheduler.step(increment=1)
    return StepResult(losses, health, updated, grad_norm)
