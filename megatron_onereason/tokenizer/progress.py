"""Progress log lines with a rate for long chunked passes (encoding, collision resolution)."""
from __future__ import annotations

import logging
import time


class RateLog:
    """Logs ``"{what}: done/total {unit} (rate {unit}/s, ETA h:mm:ss)"`` at most every ``interval_s`` seconds, and
    at the end."""

    def __init__(self, logger: logging.Logger, what: str, total: int, interval_s: float = 10.0, unit: str = "items"):
        self.logger, self.what, self.total, self.interval_s, self.unit = logger, what, total, interval_s, unit
        self.start = self.last = time.time()

    def update(self, done: int) -> None:
        from megatron_onereason.metrics_log import format_eta

        now = time.time()
        if now - self.last >= self.interval_s or done >= self.total:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            self.logger.info("%s: %d/%d %s (%.1f %s/s, ETA %s)", self.what, done, self.total, self.unit, rate,
                             self.unit, format_eta((self.total - done) / rate if rate else 0))
