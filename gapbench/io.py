"""Files a run writes: every write is atomic, and a failed command leaves nothing behind.

Atomic means: write to a temporary file in the same folder, flush it to disk,
then ``os.replace`` it over the target. A process killed at any point leaves
either the old complete file or the new complete file, never a half-written
one that looks complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Optional

from gapbench.errors import GapbenchError


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file 0600 whatever the umask; give it the mode open() would (0644 under umask 022),
    # or every result would be unreadable to colleagues on a shared machine.
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    """The process's umask (os.umask can only be read by setting it, so set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder, names: Optional[Iterable[str]] = None) -> List[Path]:
    """Delete the temporaries that atomic writes in ``folder`` left behind when their process was killed.

    A kill between :func:`atomic_path`'s creating its temporary and its rename
    leaves ``.<name>.<random>.tmp`` (as large as the file it was to become)
    beside the target. ``names``: only those of these target names; None: all.
    Call it only on a folder no live process is writing to (a resumed stage's own).
    Returns the paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [".*.tmp"] if names is None else [f".{name}.*.tmp" for name in names]
    removed = []
    for pattern in patterns:
        for path in folder.glob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def read_json(path) -> Any:
    return json.loads(Path(path).read_text())


def read_json_or_none(path) -> Any:
    """read_json, or None when the file is missing, unreadable or not JSON (a record to recompute, not an error)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def save_torch(path, obj: Any) -> None:
    """torch.save, atomically. ``obj`` should hold tensors and plain values only."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


# Only the latest checkpoint is kept, so the one remedy is to train again.
CHECKPOINT_REMEDY = "train the recipe again into a new --out (only the latest checkpoint is kept)"


def load_torch(
    path, map_location="cpu", what: str = "gapbench checkpoint", remedy: str = CHECKPOINT_REMEDY,
    data: Optional[bytes] = None,
) -> Any:
    """torch.load with ``weights_only=True``: a checkpoint can hold no code to run.

    A missing or unreadable file raises GapbenchError naming it, ``what`` it should be
    and the ``remedy``. ``data``: the file's bytes, already read (e.g. to hash them).
    """
    import torch

    try:
        source = path if data is None else io.BytesIO(data)
        return torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise GapbenchError(f"{path} does not exist") from None
    except Exception as exc:  # unpickling errors, truncation, zip errors
        raise GapbenchError(
            f"{path} is not a readable {what} ({type(exc).__name__}); it may be corrupt or truncated: {remedy}"
        ) from None


def check_writable(path) -> None:
    """Fail early, with one line, when an output folder cannot be created or written."""
    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise GapbenchError(f"cannot write to {path}: {probe} is a file; choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise GapbenchError(f"cannot write to {path}: no write permission on {probe}; choose another --out")


@contextlib.contextmanager
def output_dir(path, keep_if: Optional[Callable[[Path], bool]] = None) -> Iterator[Path]:
    """Create ``path`` for a command; if the command fails, remove what it created.

    A folder that existed before (a resumed run) is left as it is, and so is one
    that another process holds (the failure is then that process's lock) or, when
    ``keep_if(path)`` says so, one that already holds work worth keeping (a checkpoint).
    """
    from gapbench.lock import FolderInUse

    path = Path(path)
    check_writable(path)
    existed = path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GapbenchError(f"cannot create {path}: {exc.strerror}; choose another --out") from None
    try:
        yield path
    except BaseException as exc:
        if not existed and not isinstance(exc, FolderInUse) and not (keep_if is not None and keep_if(path)):
            shutil.rmtree(path, ignore_errors=True)
        raise


def git_commit(root: Optional[Path] = None) -> Optional[str]:
    """The commit of the gapbench source tree, when it is a git checkout."""
    return git_state(root)["commit"]


_GIT_STATE: dict = {}


def git_state(root: Optional[Path] = None) -> dict:
    """{"commit": HEAD or None, "dirty": whether gapbench's tracked sources differ from it (None: unknown)}.

    Only the package's own folder counts as dirty, so results, run folders and notes
    beside it in the same checkout do not mark every number as made by modified code.
    Asked once per process: the code that runs cannot change while it runs.
    """
    root = Path(root or Path(__file__).resolve().parent.parent)
    if root in _GIT_STATE:
        return dict(_GIT_STATE[root])

    def git(*args) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
            return out.stdout
        except (OSError, subprocess.SubprocessError):
            return None

    commit = None
    dirty = None
    if (root / ".git").exists():
        head = git("rev-parse", "HEAD")
        commit = (head or "").strip() or None
        if commit is not None:
            status = git("status", "--porcelain", "--untracked-files=no", "--", "gapbench")
            dirty = None if status is None else bool(status.strip())
    _GIT_STATE[root] = {"commit": commit, "dirty": dirty}
    return dict(_GIT_STATE[root])
