"""scikit-learn's bundled handwritten digits (UCI optical digits test set): 1,797 images of 8x8.

Needs no download. Pixel counts 0..16 are scaled by 1/16 to [0, 1]. There is
no standard test split: test and validation are both carved from one seeded
permutation (see :func:`gapbench.data.dataset.load_dataset`).
"""

from __future__ import annotations

import functools
from typing import Tuple

import numpy as np

from gapbench.data.errors import DataError


@functools.lru_cache(maxsize=1)
def load_digits_set() -> Tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float32 in [0, 1], labels [1797] int64), read once per process (read-only)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("digits needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels
