"""Omniglot, the 28x28 version of the IWAE paper (Burda et al. 2016): ``chardata.mat``.

The MATLAB v5 file holds ``data`` [784, 24345] (training images, one per
column) and ``testdata`` [784, 8070], grey levels in [0, 1], with one-hot
alphabet labels ``target`` [50, 24345] and ``testtarget`` [50, 8070].

Each column is a 28x28 image stored column-major (MATLAB's order), so the
image is ``column.reshape(28, 28, order="F")``; this is what the IWAE code's
``data.T.reshape(-1, 28, 28).reshape(-1, 784, order="F")`` does. Reading the
column row-major would transpose every character.

Preprocessing: none beyond the reshape (values are already in [0, 1]);
labels are the alphabet index 0..49 (argmax of the one-hot columns).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from gapbench.data.errors import DataError


def columns_to_images(columns: np.ndarray, side: int = 28) -> np.ndarray:
    """[side*side, N] column-major images -> [N, side, side]."""
    n = columns.shape[1]
    return columns.T.reshape(n, side, side).transpose(0, 2, 1)


def _labels(mat: dict, key: str, n: int, path) -> np.ndarray:
    if key not in mat:
        raise DataError(f"{path}: no {key!r} label array; get the file again")
    onehot = np.asarray(mat[key])
    if onehot.ndim != 2 or onehot.shape[1] != n:
        raise DataError(f"{path}: {key!r} has shape {list(onehot.shape)}, expected [classes, {n}]; get the file again")
    return onehot.argmax(axis=0).astype(np.int64)


def quick_problem(path: Path) -> Optional[str]:
    """Why ``chardata.mat`` is visibly cut short, from its element tags alone; None when it looks whole.

    A MATLAB v5 file is a 128-byte header and then data elements, each an 8-byte tag
    (type, byte count) and that many bytes; the last one must end exactly at the end
    of the file. Other versions are left to loading. Content is left to loading.
    """
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            header = fh.read(128)
            if len(header) < 128:
                return f"only {len(header)} bytes, too short for a MATLAB file header"
            order = {b"IM": "<", b"MI": ">"}.get(header[126:128])
            if order is None or struct.unpack(order + "H", header[124:126])[0] != 0x0100:
                return None  # not version 5: loading decides
            pos = 128
            while pos < size:
                fh.seek(pos)
                tag = fh.read(8)
                if len(tag) < 8:
                    return f"cut short: {size - pos} stray bytes after the last element at byte {pos}"
                kind, count = struct.unpack(order + "II", tag)
                if kind >> 16:  # small element: type and count share the first word, data in the second
                    pos += 8
                    continue
                if pos + 8 + count > size:
                    return f"cut short: an element at byte {pos} needs {count} bytes, the file ends after {size - pos - 8}"
                pos += 8 + count
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    return None


def load_omniglot_set(spec, found) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train [N, 28, 28] float32 in [0, 1], train labels, test images, test labels) from ``chardata.mat``."""
    import scipy.io

    path = found.path("chardata.mat")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises many types for a damaged file
        raise DataError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {exc}); get it again") from None
    side = spec.image_shape[-1]
    out = []
    for key, lab_key, n in (("data", "target", spec.num_train), ("testdata", "testtarget", spec.num_test)):
        if key not in mat:
            raise DataError(f"{path}: no {key!r} array (found {sorted(k for k in mat if not k.startswith('__'))}); get it again")
        cols = np.asarray(mat[key], dtype=np.float32)
        if cols.shape != (side * side, n):
            raise DataError(f"{path}: {key!r} has shape {list(cols.shape)}, expected [{side * side}, {n}]; get it again")
        if cols.size and (cols.min() < 0 or cols.max() > 1 or not np.isfinite(cols).all()):
            raise DataError(f"{path}: {key!r} has values outside [0, 1]; get it again")
        out += [columns_to_images(cols, side), _labels(mat, lab_key, n, path)]
    return tuple(out)
