"""Reading IDX files (the MNIST / Fashion-MNIST format), gzipped or not, with every check.

An IDX file is a big-endian header followed by the raw bytes::

    magic (uint32)  0x00000803 images (unsigned byte, 3 dimensions)
                    0x00000801 labels (unsigned byte, 1 dimension)
    dims  (uint32 each)  N [, rows, cols]
    payload         N * rows * cols bytes, row-major

A file is accepted only when the magic number is the expected one, the payload
is exactly as long as the header says, and (where the spec knows it) the
SHA-256 of the decompressed bytes matches.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from gapbench.data.errors import DataError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is gzip (by its magic bytes); a bad gzip is a DataError."""
    raw = Path(path).read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"{path}: truncated or corrupt gzip ({exc}); delete it and get the file again "
            "(see `gapbench datasets`)"
        ) from None


def parse_idx(data: bytes, path: Path, magic: int, payload_sha256: Optional[str] = None) -> np.ndarray:
    """The uint8 array an IDX byte string holds: [N] for labels, [N, rows, cols] for images."""
    num_dims = magic & 0xFF
    header_len = 4 + 4 * num_dims
    if len(data) < header_len:
        raise DataError(f"{path}: only {len(data)} bytes, too short for an IDX header; get the file again")
    (found_magic,) = struct.unpack(">I", data[:4])
    if found_magic != magic:
        raise DataError(
            f"{path}: magic number 0x{found_magic:08x}, expected 0x{magic:08x} "
            f"({'images' if magic == IMAGES_MAGIC else 'labels'}); it is not the right IDX file, get it again"
        )
    dims: Tuple[int, ...] = struct.unpack(f">{num_dims}I", data[4:header_len])
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(data) - header_len
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {kind}: header says {'x'.join(map(str, dims))} = {expected} bytes of data, "
            f"file has {got}; get the file again"
        )
    if payload_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != payload_sha256:
            raise DataError(
                f"{path}: content SHA-256 {digest} differs from the expected {payload_sha256}; "
                "it is not the standard file, replace it"
            )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def read_idx(path: Path, magic: int, payload_sha256: Optional[str] = None) -> np.ndarray:
    """Read and check one IDX file (gzipped or not); see :func:`parse_idx`."""
    return parse_idx(read_bytes(path), Path(path), magic, payload_sha256)


def quick_problem(path: Path, magic: int, dims: Sequence[int]) -> Optional[str]:
    """Why the IDX file at ``path`` cannot be the one holding ``dims``, from its header and length; None if it looks whole.

    Reads a few bytes: the header and, for a gzip file, the trailer's record of the
    decompressed length (a cut-short download ends elsewhere, so the record does not
    match). Only where that record disagrees is the whole file decompressed, so a
    valid file is never called damaged (a gzip of several members records only its
    last one). Content (SHA-256) is left to loading.
    """
    header_len = 4 + 4 * (magic & 0xFF)
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    try:
        with open(path, "rb") as fh:
            gzipped = fh.read(2) == b"\x1f\x8b"
            size = fh.seek(0, 2)
            if gzipped:
                if size < 18:
                    return f"{size} bytes, too short for a gzip file"
                fh.seek(-4, 2)
                (length_mod,) = struct.unpack("<I", fh.read(4))  # ISIZE: the decompressed length mod 2^32
                fh.seek(0)
                with gzip.GzipFile(fileobj=fh) as stream:
                    header = stream.read(header_len)
                length_ok = length_mod == expected % 2**32
            else:
                fh.seek(0)
                header = fh.read(header_len)
                length_ok = size == expected
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        return f"unreadable gzip: {exc}"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if len(header) < header_len:
        return f"only {len(header)} bytes, too short for an IDX header"
    (found_magic,) = struct.unpack(">I", header[:4])
    if found_magic != magic:
        return f"magic number 0x{found_magic:08x}, expected 0x{magic:08x}"
    found_dims = struct.unpack(f">{magic & 0xFF}I", header[4:header_len])
    if tuple(found_dims) != tuple(dims):
        return f"header says {'x'.join(map(str, found_dims))}, expected {'x'.join(map(str, dims))}"
    if length_ok:
        return None
    if gzipped:
        try:
            with gzip.open(path) as stream:
                got = sum(len(block) for block in iter(lambda: stream.read(1 << 22), b""))
        except (EOFError, OSError, zlib.error) as exc:
            return f"gzip stream cut short or damaged: {exc}"
    else:
        got = size
    if got == expected:
        return None
    word = "cut short" if got < expected else "has trailing bytes"
    return f"{word}: {got - header_len} bytes of data, the header says {expected - header_len}"


def expected_dims(spec, name: str) -> Tuple[int, ...]:
    """The dimensions the IDX file ``name`` of ``spec`` must hold: (N, rows, cols) or (N,)."""
    num = spec.num_train if name.startswith("train") else spec.num_test
    return (num, *spec.image_shape[1:]) if "images" in name else (num,)


def magic_of(name: str) -> int:
    return IMAGES_MAGIC if "images" in name else LABELS_MAGIC


def _read_pair(spec, found, images_name: str, labels_name: str, num_expected: int, split: str):
    files = {f.name: f for f in spec.files}
    images = read_idx(found.path(images_name), IMAGES_MAGIC, files[images_name].payload_sha256)
    labels = read_idx(found.path(labels_name), LABELS_MAGIC, files[labels_name].payload_sha256)
    img_path, lab_path = found.path(images_name), found.path(labels_name)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{split} split: {img_path} has {images.shape[0]} images but {lab_path} has {labels.shape[0]} labels; "
            "the two files do not belong together, get both again"
        )
    if images.shape[0] != num_expected or tuple(images.shape[1:]) != tuple(spec.image_shape[1:]):
        raise DataError(
            f"{img_path}: {images.shape[0]} images of {images.shape[1]}x{images.shape[2]}, expected "
            f"{num_expected} of {spec.image_shape[1]}x{spec.image_shape[2]} for {spec.name}; get the file again"
        )
    if labels.size and int(labels.max()) >= spec.num_classes:
        raise DataError(f"{lab_path}: label {int(labels.max())} outside 0..{spec.num_classes - 1}; get the file again")
    return images, labels


def load_idx_set(spec, found) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images [N, H, W] uint8, train labels [N], test images, test labels) of an MNIST-format dataset."""
    train = _read_pair(spec, found, "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", spec.num_train, "train")
    test = _read_pair(spec, found, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", spec.num_test, "test")
    return train[0], train[1], test[0], test[1]
