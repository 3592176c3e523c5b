"""Scalar metrics: one JSON object per line (``--metrics-jsonl``) mirrored to TensorBoard, plus a console line.

JSONL lines are strict JSON: a NaN/inf value (a skipped non-finite step) is written as ``null``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Dict, Optional

log = logging.getLogger(__name__)


class MetricsLogger:
    """Writes only where ``enabled`` (one rank); safe to call everywhere."""

    def __init__(self, tensorboard_dir: Optional[str], jsonl_path: Optional[str], enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir)
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

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"
