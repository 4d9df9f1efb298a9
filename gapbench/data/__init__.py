"""Datasets as tensors: finding, verifying and downloading the standard files, splits, binarization.

Every user-facing failure raises :class:`DataError` with a one-line message
that names the problem and its fix.

* :func:`load_dataset` -- a :class:`Dataset` of float32 [N, C, H, W] splits in [0, 1].
* :func:`load_files` -- the same from your own .npz, .npy or folder of images;
  :func:`content_sha256` its content hash.
* :func:`available_datasets` -- what is present and how to get the rest.
* :func:`download_dataset` -- verified download into the user cache.
* :func:`binarize`, :func:`prepare_split`, :func:`binarize_batch`,
  :func:`epoch_generator` -- the four binarization modes.
"""

from gapbench.data.binarize import (
    BINARIZE_MODES,
    binarize,
    binarize_batch,
    epoch_generator,
    epoch_seed,
    prepare_split,
)
from gapbench.data.dataset import Dataset, DatasetStatus, available_datasets, load_dataset
from gapbench.data.download import download_dataset
from gapbench.data.errors import DataError
from gapbench.data.files import content_sha256, load_files
from gapbench.data.locate import cache_root, candidate_dirs
from gapbench.data.registry import DATASETS, SPECS, DatasetSpec, FileSpec, get_spec

__all__ = [
    "BINARIZE_MODES",
    "DATASETS",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "DatasetStatus",
    "FileSpec",
    "SPECS",
    "available_datasets",
    "binarize",
    "binarize_batch",
    "cache_root",
    "candidate_dirs",
    "content_sha256",
    "download_dataset",
    "epoch_generator",
    "epoch_seed",
    "get_spec",
    "load_dataset",
    "load_files",
    "prepare_split",
]
