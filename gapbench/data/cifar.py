"""CIFAR-10 from the python-pickle batches (Krizhevsky 2009).

Files: ``cifar-10-batches-py/data_batch_1..5`` (10,000 images each, the
standard training set), ``test_batch`` (the standard test set) and
``batches.meta``; or the ``cifar-10-python.tar.gz`` archive holding them, read
in memory without extracting.

Each batch is a pickled dict with ``b"data"``, uint8 [10000, 3072] where each
row is channel-major (1024 red, 1024 green, 1024 blue values, each a 32x32
image in row-major order), and ``b"labels"``, a list of 10,000 ints in 0..9.

Preprocessing: images [N, 3, 32, 32] as bytes v in 0..255, scaled to v/255;
with ``quantize_bits=b`` (the "3-bit CIFAR" of Cremer et al. uses b=3) each
byte becomes the level k = floor(v / 2^(8-b)) in 0..2^b-1, stored as
k / (2^b - 1).

Pickles can run code, so every batch is checked against its known SHA-256
before it is unpickled, and unpickled with an unpickler that only builds
plain containers and numpy arrays.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from gapbench.data.archive import read_members
from gapbench.data.errors import DataError

_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to build {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core.") :]  # numpy 2 moved it; skip the shim's warning
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str, sha256: str = None) -> dict:
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise DataError(
                f"{where}: SHA-256 {digest} differs from the expected {sha256}; "
                "it is not the standard CIFAR-10 file, replace it"
            )
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # a damaged pickle raises almost anything
        raise DataError(f"{where}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}); get it again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a pickled dict, found {type(obj).__name__}; get it again")
    return obj


def _batch(obj: dict, where: str) -> Tuple[np.ndarray, np.ndarray]:
    if b"data" not in obj or b"labels" not in obj:
        raise DataError(f"{where}: a CIFAR-10 batch needs keys b'data' and b'labels', found {sorted(obj)}; get it again")
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{where}: b'data' is {data.dtype} {list(data.shape)}, expected uint8 [N, 3072]; get it again")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{where}: {data.shape[0]} images but {labels.size} labels; get it again")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{where}: labels outside 0..9; get it again")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar_set(spec, found) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train [50000, 3, 32, 32] uint8, train labels, test images, test labels), checked against ``spec``."""
    digests = {f.name: f.payload_sha256 for f in spec.files}
    names = [f.name for f in spec.files]
    if found.archive is not None:
        blobs: Dict[str, bytes] = read_members(found.archive, names, spec.archive_dir)
        where = {n: f"{found.archive}:{spec.archive_dir}/{n}" for n in names}
    else:
        blobs = {n: found.path(n).read_bytes() for n in names}
        where = {n: str(found.path(n)) for n in names}
    if "batches.meta" in blobs:
        meta = _unpickle(blobs["batches.meta"], where["batches.meta"], digests["batches.meta"])
        if len(meta.get(b"label_names", ())) != spec.num_classes:
            raise DataError(f"{where['batches.meta']}: expected {spec.num_classes} b'label_names'; get it again")
    parts = {n: _batch(_unpickle(blobs[n], where[n], digests[n]), where[n]) for n in names if n != "batches.meta"}
    train_x = np.concatenate([parts[n][0] for n in _TRAIN_BATCHES])
    train_y = np.concatenate([parts[n][1] for n in _TRAIN_BATCHES])
    test_x, test_y = parts["test_batch"]
    for split, x, n in (("training", train_x, spec.num_train), ("test", test_x, spec.num_test)):
        if x.shape[0] != n:
            raise DataError(f"{found.folder}: the {split} batches hold {x.shape[0]} images, expected {n}; get them again")
    return train_x, train_y, test_x, test_y


def quick_problem(spec, found) -> Optional[Tuple[Path, str]]:
    """(file, why) when a found CIFAR-10 file is visibly cut short, from a few bytes of each; else None.

    A batch is a pickle, which always ends with the STOP opcode ``.``. A gzipped
    archive records its decompressed length, which for a tar is a whole number of
    512-byte blocks; only where it is not is the archive read through (to confirm,
    so a valid file is never called damaged). Content (SHA-256) is left to loading.
    """
    if found.archive is not None:
        path = found.archive
        try:
            with open(path, "rb") as fh:
                if fh.read(2) != b"\x1f\x8b":
                    return None  # an uncompressed tar: loading checks it
                if fh.seek(0, 2) < 18:
                    return path, "too short for a gzip file"
                fh.seek(-4, 2)
                (length_mod,) = struct.unpack("<I", fh.read(4))
        except OSError as exc:
            return path, f"cannot be read: {exc.strerror or exc}"
        if length_mod % 512 == 0:
            return None
        try:
            with tarfile.open(path, "r:gz") as tar:
                tar.getmembers()
        except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as exc:
            return path, f"archive cut short or damaged: {exc}"
        return None
    for f in spec.files:
        path = found.path(f.name)
        try:
            with open(path, "rb") as fh:
                size = fh.seek(0, 2)
                if size == 0:
                    return path, "empty file"
                fh.seek(-1, 2)
                last = fh.read(1)
        except OSError as exc:
            return path, f"cannot be read: {exc.strerror or exc}"
        if last != b".":
            return path, f"the pickle lacks its end mark: cut short at {size} bytes"
    return None


def quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """Bytes 0..255 -> levels k = floor(v / 2^(8-bits)) in 0..2^bits-1 (uint8)."""
    if not 1 <= bits <= 8:
        raise DataError(f"quantize_bits={bits}: must be between 1 and 8")
    return (x >> (8 - bits)).astype(np.uint8)
