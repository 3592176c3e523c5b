"""One run per checkpoint directory: a run id, a lock with a heartbeat, and the stage-complete marker.

``checkpoint.save`` holds, besides the checkpoints:

* ``onereason_run.json`` — the run id (and when / where the run started). It stays for the directory's life: a
  later training saving there is refused unless it resumes that run (``checkpoint.load`` = ``checkpoint.save``).
* ``onereason_run.lock`` — who is writing now (host, pid, process start time, SLURM job id); rank 0 touches it every
  :data:`HEARTBEAT_S` seconds. A lock is stale (taken over with a warning) when its process is gone (same host), when
  it belongs to an earlier incarnation of this SLURM job (requeue), or when its heartbeat is older than
  :data:`STALE_AFTER_S` (another host: a crashed node).
* ``training_complete.json`` — written only when the run reached ``train.iters`` (iteration, config fingerprint,
  time). Stage chaining (``examples/*.sh``) starts the next stage only when it exists; an early stop leaves it absent.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

from megatron_onereason.checkpoint.integrity import has_manifest
from megatron_onereason.checkpoint.mcore_io import TRACKER_FILE, committed_iteration, iteration_dir_name, \
    saved_iterations, tracker_value
from megatron_onereason.cli import UserError
from megatron_onereason.fileio import atomic_write_text, process_alive, remove_leftovers, remove_tree

log = logging.getLogger("megatron_onereason.train")

RUN_JSON = "onereason_run.json"
LOCK_FILE = "onereason_run.lock"
COMPLETE_MARKER = "training_complete.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
T = TypeVar("T")


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _process_start_time(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def lock_is_stale(lock: dict, heartbeat_age_s: float) -> Optional[str]:
    """Why the lock's owner is certainly gone, or None while it may still be writing."""
    host, pid = lock.get("host"), int(lock.get("pid", -1))
    alive = process_alive(host, pid)
    if alive is False:
        return f"its process {pid} on {host} is gone"
    if alive and _process_start_time(pid) != lock.get("process_start"):
        return f"pid {pid} on {host} is now another process"
    if alive:
        return None
    job = os.environ.get("SLURM_JOB_ID")
    if job and lock.get("slurm_job_id") == job:
        return f"it belongs to an earlier run of this SLURM job {job} (requeued)"
    if heartbeat_age_s > STALE_AFTER_S:
        return f"its heartbeat stopped {heartbeat_age_s:.0f}s ago"
    return None


@dataclass
class RunDirectory:
    """A claimed ``checkpoint.save`` directory (rank 0 holds it; other ranks never touch these files)."""

    root: str
    run_id: str
    _lock: dict = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: Optional[threading.Thread] = None

    @property
    def lock_path(self) -> str:
        return os.path.join(self.root, LOCK_FILE)

    @classmethod
    def claim(cls, root: str, resuming_it: bool) -> "RunDirectory":
        """Lock ``root`` for this process; ``resuming_it``: ``checkpoint.load`` is this same directory.

        Refuses (``UserError``) while another live training holds the lock, and when ``root`` holds another run's
        checkpoints and this run does not resume it. Removes what interrupted saves left behind.
        """
        root = os.path.abspath(root)
        os.makedirs(root, exist_ok=True)
        run = _read_json(os.path.join(root, RUN_JSON))
        lock = cls._acquire(root, run["run_id"] if run else uuid.uuid4().hex[:12])
        claimed = cls(root, lock["run_id"], lock)
        try:
            saved = saved_iterations(root)
            if (run or saved or tracker_value(root) is not None) and not resuming_it:
                who = f"run {run['run_id']} (started {run.get('started', '?')})" if run else "another training"
                raise UserError(
                    f"checkpoint.save={root} already holds {who}'s checkpoints (iterations "
                    f"{_describe(saved)}, latest committed {committed_iteration(root)}); a new run would mix its "
                    f"iterations with them. To continue that run set checkpoint.load={root}; to start afresh choose "
                    "another checkpoint.save (or delete that directory)")
            claimed._remove_interrupted_saves()
            if run is None:
                atomic_write_text(os.path.join(root, RUN_JSON), json.dumps(
                    {"run_id": claimed.run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "host": socket.gethostname()}, indent=1))
        except BaseException:
            claimed.release()
            raise
        claimed._thread = threading.Thread(target=claimed._heartbeat, name="run-lock-heartbeat", daemon=True)
        claimed._thread.start()
        log.info("checkpoint.save=%s: run %s, lock held by pid %d", root, claimed.run_id, os.getpid())
        return claimed

    @staticmethod
    def _acquire(root: str, run_id: str) -> dict:
        path = os.path.join(root, LOCK_FILE)
        remove_leftovers(path)
        me = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
              "process_start": _process_start_time(os.getpid()), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = _read_json(path) or {}
                try:
                    age = time.time() - os.path.getmtime(path)
                except FileNotFoundError:
                    continue
                reason = lock_is_stale(other, age) if other else "it is unreadable"
                if reason is None:
                    raise UserError(
                        f"checkpoint.save={root} is in use by another training (run {other.get('run_id')}, pid "
                        f"{other.get('pid')} on {other.get('host')}, started {other.get('started')}, last heartbeat "
                        f"{age:.0f}s ago): two runs in one directory would interleave their checkpoints. Wait for "
                        f"it, or save elsewhere (a lock whose heartbeat is {STALE_AFTER_S:.0f}s old counts as dead; "
                        f"delete {path} if you know it is)") from None
                log.warning("%s: taking over the lock of run %s: %s", path, other.get("run_id"), reason)
                os.remove(path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f, indent=1)
            return me
        raise UserError(f"{path}: could not take the lock (another process keeps creating it)")

    def _remove_interrupted_saves(self) -> None:
        """Iteration directories past the tracker are saves that never committed (killed mid-save): remove them."""
        last = committed_iteration(self.root)
        for name in os.listdir(self.root):  # iteration directories a killed process was deleting
            m = re.fullmatch(r"\.(iter_\d{7})\..+", name)
            if m:
                remove_leftovers(os.path.join(self.root, m.group(1)))
        for it in saved_iterations(self.root):
            if last is None or it > last:
                path = os.path.join(self.root, iteration_dir_name(it))
                state = "complete but never committed" if has_manifest(path) else "incomplete"
                remove_tree(path)
                log.warning("removed %s: %s save of an interrupted run", path, state)
        remove_leftovers(os.path.join(self.root, TRACKER_FILE))
        remove_leftovers(os.path.join(self.root, COMPLETE_MARKER))

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self.still_ours():
                log.error("%s: the run lock was taken by another process; this run will not commit checkpoints",
                          self.lock_path)
                return
            try:
                os.utime(self.lock_path)
            except OSError as e:
                log.warning("%s: heartbeat failed (%s)", self.lock_path, e)

    def still_ours(self) -> bool:
        current = _read_json(self.lock_path) or {}
        return current.get("pid") == self._lock.get("pid") and current.get("host") == self._lock.get("host") \
            and current.get("run_id") == self.run_id

    def release(self) -> None:
        self._stop.set()
        if self.still_ours():
            os.remove(self.lock_path)

    # ------------------------------------------------------------------------------------------- stage lineage
    @property
    def complete_marker(self) -> str:
        return os.path.join(self.root, COMPLETE_MARKER)

    def mark_complete(self, iteration: int, fingerprint: str) -> None:
        atomic_write_text(self.complete_marker, json.dumps(
            {"iteration": iteration, "config_fingerprint": fingerprint, "run_id": self.run_id,
             "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))

    def clear_complete(self) -> None:
        if os.path.exists(self.complete_marker):
            os.remove(self.complete_marker)
            log.info("%s removed: the run continues past its earlier end", self.complete_marker)


def _describe(iterations) -> str:
    if not iterations:
        return "none"
    return ", ".join(map(str, iterations)) if len(iterations) <= 4 else \
        f"{iterations[0]}, {iterations[1]}, …, {iterations[-1]} ({len(iterations)} in all)"


def rank0_decides(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and give every rank its result, or raise its error on every rank (as ``UserError``,
    reported once)."""
    import torch

    outcome = [None, None]
    if torch.distributed.get_rank() == 0:
        try:
            outcome[0] = fn()
        except UserError as e:
            outcome[1] = str(e)
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise UserError(outcome[1])
    return outcome[0]
