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
from typing import Any, Iterable, Iterator, List, Optional

from gapbench.errors import GapbenchError


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def save_torch(path, obj: Any) -> None:
    """torch.save, atomically. ``obj`` should hold tensors and plain values only."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


CHECKPOINT_REMEDY = "retrain into a new --out, or copy back an earlier checkpoint.pt and train with --resume"


def load_torch(path, map_location="cpu", what: str = "gapbench checkpoint", remedy: str = CHECKPOINT_REMEDY) -> Any:
    """torch.load with ``weights_only=True``: a checkpoint can hold no code to run.

    A missing or unreadable file raises GapbenchError naming it, ``what`` it should be
    and the ``remedy``.
    """
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
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
def output_dir(path) -> Iterator[Path]:
    """Create ``path`` for a command; if the command fails, remove what it created.

    A folder that existed before (a resumed run) is left as it is.
    """
    path = Path(path)
    check_writable(path)
    existed = path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GapbenchError(f"cannot create {path}: {exc.strerror}; choose another --out") from None
    try:
        yield path
    except BaseException:
        if not existed:
            shutil.rmtree(path, ignore_errors=True)
        raise


def git_commit(root: Optional[Path] = None) -> Optional[str]:
    """The commit of the gapbench source tree, when it is a git checkout."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
