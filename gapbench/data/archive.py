"""Safe reading and extraction of tar archives: nothing may land outside the target folder.

A member is rejected (DataError, nothing extracted) when its name is absolute,
contains ``..``, is a symbolic or hard link, or is a device, FIFO or other
special file. Only regular files and folders are allowed; the standard
``cifar-10-python.tar.gz`` holds nothing else.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List

from gapbench.data.errors import DataError


def _open(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable tar archive ({exc}); delete it and get it again") from None


def check_members(tar: tarfile.TarFile, path: Path) -> List[tarfile.TarInfo]:
    """Every member of ``tar``, after checking that none could escape the extraction folder."""
    try:
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: truncated or corrupt archive ({exc}); delete it and get it again") from None
    for m in members:
        name = PurePosixPath(m.name)
        bad = None
        if name.is_absolute() or m.name.startswith(("/", "\\")) or (len(m.name) > 1 and m.name[1] == ":"):
            bad = "an absolute path"
        elif ".." in name.parts or "\\" in m.name:
            bad = "a path that climbs out with '..'"
        elif m.issym() or m.islnk():
            bad = f"a link (to {m.linkname!r})"
        elif not (m.isfile() or m.isdir()):
            bad = "a special file"
        if bad:
            raise DataError(
                f"{path}: refusing an unsafe archive: member {m.name!r} is {bad}; "
                "delete the archive and download it again from the canonical URL"
            )
    return members


def read_members(path: Path, names: Iterable[str], inner_dir: str) -> Dict[str, bytes]:
    """The bytes of ``inner_dir/<name>`` for each name, read from the archive without extracting it."""
    wanted = {f"{inner_dir}/{n}": n for n in names}
    out: Dict[str, bytes] = {}
    with _open(path) as tar:
        for m in check_members(tar, path):
            key = str(PurePosixPath(m.name))
            if key in wanted and m.isfile():
                try:
                    out[wanted[key]] = tar.extractfile(m).read()
                except (tarfile.TarError, OSError, EOFError) as exc:
                    raise DataError(f"{path}: truncated or corrupt archive ({exc}); get it again") from None
    missing = [n for n in wanted.values() if n not in out]
    if missing:
        raise DataError(f"{path}: archive lacks {', '.join(f'{inner_dir}/{n}' for n in missing)}; get it again")
    return out


def safe_extract(path: Path, dest: Path) -> None:
    """Extract every member of the archive at ``path`` into ``dest``, after :func:`check_members`.

    Files are written by hand (no ``tar.extractall``), so permissions, owners and
    links in the archive are never applied.
    """
    dest = Path(dest)
    with _open(path) as tar:
        members = check_members(tar, path)
        root = dest.resolve()
        for m in members:
            target = (dest / m.name).resolve()
            if root != target and root not in target.parents:
                raise DataError(f"{path}: refusing an unsafe archive: member {m.name!r} resolves outside {dest}")
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            try:
                with tar.extractfile(m) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(tmp, target)
            except (tarfile.TarError, OSError, EOFError) as exc:
                tmp.unlink(missing_ok=True)
                raise DataError(f"{path}: truncated or corrupt archive ({exc}); delete it and get it again") from None
