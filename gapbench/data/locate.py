"""Where dataset files are looked for, in order, and what to say when they are not there.

For a dataset ``<name>`` the folders searched are, first match wins:

1. ``<root>/<name>/`` where ``<root>`` is the ``data_dir`` argument or, when
   none is given, ``$GAPBENCH_DATA``;
2. torchvision's layout under the same root: ``<root>/MNIST/raw/``,
   ``<root>/FashionMNIST/raw/``, and for CIFAR-10 ``<root>/`` itself (which
   holds ``cifar-10-batches-py/``);
3. the user cache ``$XDG_CACHE_HOME/gapbench/<name>/`` (default
   ``~/.cache/gapbench/<name>/``), where ``gapbench datasets --download``
   writes;
4. folders an OS package installs: ``/usr/share/datasets/fashion-mnist``
   (Debian's ``dataset-fashion-mnist``).

A folder *has* the dataset when every file of the spec is there. IDX files may
be gzipped (``*.gz``, as distributed) or already decompressed (as torchvision
leaves them in ``raw/``). CIFAR-10 may be the extracted
``cifar-10-batches-py/`` folder or the ``cifar-10-python.tar.gz`` archive.
Only presence is checked here; the loaders check content.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

from gapbench.data.errors import DataError
from gapbench.data.registry import CIFAR_ARCHIVE, DatasetSpec

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Found:
    """Where a dataset was found: the folder and the path of each file (``archive`` for a CIFAR tar.gz)."""

    folder: Path
    paths: Tuple[Tuple[str, Path], ...]  # (file name in the spec, path on disk or the archive), hashable
    archive: Optional[Path] = None

    def path(self, name: str) -> Path:
        return dict(self.paths)[name]


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/gapbench`` (default ``~/.cache/gapbench``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gapbench"


def user_root(data_dir: Optional[PathLike]) -> Optional[Path]:
    """The root the user named: ``data_dir``, else ``$GAPBENCH_DATA``, else None."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("GAPBENCH_DATA")
    return Path(env).expanduser() if env else None


def download_dir(spec: DatasetSpec, root: Optional[PathLike] = None) -> Path:
    """Where a download of ``spec`` goes: ``<root>/<name>/``, else the user cache."""
    return (Path(root).expanduser() if root is not None else cache_root()) / spec.name


def candidate_dirs(spec: DatasetSpec, data_dir: Optional[PathLike] = None) -> List[Path]:
    """Every folder searched for ``spec``, in order (see the module docstring)."""
    dirs: List[Path] = []
    root = user_root(data_dir)
    if root is not None:
        dirs.append(root / spec.name)
        if spec.torchvision_dir:
            dirs.append(root / spec.torchvision_dir / "raw")
        if spec.archive_dir:
            dirs.append(root)
    dirs.append(cache_root() / spec.name)
    dirs.extend(Path(d) for d in spec.system_dirs)
    unique: List[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _names(name: str) -> List[str]:
    """A file's accepted names: as distributed, and decompressed for ``*.gz``."""
    return [name, name[: -len(".gz")]] if name.endswith(".gz") else [name]


def _find_in(spec: DatasetSpec, folder: Path) -> Optional[Found]:
    if spec.archive_dir:
        inner = folder / spec.archive_dir
        if all((inner / f.name).is_file() for f in spec.files):
            return Found(folder, tuple((f.name, inner / f.name) for f in spec.files))
        if (folder / CIFAR_ARCHIVE).is_file():
            archive = folder / CIFAR_ARCHIVE
            return Found(folder, tuple((f.name, archive) for f in spec.files), archive=archive)
        return None
    paths = []
    for f in spec.files:
        hits = [folder / n for n in _names(f.name) if (folder / n).is_file()]
        if not hits:
            return None
        paths.append((f.name, hits[0]))
    return Found(folder, tuple(paths))


def find_files(spec: DatasetSpec, data_dir: Optional[PathLike] = None) -> Optional[Found]:
    """The first folder that holds every file of ``spec``, or None."""
    for folder in candidate_dirs(spec, data_dir):
        found = _find_in(spec, folder)
        if found is not None:
            return found
    return None


def needed_files(spec: DatasetSpec) -> str:
    if spec.archive_dir:
        return f"{spec.archive_dir}/ ({', '.join(f.name for f in spec.files)}) or {CIFAR_ARCHIVE}"
    return ", ".join(f.name for f in spec.files)


def how_to_get(spec: DatasetSpec, data_dir: Optional[PathLike] = None) -> str:
    """One line: the ways to obtain ``spec``'s files."""
    if not spec.files:
        return "bundled with scikit-learn (pip install scikit-learn)"
    ways = []
    if spec.apt_package:
        ways.append(f"apt-get install {spec.apt_package}")
    ways.append(f"gapbench datasets --download {spec.name}")
    target = download_dir(spec, user_root(data_dir))
    ways.append(f"put {needed_files(spec)} in {target}")
    return ", or ".join(ways)


def missing_error(spec: DatasetSpec, data_dir: Optional[PathLike] = None) -> DataError:
    """The one-line error for a dataset found nowhere: every folder looked in, and how to get it."""
    partial = []
    for folder in candidate_dirs(spec, data_dir):
        inner = folder / spec.archive_dir if spec.archive_dir else folder
        present = [f.name for f in spec.files if any((inner / n).is_file() for n in _names(f.name))]
        if present and len(present) < len(spec.files):
            partial.append(f"{folder} has only {', '.join(present)}")
    looked = ", ".join(str(d) for d in candidate_dirs(spec, data_dir))
    extra = f" ({'; '.join(partial)})" if partial else ""
    return DataError(
        f"{spec.name} not found: looked in {looked} for {needed_files(spec)}{extra}; to get it: {how_to_get(spec, data_dir)}"
    )
