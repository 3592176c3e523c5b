"""Numerical guards of a training step: non-finite losses and gradients are found before the optimizer update.

The checks reduce each tensor to one number (a sum is NaN/inf exactly when an element is, short of an fp32 overflow
near 1e38, which is as fatal) and leave them on the device; :func:`step_health` folds them with the loss-token count
into one all-reduce, the step's only host synchronisation for these guards. Shared by the trainer and the RL actor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

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
