"""Filesystem helpers shared by every tool that writes output: nothing half-written may look complete.

Temporary names carry the writer's host and pid (``.NAME.tmp-HOST-PID``), so a later run can tell the leftovers of
a killed writer (same host, process gone) from the work of a live one, and remove them.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import socket
from typing import Iterator, Optional

log = logging.getLogger(__name__)

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_RENAME_EXCHANGE = 2  # linux/fs.h


def temp_sibling(path: str, kind: str = "tmp") -> str:
    """``dir/.NAME.{kind}-HOST-PID``: a hidden sibling of ``path`` owned by this process."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{kind}-{socket.gethostname()}-{os.getpid()}")


def process_alive(host: str, pid: int) -> Optional[bool]:
    """Whether process ``pid`` runs on ``host``; ``None`` when ``host`` is another machine (cannot tell)."""
    if host != socket.gethostname():
        return None
    import psutil

    return psutil.pid_exists(pid)


def _leftover_owner(name: str, base: str):
    m = re.fullmatch(rf"\.{re.escape(base)}\.(tmp|old|deleting)-(?:(?P<host>.+)-)?(?P<pid>\d+)", name)
    if not m:
        return None
    return m.group(1), m.group("host") or socket.gethostname(), int(m.group("pid"))


def remove_leftovers(path: str) -> None:
    """Remove the temporary siblings of ``path`` left by killed writers on this host.

    A ``.old`` sibling is the previous output moved aside during an overwrite; if the writer died before the new
    output took its place, the old output is put back instead of deleted.
    """
    path = os.path.abspath(path)
    parent, base = os.path.dirname(path), os.path.basename(path)
    if not os.path.isdir(parent):
        return
    for name in sorted(os.listdir(parent)):
        owner = _leftover_owner(name, base)
        if owner is None:
            continue
        kind, host, pid = owner
        alive = process_alive(host, pid)
        leftover = os.path.join(parent, name)
        if alive is None:
            log.warning("%s: left by pid %d on host %s; remove it if no process there writes %s", leftover, pid,
                        host, path)
            continue
        if alive:
            continue
        if kind == "old" and not os.path.lexists(path):
            os.rename(leftover, path)
            log.warning("%s: restored from %s (an overwrite by pid %d was interrupted)", path, name, pid)
            continue
        _remove(leftover)
        log.warning("removed %s, left by an interrupted run (pid %d)", leftover, pid)


def remove_tree(path: str) -> None:
    """Delete a directory; it first leaves its name, so a kill mid-way never leaves a half-deleted ``path``."""
    doomed = temp_sibling(path, "deleting")
    os.rename(path, doomed)
    _remove(doomed)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def replace_path(new: str, target: str) -> None:
    """Move ``new`` to ``target``; an existing ``target`` stays complete until ``new`` has taken its place."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if exchange(new, target):  # new is now at target, the old output at new
        _remove(new)
        return
    old = temp_sibling(target, "old")
    os.rename(target, old)  # a kill here leaves `old`, which the next remove_leftovers(target) puts back
    os.rename(new, target)
    _remove(old)


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling of ``out_dir`` to write into; it becomes ``out_dir`` only on success.

    On any exception (including Ctrl-C) the temporary directory is removed, so ``out_dir`` is either absent, its
    previous complete version (``overwrite``: kept until the new one is complete), or the new complete one.
    Leftovers of killed earlier runs are removed first.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: output directory already exists (pass --overwrite to replace it)")
    check_writable(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    remove_leftovers(out_dir)
    tmp = temp_sibling(out_dir)
    _remove(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    try:
        replace_path(tmp, out_dir)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", encoding: str = "utf-8") -> Iterator:
    """Yield a file open on a temporary sibling of ``path``; it replaces ``path`` only on success (readers see the
    old file or the new one, never half of one)."""
    check_writable(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def is_no_space(exc: BaseException) -> bool:
    """A full disk, an exceeded quota or file-size limit (torch's zip writer reports it as ``unexpected pos``)."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
        return True
    text = str(exc)
    return any(s in text for s in ("unexpected pos", "No space left on device", "Disk quota exceeded",
                                   "File too large"))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def no_space_message(path: str, what: str) -> str:
    """One line for a write that ran out of space: where, how much is free, what to do."""
    try:
        free = f"{human_bytes(shutil.disk_usage(_existing_parent(path)).free)} free"
    except OSError:
        free = "free space unknown"
    return f"{path}: disk full (or quota exceeded) while writing {what} ({free}); free space and run again"


def check_writable(path: str, what: str = "") -> None:
    """Refuse, before any work, an output ``path`` that cannot be created or written: its nearest existing directory
    is not writable (permissions, a read-only file system). ``what`` names the setting, e.g. ``checkpoint.save=``."""
    existing = _existing_parent(path)
    directory = existing if os.path.isdir(existing) else os.path.dirname(existing)
    if os.access(directory, os.W_OK | os.X_OK):
        return
    read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    raise PermissionError(f"{what}{path}: not writable ({directory}: "
                          f"{'read-only file system' if read_only else 'permission denied'}); write it elsewhere or "
                          "make that directory writable")


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path
