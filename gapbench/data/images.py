"""A folder of PNG/JPEG images as one uint8 array [N, H, W, C], with class labels from its subfolders.

Two layouts are read:

* images directly in the folder: no labels;
* one subfolder per class (``<folder>/<class>/*.png``): the label of an image is
  the index of its class in the sorted subfolder names.

Images are read in sorted name order (classes first), with PIL, which
matplotlib installs. Greyscale images give one channel, colour images three;
black-and-white (mode ``1``) images are read as 0 / 255, an alpha channel that
is everywhere opaque is dropped. Hidden files (``.*``) are skipped; other
non-image files are skipped with a warning.

The content hash of a folder is the SHA-256 of, for each image in that order,
its path relative to the folder, a NUL byte, and the SHA-256 of its bytes: it
changes when an image is added, removed, renamed or edited.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from gapbench.data.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _visible(folder: Path) -> List[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise DataError(
            f"data.path {folder}: cannot list the folder ({exc.strerror or exc}); check its permissions"
        ) from None


def list_images(folder: Path) -> Tuple[List[Path], Optional[np.ndarray], Optional[List[str]]]:
    """(image files in reading order, int64 labels [N] or None, class names or None) of ``folder``."""
    entries = _visible(folder)
    dirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if p.is_file() and _is_image(p)]
    if dirs and loose:
        raise DataError(
            f"data.path {folder}: holds both images ({loose[0].name}) and subfolders ({dirs[0].name}); "
            "put every image in a class subfolder, or all of them directly in the folder"
        )
    skipped = [p for p in entries if p.is_file() and not _is_image(p)]
    if not dirs:
        paths, labels, classes = loose, None, None
    else:
        paths, per_class, classes = [], [], [d.name for d in dirs]
        for d in dirs:
            inside = _visible(d)
            images = [p for p in inside if p.is_file() and _is_image(p)]
            nested = [p for p in inside if p.is_dir()]
            if nested:
                raise DataError(
                    f"data.path {folder}: class folder {d.name}/ holds a subfolder ({nested[0].name}/); "
                    "class folders hold images only, one level deep"
                )
            if not images:
                raise DataError(
                    f"data.path {folder}: class folder {d.name}/ holds no PNG or JPEG image; add images or remove it"
                )
            skipped += [p for p in inside if p.is_file() and not _is_image(p)]
            paths += images
            per_class.append(len(images))
        labels = np.repeat(np.arange(len(dirs), dtype=np.int64), per_class)
    if skipped:
        names = ", ".join(p.relative_to(folder).as_posix() for p in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        log.warning("data.path %s: skipped %d file(s) that are not PNG or JPEG images: %s%s",
                    folder, len(skipped), names, more)
    if not paths:
        raise DataError(
            f"data.path {folder}: holds no PNG or JPEG image (*.png, *.jpg, *.jpeg); point it at your images"
        )
    return paths, labels, classes


def _entry_digest(folder: Path, path: Path, data: bytes) -> bytes:
    return path.relative_to(folder).as_posix().encode() + b"\0" + hashlib.sha256(data).digest()


def _read_bytes(folder: Path, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        rel = path.relative_to(folder).as_posix()
        raise DataError(
            f"data.path {folder}: cannot read {rel} ({exc.strerror or exc}); check its permissions"
        ) from None


def folder_sha256(folder: Path) -> str:
    """The content hash of the folder's images (see the module docstring)."""
    paths, _, _ = list_images(folder)
    h = hashlib.sha256()
    for p in paths:
        h.update(_entry_digest(folder, p, _read_bytes(folder, p)))
    return h.hexdigest()


def _pixels(image, folder: Path, rel: str) -> np.ndarray:
    """An opened PIL image as uint8 [H, W] or [H, W, C]."""
    mode = image.mode
    if mode == "1":
        image = image.convert("L")
    elif mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("CMYK", "YCbCr"):
        image = image.convert("RGB")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise DataError(
            f"data.path {folder}: {rel} is a {mode!r} image (more than 8 bits per channel, or an unusual mode); "
            "save it as 8-bit greyscale or RGB"
        )
    pixels = np.asarray(image)
    if image.mode in ("LA", "RGBA"):
        if (pixels[..., -1] != 255).any():
            raise DataError(
                f"data.path {folder}: {rel} is transparent in places (alpha below 255); "
                "flatten it onto a background and save it as greyscale or RGB"
            )
        pixels = pixels[..., :-1]
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
    return pixels


def read_images(folder: Path) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[List[str]], str]:
    """(uint8 images [N, H, W, C], labels [N] or None, class names or None, content hash) of ``folder``."""
    from PIL import Image, UnidentifiedImageError

    paths, labels, classes = list_images(folder)
    h = hashlib.sha256()
    out, first = None, None
    for i, p in enumerate(paths):
        rel = p.relative_to(folder).as_posix()
        data = _read_bytes(folder, p)
        h.update(_entry_digest(folder, p, data))
        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = _pixels(image, folder, rel)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataError(
                f"data.path {folder}: {rel} is not a readable PNG or JPEG image ({exc}); replace or remove it"
            ) from None
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]  # (H, W, 1)
        if out is None:
            first = (rel, pixels.shape)
            out = np.empty((len(paths),) + pixels.shape, dtype=np.uint8)  # (N, H, W, C)
        elif pixels.shape != first[1]:
            raise DataError(
                f"data.path {folder}: images of different sizes: {first[0]} is {_size(first[1])}, "
                f"{rel} is {_size(pixels.shape)}; give every image the same size and colour mode"
            )
        out[i] = pixels
    return out, labels, classes, h.hexdigest()


def _size(shape) -> str:
    h, w, c = shape
    return f"{w}x{h} {'greyscale' if c == 1 else 'RGB'}"
