"""One writer per run folder: an advisory lock that the kernel releases when its process dies.

Every command that writes a folder holds ``<folder>/.gapbench.lock`` locked
(``fcntl.flock``, exclusive) while it writes. A second writer is refused at once
with one line naming the process that holds the folder. Because the kernel drops
the lock with the process, a killed run (Ctrl-C, SIGKILL, a node that went away
without its file system) never blocks the next one: there is no stale lock file
to delete. The file itself stays; it holds the last holder's PID and command,
for the error message only.

The lock is re-entrant within a process, so ``gapbench run`` can hold a run
folder across train, evaluate-gaps and report, each of which also takes it.
On a file system without ``flock`` (some network mounts), locking is skipped
with a warning rather than refusing to work.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, Tuple

from gapbench.errors import GapbenchError

log = logging.getLogger(__name__)

LOCK_FILE = ".gapbench.lock"

# folder (resolved) -> (open file descriptor, how many holders in this process)
_HELD: Dict[Path, Tuple[int, int]] = {}
_GUARD = threading.Lock()


class FolderInUse(GapbenchError):
    """Another process is writing the folder."""


def _holder(fd: int) -> str:
    """Who holds the lock, from the note the holder writes just after taking it.

    A holder that has only just taken the lock may not have written its note yet,
    so an empty or partial note is read again for up to half a second.
    """
    info: dict = {}
    for _ in range(10):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            info = {}
        if info.get("pid"):
            break
        time.sleep(0.05)
    pid = info.get("pid")
    what = f"process {pid}" if pid else "another process"
    if info.get("command"):
        what += f" ({info['command']})"
    return what


def _holder_note(fd: int) -> dict:
    """The holder's note, read once ({} while it is being written)."""
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def folder_lock(folder, command: str = "gapbench", wait: float = 0.0) -> Iterator[Path]:
    """Hold ``folder``'s writer lock for the ``with`` block; raise :class:`FolderInUse` if another process has it.

    ``folder`` is created if needed (its parents too); ``command`` is recorded for
    the message a refused writer sees. ``wait`` > 0 (array shards, which hold the
    folder only for moments): wait up to that many seconds for a holder that also
    passed ``wait``; a holder that did not (a whole run) is refused at once.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    with _GUARD:
        if key in _HELD:
            fd, count = _HELD[key]
            _HELD[key] = (fd, count + 1)
            reentered = True
        else:
            reentered = False
    if not reentered:
        mode = 0o666 & ~_umask()
        try:
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, mode)
        except OSError as exc:
            raise GapbenchError(
                f"cannot write to {folder}: {exc.strerror}; choose another --out (or a folder you can write)"
            ) from None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    note = _holder_note(fd)  # a holder that has only just taken the lock may not have written it
                    if wait > 0 and time.monotonic() < deadline and (note.get("brief") or not note.get("pid")):
                        time.sleep(0.1)
                        continue
                    holder = _holder(fd)
                    os.close(fd)
                    raise FolderInUse(
                        f"{folder} is in use by {holder}: wait for it to finish, or choose another --out"
                    ) from None
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    log.warning("%s: this file system does not support locks; nothing stops a second writer", folder)
                    break
                os.close(fd)
                raise
        note = json.dumps({"pid": os.getpid(), "command": command, **({"brief": True} if wait > 0 else {})}).encode()
        os.pwrite(fd, note, 0)  # written over the last holder's note, then cut to length: never empty
        os.ftruncate(fd, len(note))
        with _GUARD:
            _HELD[key] = (fd, 1)
    try:
        yield folder
    finally:
        with _GUARD:
            fd, count = _HELD[key]
            if count > 1:
                _HELD[key] = (fd, count - 1)
            else:
                del _HELD[key]
                os.close(fd)  # closing the descriptor releases the lock


def holds_lock(folder) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return Path(folder).resolve() in _HELD


def _umask() -> int:
    from gapbench.io import current_umask

    return current_umask()


def command_line() -> str:
    """The running command, for the lock note: 'gapbench run recipes/x.yaml'."""
    argv = [os.path.basename(sys.argv[0] or "gapbench")] + sys.argv[1:]
    return " ".join(argv)[:200]
