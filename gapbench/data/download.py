"""Downloading a dataset's files into the user cache (or a chosen root), verified before use.

Each file is streamed into a temporary file in the target folder, its SHA-256
(or, where no SHA-256 is known, its MD5) compared with the spec, and only then
renamed into place atomically. On any failure the temporary file is deleted
and a DataError says what happened; a folder the download created is removed
with everything in it, and in a folder that was already there no other file is
touched (files fetched and verified before the failure stay). Files already
present and matching are not fetched again.

Mirrors are tried in order: the ``base_urls`` argument, else
``$GAPBENCH_MIRROR`` (a base URL under which files live as
``<mirror>/<dataset>/<file>``), else the spec's canonical URLs. CIFAR-10's
archive is extracted safely (:mod:`gapbench.data.archive`) into
``cifar-10-batches-py/`` and then removed. HTTP uses only ``urllib``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence

from gapbench.data.archive import safe_extract
from gapbench.data.errors import DataError
from gapbench.data.locate import PathLike, download_dir
from gapbench.data.registry import FileSpec, get_spec

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TIMEOUT_S = 60


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _expected(f: FileSpec):
    """(algorithm, digest) the downloaded file must match, or (None, None): structure-checked only."""
    if f.sha256:
        return "sha256", f.sha256
    if f.md5:
        return "md5", f.md5
    return None, None


def _matches(path: Path, f: FileSpec) -> bool:
    algorithm, digest = _expected(f)
    return path.is_file() and (algorithm is None or _digest(path, algorithm) == digest)


def mirrors_for(name: str, base_urls: Optional[Sequence[str]] = None) -> List[str]:
    """Base URLs to try for dataset ``name``, in order (see the module docstring)."""
    if base_urls:
        return [u if u.endswith("/") else u + "/" for u in base_urls]
    env = os.environ.get("GAPBENCH_MIRROR")
    if env:
        return [env.rstrip("/") + f"/{name}/"]
    return list(get_spec(name).mirrors)


def _fetch(url: str, dest: Path, f: FileSpec) -> None:
    """Stream ``url`` to a temporary file beside ``dest``, verify, rename; the temporary file never survives."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{f.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            shutil.copyfileobj(response, out, _CHUNK)
        algorithm, digest = _expected(f)
        if algorithm is not None:
            got = _digest(tmp, algorithm)
            if got != digest:
                raise DataError(f"{url}: {algorithm.upper()} {got} differs from the expected {digest}; the download was deleted")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _missing_folders(path: Path) -> List[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    return missing


def _remove_created(created: List[Path]) -> None:
    """Remove the folders a failed download created: the deepest with its content, the parents if empty."""
    if not created:
        return
    shutil.rmtree(created[0], ignore_errors=True)
    for folder in created[1:]:
        try:
            folder.rmdir()
        except OSError:
            break  # not empty: something else lives there now


def download_dataset(name: str, root: Optional[PathLike] = None, base_urls: Optional[Sequence[str]] = None) -> Path:
    """Fetch dataset ``name`` into ``<root>/<name>/`` (default: the user cache) and return that folder.

    Raises DataError when every mirror fails for some file (the message lists
    each URL tried and why) or when the dataset needs no download (digits). A
    failed download removes the folders it created (see the module docstring).
    """
    spec = get_spec(name)
    if not spec.downloads:
        raise DataError(f"{name} needs no download: it is bundled with scikit-learn")
    target = download_dir(spec, root)
    created = _missing_folders(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_created(created)
        raise DataError(
            f"cannot create {target} ({exc.strerror or exc}); download into another folder: "
            "--data-dir DIR (gapbench datasets), data.data_dir (a recipe) or $GAPBENCH_DATA"
        ) from None
    try:
        _download_into(spec, target, mirrors_for(name, base_urls))
    except BaseException:
        _remove_created(created)
        raise
    return target


def _download_into(spec, target: Path, urls: List[str]) -> None:
    """Fetch every file of ``spec`` missing from ``target`` (and extract an archive); see :func:`download_dataset`."""
    name = spec.name
    for f in spec.downloads:
        dest = target / f.name
        if spec.archive_dir and all((target / spec.archive_dir / m.name).is_file() for m in spec.files):
            break  # already extracted
        if _matches(dest, f):
            continue
        failures = []
        for base in urls:
            url = base + f.name
            logger.info("downloading %s", url)
            try:
                _fetch(url, dest, f)
                break
            except DataError as exc:
                failures.append(str(exc))
            except urllib.error.HTTPError as exc:
                failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
            except (urllib.error.URLError, OSError, ValueError) as exc:
                failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
        else:
            raise DataError(
                f"could not download {name}/{f.name}: " + "; ".join(failures)
                + f"; check the network, or set $GAPBENCH_MIRROR to a mirror holding {name}/{f.name}, "
                f"or put the file in {target} yourself"
            )
    if spec.archive_dir:
        archive = target / spec.downloads[0].name
        if archive.is_file():
            extracted = _missing_folders(target / spec.archive_dir)
            try:
                safe_extract(archive, target)
            except BaseException:
                _remove_created(extracted)  # a half-extracted folder would look like the dataset
                raise
            finally:
                archive.unlink()  # ours: extracted, or refused and useless
