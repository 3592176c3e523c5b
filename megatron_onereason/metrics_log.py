"""Scalar metrics: one JSON object per line (``--metrics-jsonl``) mirrored to TensorBoard and Weights & Biases, plus
a console line.

JSONL lines are strict JSON: a NaN/inf value (a skipped non-finite step) is written as ``null``. W&B is optional
(the ``wandb`` extra) and imported only when a project is set; ``mode=offline`` writes the run under ``dir`` for a
later ``wandb sync`` (clusters without internet).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import time
from typing import Any, Dict, Literal, Optional

log = logging.getLogger(__name__)

WandbMode = Literal["online", "offline"]


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """A W&B run (Megatron-LM's ``--wandb-project``, ``--wandb-exp-name``, ``--wandb-save-dir``)."""

    project: str
    entity: Optional[str] = None
    run_name: Optional[str] = None
    mode: WandbMode = "online"
    dir: Optional[str] = None  # where wandb/ goes (default: the working directory)
    run_id: Optional[str] = None  # a resumed training appends to the same W&B run
    config: Optional[Dict[str, Any]] = None  # the resolved config, shown with the run


@dataclasses.dataclass
class WandbLogging:
    """The W&B settings of a config (the trainer's ``logging`` section, the RL config): a run is logged when
    ``wandb_project`` is set; ``wandb_mode=offline`` writes it under ``wandb_dir`` for a later ``wandb sync``."""

    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_run_name: Optional[str] = None
    wandb_mode: WandbMode = "online"
    wandb_dir: Optional[str] = None

    def __post_init__(self):
        if self.wandb_project and importlib.util.find_spec("wandb") is None:  # every rank, before any work
            raise ValueError("wandb_project is set but the wandb package is not installed: "
                             "pip install 'megatron_onereason[wandb]' (or unset it)")

    def wandb(self, run_id: Optional[str], config: Dict[str, Any]) -> Optional[WandbSettings]:
        """The W&B run to log to (``run_id``: a resumed run appends to it), or None without ``wandb_project``."""
        if not self.wandb_project:
            return None
        return WandbSettings(self.wandb_project, self.wandb_entity, self.wandb_run_name, self.wandb_mode,
                             self.wandb_dir, run_id, config)


def directory_run_id(path: str) -> str:
    """A run id that stays the same for every run writing to the directory ``path`` (its resumes)."""
    return hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]


class MetricsLogger:
    """Writes only where ``enabled`` (one rank); safe to call everywhere."""

    def __init__(self, tensorboard_dir: Optional[str], jsonl_path: Optional[str], enabled: bool = True,
                 wandb: Optional[WandbSettings] = None):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._wandb = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir)
        if wandb is not None:
            self._wandb = _start_wandb(wandb)
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self._jsonl = open(jsonl_path, "a")

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), **record}, allow_nan=False) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(settings: WandbSettings):
    import wandb

    if settings.dir:
        os.makedirs(settings.dir, exist_ok=True)
    return wandb.init(project=settings.project, entity=settings.entity, name=settings.run_name, mode=settings.mode,
                      dir=settings.dir, id=settings.run_id, resume="allow" if settings.run_id else None,
                      config=settings.config)


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class RateLog:
    """Progress of a long chunked pass (conversion, encoding, collision resolution): logs
    ``"{what}: done/total {unit} (rate {unit}/s, ETA h:mm:ss)"`` at most every ``interval_s`` seconds, and at the end."""

    def __init__(self, logger: logging.Logger, what: str, total: int, interval_s: float = 10.0, unit: str = "items"):
        self.logger, self.what, self.total, self.interval_s, self.unit = logger, what, total, interval_s, unit
        self.start = self.last = time.time()

    def update(self, done: int) -> None:
        now = time.time()
        if now - self.last >= self.interval_s or done >= self.total:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            self.logger.info("%s: %d/%d %s (%.1f %s/s, ETA %s)", self.what, done, self.total, self.unit, rate,
                             self.unit, format_eta((self.total - done) / rate if rate else 0))
