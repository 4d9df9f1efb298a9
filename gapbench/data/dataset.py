"""Loading a dataset as tensors with fixed, seeded train / validation / test splits.

Splits. The standard test set is the test split. The validation split is
carved from the standard training set: with ``perm`` a permutation of its N
indices from ``torch.Generator().manual_seed(split_seed)``, validation takes
``perm[:num_valid]`` and training the rest, each kept in the original file
order. digits has no standard test set: one seeded permutation of all 1,797
images gives test ``perm[:300]``, validation ``perm[300:300+num_valid]`` and
training the rest.

Default sizes (train / valid / test): mnist and fashion-mnist 50,000 / 10,000 /
10,000; cifar10 45,000 / 5,000 / 10,000; omniglot 22,345 / 2,000 / 8,070;
digits 1,197 / 300 / 300.

Decoded files are kept in memory per process (keyed by path, size and
modification time), so a second load costs only the split; nothing is ever
written next to the data.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from gapbench.data import cifar, digits, idx, omniglot
from gapbench.data.download import download_dataset
from gapbench.data.errors import DataError
from gapbench.data.locate import Found, PathLike, find_files, how_to_get, missing_error
from gapbench.data.registry import DATASETS, DatasetSpec, get_spec

_DESCRIPTIONS = {
    "digits": "scikit-learn load_digits, 8x8 pixel counts 0..16 scaled by 1/16",
    "mnist": "MNIST IDX bytes 0..255 scaled by 1/255",
    "fashion-mnist": "Fashion-MNIST IDX bytes 0..255 scaled by 1/255",
    "cifar10": "CIFAR-10 python batches, RGB bytes 0..255 scaled by 1/255",
    "omniglot": "Omniglot 28x28 (IWAE chardata.mat), columns read column-major, values in [0, 1]",
}


@dataclass
class Dataset:
    """A dataset's three splits as float32 tensors [N, C, H, W] in [0, 1], with int64 labels."""

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    valid_labels: torch.Tensor
    test_labels: torch.Tensor
    image_shape: Tuple[int, int, int]
    num_levels: Optional[int]  # None: continuous; L: values k/(L-1), k = 0..L-1
    source: str
    description: str


@dataclass(frozen=True)
class DatasetStatus:
    """One row of ``gapbench datasets``: ``status`` is "available", "missing" or "damaged".

    ``how_to_get`` says how to obtain a missing dataset; for a damaged one it is
    ``problem``: which file, why, and what to do.
    """

    name: str
    available: bool
    location: Optional[str]
    how_to_get: str
    problem: Optional[str] = None  # "damaged: <file> is truncated or corrupt (<why>); ..." or None

    @property
    def status(self) -> str:
        return "damaged" if self.problem else "available" if self.available else "missing"


def _stamp(paths) -> Tuple:
    """(path, size, mtime) of each file: a changed file is decoded again."""
    return tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in sorted({str(p) for p in paths}))


@functools.lru_cache(maxsize=4)
def _decode(spec: DatasetSpec, stamp: Tuple, found: Found):
    """The decoded, checked arrays of ``found``; cached per (spec, file stamps), returned read-only."""
    if spec.archive_dir:
        arrays = cifar.load_cifar_set(spec, found)
    elif spec.files[0].name.endswith(".mat"):
        arrays = omniglot.load_omniglot_set(spec, found)
    else:
        arrays = idx.load_idx_set(spec, found)
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _raw_arrays(spec: DatasetSpec, data_dir, download: bool):
    """(train x, train y, test x, test y, source) as numpy arrays, from wherever the files are."""
    found = find_files(spec, data_dir)
    if found is None and download:
        download_dataset(spec.name, root=data_dir)
        found = find_files(spec, data_dir)
    if found is None:
        raise missing_error(spec, data_dir)
    arrays = _decode(spec, _stamp(p for _, p in found.paths), found)
    source = str(found.archive or found.folder)
    return (*arrays, source)


def seeded_split(num: int, num_valid: int, split_seed: int, num_test: int = 0):
    """(train, valid, test) index tensors into ``num`` rows, each in file order (see the module docstring).

    With ``perm`` the permutation of ``num`` seeded by ``split_seed``: test ``perm[:num_test]``,
    valid the next ``num_valid``, train the rest; ``num_test=0`` gives an empty test split.
    """
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(int(split_seed)))
    test_idx, perm = perm[:num_test].sort().values, perm[num_test:]
    return perm[num_valid:].sort().values, perm[:num_valid].sort().values, test_idx


def _to_images(x: np.ndarray, shape, divisor: float) -> torch.Tensor:
    """uint8 or float [N, ...] -> float32 [N, C, H, W] divided by ``divisor`` (correctly rounded, a fresh copy)."""
    return torch.from_numpy(np.divide(x, divisor, dtype=np.float32)).reshape(-1, *shape)


def load_dataset(
    name: str,
    *,
    data_dir: Optional[PathLike] = None,
    download: bool = False,
    split_seed: int = 0,
    num_valid: Optional[int] = None,
    quantize_bits: Optional[int] = None,
) -> Dataset:
    """Dataset ``name`` split into train / valid / test tensors (see the module docstring).

    Args:
        name: one of :data:`DATASETS`.
        data_dir: a root searched first (``<data_dir>/<name>/``); default ``$GAPBENCH_DATA``.
        download: when the files are found nowhere, fetch them into ``<data_dir>/<name>/``, else the user cache.
        split_seed: seed of the permutation that carves the validation split.
        num_valid: validation size (default: the dataset's standard one).
        quantize_bits: b in 1..8 for 8-bit data: values k / (2^b - 1), k = floor(v / 2^(8-b)).

    Raises DataError for an unknown name, missing or damaged files, or bad sizes.
    """
    spec = get_spec(name)
    if quantize_bits is not None and name not in ("mnist", "fashion-mnist", "cifar10"):
        raise DataError(f"quantize_bits applies to 8-bit datasets (mnist, fashion-mnist, cifar10), not {name}")
    if name == "digits":
        x_pool, y_pool = digits.load_digits_set()
        x_test = y_test = None
        source, divisor = "scikit-learn (bundled load_digits)", 1.0
        num_pool = spec.num_train - spec.num_test
    else:
        x_pool, y_pool, x_test, y_test, source = _raw_arrays(spec, data_dir, download)
        num_pool = x_pool.shape[0]
        divisor = 1.0 if name == "omniglot" else 255.0
    num_valid = spec.num_valid if num_valid is None else int(num_valid)
    if not 1 <= num_valid < num_pool:
        raise DataError(f"num_valid={num_valid}: must be between 1 and {num_pool - 1} for {name} ({num_pool} training images)")

    # digits: the test split is the head of the same permutation
    train_idx, valid_idx, test_idx = seeded_split(
        x_pool.shape[0], num_valid, split_seed, num_test=spec.num_test if x_test is None else 0
    )

    num_levels, description = None, _DESCRIPTIONS[name]
    if quantize_bits is not None:
        x_pool, x_test = cifar.quantize(x_pool, quantize_bits), cifar.quantize(x_test, quantize_bits)
        num_levels = 2**quantize_bits
        divisor = float(num_levels - 1)
        description += f"; quantized to {quantize_bits} bits: k = floor(v / {2 ** (8 - quantize_bits)}), stored as k/{num_levels - 1}"
    shape = tuple(spec.image_shape)
    images = _to_images(x_pool, shape, divisor)
    labels = torch.from_numpy(np.array(y_pool, dtype=np.int64))
    if x_test is None:
        test, test_labels = images[test_idx], labels[test_idx]
    else:
        test, test_labels = _to_images(x_test, shape, divisor), torch.from_numpy(np.array(y_test, dtype=np.int64))
    return Dataset(
        name=name,
        train=images[train_idx],
        valid=images[valid_idx],
        test=test,
        train_labels=labels[train_idx],
        valid_labels=labels[valid_idx],
        test_labels=test_labels,
        image_shape=shape,
        num_levels=num_levels,
        source=source,
        description=f"{description}; split seed {split_seed}: "
        f"{len(train_idx)} train / {len(valid_idx)} valid / {len(test)} test",
    )


def quick_check(spec: DatasetSpec, found: Found) -> Optional[Tuple[Path, str]]:
    """(file, why) when a found file is visibly truncated or is not the expected file, else None.

    Reads only headers and trailers (milliseconds); the full checks, SHA-256
    included, run when the dataset is loaded.
    """
    if spec.archive_dir:
        return cifar.quick_problem(spec, found)
    if spec.files[0].name.endswith(".mat"):
        path = found.path(spec.files[0].name)
        why = omniglot.quick_problem(path)
        return (path, why) if why else None
    for f in spec.files:
        path = found.path(f.name)
        why = idx.quick_problem(path, idx.magic_of(f.name), idx.expected_dims(spec, f.name))
        if why:
            return path, why
    return None


def available_datasets(data_dir: Optional[PathLike] = None) -> List[DatasetStatus]:
    """For each dataset: whether its files are present and look whole, where, and how to get it.

    Files are checked quickly (:func:`quick_check`: lengths and headers); a damaged one
    makes the row "damaged", with the file and the fix, rather than "available".
    """
    rows = []
    for name in DATASETS:
        spec = get_spec(name)
        if not spec.files:
            rows.append(DatasetStatus(name, True, "scikit-learn (bundled)", how_to_get(spec, data_dir)))
            continue
        found = find_files(spec, data_dir)
        location = str(found.archive or found.folder) if found else None
        damage = quick_check(spec, found) if found else None
        if damage is not None:
            path, why = damage
            problem = (
                f"damaged: {path} is truncated or corrupt ({why}); delete it and download again "
                f"(gapbench datasets --download {name})"
            )
            rows.append(DatasetStatus(name, False, location, problem, problem))
            continue
        rows.append(DatasetStatus(name, found is not None, location, how_to_get(spec, data_dir)))
    return rows
