"""Your own data (``data.dataset: files``): arrays in a .npz or .npy file, or a folder of images.

``data.path`` names one of:

* a ``.npz`` with arrays ``train`` and ``test``, and optionally ``valid`` (without
  it, the validation split is carved from ``train`` as mnist's is), each with
  optional labels ``train_labels``, ``valid_labels``, ``test_labels`` (all or none);
* a ``.npz`` with one array ``x`` (and optionally its labels ``y``), or holding a
  single array of any name; or a ``.npy`` of one array;
* a folder of PNG/JPEG images, optionally one subfolder per class
  (:mod:`gapbench.data.images`).

One array (or folder) is split as digits is: one permutation of its N images
seeded by ``split_seed`` gives test its first ``num_test``, validation the next
``num_valid`` and training the rest, each kept in file order; both default to
a tenth of N (at least 1).

Images may be [N, H, W], [N, C, H, W] or [N, H, W, C] (channels last when the
last dimension is 1 or 3 and the second is not). Values are integers 0..255
(divided by 255), booleans, or floats in [0, 1]; integers that are all 0 or 1
are binary and kept as they are. Every check fails with a one-line
:class:`DataError` naming the file, the problem and the fix: a missing or
unreadable file, unknown array names, NaN or infinite values, values out of
range, splits of different image shapes, too few images to split.

The content hash (:func:`content_sha256`): the SHA-256 of a file's bytes, or of a
folder's images (:func:`gapbench.data.images.folder_sha256`). A recipe records it
as ``data.sha256``; a load whose content no longer matches is an error.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import zipfile
import zlib
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from gapbench.data import images
from gapbench.data.dataset import Dataset, seeded_split
from gapbench.data.errors import DataError
from gapbench.data.locate import PathLike

SPLITS = ("train", "valid", "test")
_FIX_KEYS = (
    "name the arrays train and test (optionally valid and train_labels, valid_labels, test_labels), "
    "or x (optionally y) for one array split by data.split_seed, or save a single array"
)


def _stamp(path: Path) -> Tuple:
    """What identifies a file's or folder's current content cheaply: (path, size, mtime) of each file."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, stamp: Tuple) -> str:
    p = Path(path)
    if p.is_dir():
        return images.folder_sha256(p)
    h = hashlib.sha256()
    try:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise DataError(f"data.path {p}: cannot read it ({exc.strerror or exc}); check its permissions") from None
    return h.hexdigest()


def content_sha256(path: PathLike) -> str:
    """The SHA-256 of the file at ``path``, or of the images of the folder (see the module docstring)."""
    p = _existing(path)
    return _sha256(str(p), _stamp(p))


def _existing(path: PathLike) -> Path:
    p = Path(os.path.abspath(Path(path).expanduser()))
    if not p.exists():
        raise DataError(
            f"data.path {p}: no such file or folder (a relative data.path is read from the recipe file's folder, "
            "or the working directory for --set); fix data.path"
        )
    return p


# ---------------------------------------------------------------- reading


@functools.lru_cache(maxsize=2)
def _read(path: str, stamp: Tuple):
    """(arrays {name: ndarray}, labels {split: ndarray}, layout, content hash), cached per file stamp (read-only)."""
    p = Path(path)
    if p.is_dir():
        x, labels, classes, sha = images.read_images(p)
        layout = f"a folder of {len(x)} PNG/JPEG images"
        if classes:
            named = ", ".join(f"{c}={i}" for i, c in enumerate(classes[:10])) + (", ..." if len(classes) > 10 else "")
            layout += f" in {len(classes)} class folders ({named})"
        arrays = {"x": x.transpose(0, 3, 1, 2)}  # (N, C, H, W)
        label_arrays = {} if labels is None else {"x": labels}
    else:
        arrays, sha = _read_numpy(p)
        arrays, label_arrays, layout = _layout(p, arrays)
    for a in (*arrays.values(), *label_arrays.values()):
        a.flags.writeable = False
    return arrays, label_arrays, layout, sha


def _read_numpy(path: Path) -> Tuple[Dict[str, np.ndarray], str]:
    """Every array of a .npz (or the array of a .npy) and the SHA-256 of the file's bytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"data.path {path}: cannot read it ({exc.strerror or exc}); check its permissions") from None
    try:
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = {"the array": loaded}
        else:
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except ValueError as exc:
        if "pickle" not in str(exc):
            raise DataError(
                f"data.path {path}: cannot be read as .npy/.npz ({exc}); write it again with numpy.savez"
            ) from None
        raise DataError(
            f"data.path {path}: is not a NumPy .npy/.npz file, or holds Python objects (which are not loaded); "
            "save numeric arrays with numpy.savez or numpy.save"
        ) from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"data.path {path}: is damaged or truncated ({type(exc).__name__}: {exc}); write it again with numpy.savez"
        ) from None
    foreign = [k for k, a in arrays.items() if not isinstance(a, np.ndarray)]  # NpzFile gives such members as bytes
    if foreign:
        raise DataError(
            f"data.path {path}: holds {', '.join(foreign)}, which is not a NumPy array (damaged, or not written by "
            "numpy.savez); write it again with numpy.savez"
        )
    return arrays, hashlib.sha256(raw).hexdigest()


def _layout(path: Path, arrays: Dict[str, np.ndarray]):
    """(image arrays, label arrays, what they are): named splits, or one array to split."""
    keys = set(arrays)
    found = ", ".join(sorted(keys)) or "no arrays"
    if keys & set(SPLITS):
        allowed = set(SPLITS) | {f"{s}_labels" for s in SPLITS}
        missing = [k for k in ("train", "test") if k not in keys]
        stray = sorted(keys - allowed) + [k for k in sorted(keys & allowed) if k.endswith("_labels")
                                          and k[: -len("_labels")] not in keys]
        if missing or stray:
            what = f"lacks {' and '.join(missing)}" if missing else f"has {', '.join(stray)} besides its splits"
            raise DataError(f"data.path {path}: {what} (found {found}); {_FIX_KEYS}")
        splits = [s for s in SPLITS if s in keys]
        labelled = [s for s in splits if f"{s}_labels" in keys]
        if labelled and labelled != splits:
            raise DataError(
                f"data.path {path}: has labels for {', '.join(labelled)} but not for "
                f"{', '.join(s for s in splits if s not in labelled)}; give labels for every split or for none"
            )
        layout = f"arrays {', '.join(splits)}" + (" with labels" if labelled else "")
        return {s: arrays[s] for s in splits}, {s: arrays[f"{s}_labels"] for s in labelled}, layout
    if "x" in keys and keys <= {"x", "y"}:
        layout = "one array x" + (" with labels y" if "y" in keys else "")
        return {"x": arrays["x"]}, ({"x": arrays["y"]} if "y" in keys else {}), layout
    if len(keys) == 1:
        (name,) = keys
        return {"x": arrays[name]}, {}, f"one array ({name})" if name != "the array" else "one array"
    raise DataError(
        f"data.path {path}: the arrays' names do not say which images are which (found {found}); {_FIX_KEYS}"
    )


# ---------------------------------------------------------------- checking


def _as_nchw(path: Path, name: str, a: np.ndarray) -> np.ndarray:
    """Images [N, H, W], [N, C, H, W] or [N, H, W, C] as [N, C, H, W] (a view)."""
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    elif a.ndim != 4:
        raise DataError(
            f"data.path {path}: {name} has shape {list(a.shape)}; expected images [N, H, W], [N, C, H, W] "
            "or [N, H, W, C] (reshape flat vectors to [N, H, W])"
        )
    if a.shape[0] == 0 or 0 in a.shape[1:]:
        raise DataError(f"data.path {path}: {name} holds no images (shape {list(a.shape)}); give it some")
    return a


def _kind(a: np.ndarray) -> str:
    return {"b": "boolean", "u": "integer", "i": "integer", "f": "float"}.get(a.dtype.kind, str(a.dtype))


def _check_values(path: Path, arrays: Dict[str, np.ndarray]) -> Tuple[float, bool, str]:
    """(divisor to [0, 1], whether the values are 8-bit integers, what they are); raises on any bad value."""
    kinds = {name: _kind(a) for name, a in arrays.items()}
    if len(set(kinds.values())) > 1:
        raise DataError(
            f"data.path {path}: the arrays mix value types ({', '.join(f'{n} {arrays[n].dtype}' for n in arrays)}); "
            "save them alike: all uint8 0..255, or all floats in [0, 1]"
        )
    kind = next(iter(kinds.values()))
    if kind == "boolean":
        return 1.0, False, "binary (booleans)"
    if kind not in ("integer", "float"):
        raise DataError(f"data.path {path}: holds {kind} values; expected integers 0..255 or floats in [0, 1]")
    if kind == "float":
        for name, a in arrays.items():
            bad = ~np.isfinite(a)
            count = int(bad.sum())
            if count:
                first = [int(i) for i in np.argwhere(bad)[0]]
                raise DataError(
                    f"data.path {path}: {name} holds {count} NaN or infinite value(s), the first at index {first}; "
                    "replace or drop those images"
                )
    expected = "integers 0..255" if kind == "integer" else "floats in [0, 1]"
    top = 255 if kind == "integer" else 1
    highest = 0
    for name, a in arrays.items():
        lo, hi = a.min().item(), a.max().item()
        if lo < 0 or hi > top:
            hint = "; floats 0..255? divide them by 255 or save them as uint8" if kind == "float" and hi <= 255 else ""
            raise DataError(
                f"data.path {path}: {name} holds values from {lo:g} to {hi:g}, outside the range of {expected}; "
                f"rescale them{hint}"
            )
        highest = max(highest, hi)
    if kind == "float":
        return 1.0, False, "floats in [0, 1]"
    if highest <= 1:
        return 1.0, False, "binary (integers 0 and 1)"
    return 255.0, True, "8-bit integers scaled by 1/255"


def _labels(path: Path, name: str, y: np.ndarray, num: int) -> torch.Tensor:
    """Class labels [num] as int64; raises unless they are one integer per image."""
    if y.ndim != 1 or y.shape[0] != num:
        raise DataError(
            f"data.path {path}: {name} has shape {list(y.shape)}, but its images number {num}; "
            f"give one integer label per image ([{num}])"
        )
    whole = y.dtype.kind in "biu" or (y.dtype.kind == "f" and bool(np.all(np.isfinite(y) & (y == np.round(y)))))
    if not whole:
        raise DataError(
            f"data.path {path}: {name} holds {y.dtype} values that are not all integers; labels are class numbers"
        )
    return torch.from_numpy(y.astype(np.int64))


def _default_size(num: int) -> int:
    return max(1, num // 10)


def load_files(
    path: PathLike,
    *,
    split_seed: int = 0,
    num_valid: Optional[int] = None,
    num_test: Optional[int] = None,
    quantize_bits: Optional[int] = None,
    sha256: Optional[str] = None,
) -> Dataset:
    """Your own images at ``path`` as a :class:`Dataset` (see the module docstring).

    Args:
        path: a .npz, a .npy or a folder of PNG/JPEG images.
        split_seed: seed of the permutation that carves the splits not given as arrays.
        num_valid: validation size when carved (default: a tenth of the images it is carved from).
        num_test: test size when carved from one array (default: a tenth of the images).
        quantize_bits: b in 1..8 for 8-bit images: values k / (2^b - 1), k = floor(v / 2^(8-b)).
        sha256: the content hash the data must have (:func:`content_sha256`); None: not checked.

    Raises DataError naming the file for anything it cannot use.
    """
    p = _existing(path)
    arrays, label_arrays, layout, actual = _read(str(p), _stamp(p))
    if sha256 is not None and sha256.lower() != actual:
        raise DataError(
            f"data.path {p}: has changed since data.sha256 was recorded ({sha256[:12]}... expected, "
            f"{actual[:12]}... found); restore it, or train a new run on it (set data.sha256: null to accept it)"
        )
    images_of = {name: _as_nchw(p, name, a) for name, a in arrays.items()}
    shapes = {name: tuple(a.shape[1:]) for name, a in images_of.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise DataError(
            f"data.path {p}: the splits' images differ in shape ({listed}, [C, H, W]); give every split the same shape"
        )
    divisor, eight_bit, values = _check_values(p, images_of)
    num_levels = None
    if quantize_bits is not None:
        if not eight_bit:
            raise DataError(
                f"data.path {p}: data.quantize_bits needs 8-bit images (integers 0..255), but these are {values}; "
                "drop data.quantize_bits, or save the images as uint8 0..255"
            )
        images_of = {n: (a.astype(np.uint8) >> (8 - quantize_bits)) for n, a in images_of.items()}
        num_levels = 2**quantize_bits
        divisor = float(num_levels - 1)
        values += (f"; quantized to {quantize_bits} bits: k = floor(v / {2 ** (8 - quantize_bits)}), "
                   f"stored as k/{divisor:g}")
    tensors = {n: torch.from_numpy(np.ascontiguousarray(np.divide(a, divisor, dtype=np.float32)))
               for n, a in images_of.items()}
    labels = {n: _labels(p, "y" if n == "x" else f"{n}_labels", label_arrays[n], len(tensors[n]))
              for n in label_arrays}
    splits = _split(p, tensors, labels, split_seed, num_valid, num_test)
    (train, train_y), (valid, valid_y), (test, test_y) = (splits[s] for s in SPLITS)
    binary = all(bool(((x == 0) | (x == 1)).all()) for x in (train, valid, test))
    if binary and "binary" not in values:
        values += " (binary)"
    return Dataset(
        name="files",
        train=train,
        valid=valid,
        test=test,
        train_labels=train_y,
        valid_labels=valid_y,
        test_labels=test_y,
        image_shape=tuple(int(s) for s in train.shape[1:]),
        num_levels=num_levels,
        source=str(p),
        description=f"your own data, {p.name}: {layout}; {values}; "
        f"sha256 {actual}; split seed {split_seed}: {len(train)} train / {len(valid)} valid / {len(test)} test",
    )


def _split(path: Path, tensors, labels, split_seed: int, num_valid: Optional[int], num_test: Optional[int]):
    """{split: (images, labels or None)}: the arrays given, and the rest carved by :func:`seeded_split`."""
    if "x" in tensors:  # one array: test, valid and train carved from one permutation
        x, y, pool = tensors["x"], labels.get("x"), "the images"
        num = len(x)
        nt = _default_size(num) if num_test is None else num_test
    else:
        if num_test is not None:
            raise DataError(f"data.path {path}: has its own test array, so data.num_test does not apply; drop it")
        if "valid" in tensors:
            if num_valid is not None:
                raise DataError(
                    f"data.path {path}: has its own valid array, so data.num_valid does not apply; drop it"
                )
            return {s: (tensors[s], labels.get(s)) for s in SPLITS}
        x, y, pool = tensors["train"], labels.get("train"), "train"
        num, nt = len(x), 0
    nv = _default_size(num) if num_valid is None else num_valid
    if nt + nv >= num:
        sizes = f"{nt} test + {nv} valid" if nt else f"{nv} valid"
        raise DataError(
            f"data.path {path}: {pool} number {num}, too few for {sizes} + at least 1 train image; "
            "add images, or set data.num_valid" + (" / data.num_test" if nt else "") + " smaller"
        )
    train_idx, valid_idx, test_idx = seeded_split(num, nv, split_seed, num_test=nt)

    def take(idx):
        return x[idx], None if y is None else y[idx]

    out = {"train": take(train_idx), "valid": take(valid_idx)}
    out["test"] = take(test_idx) if nt else (tensors["test"], labels.get("test"))
    return out
