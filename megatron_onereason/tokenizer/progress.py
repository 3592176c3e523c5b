"""Progress log lines with a rate for long chunked passes (encoding, collision resolution)."""
from __future__ import annotations

import logging
import time


class RateLog:
    """Logs ``"{what}: done/total items (rate items/s)"`` at most every ``interval_s`` seconds, and at the end."""

    def __init__(self, logger: logging.Logger, what: str, total: int, interval_s: float = 10.0):
        self.logger, self.what, self.total, self.interval_s = logger, what, total, interval_s
        self.start = self.last = time.time()

    def update(self, done: int) -> None:
        now = time.time()
        if now - self.last >= self.interval_s or done >= self.total:
            self.last = now
            self.logger.info("%s: %d/%d items (%.0f items/s)", self.what, done, self.total,
                             done / max(now - self.start, 1e-9))
