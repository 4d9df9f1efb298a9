"""Tiny files in each dataset's exact standard format, specs that expect them, and a local HTTP server."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from gapbench.data import registry
from gapbench.data.registry import FileSpec

IDX_NAMES = registry.IDX_FILES
CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test sees the real cache, $GAPBENCH_DATA or a mirror setting."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("GAPBENCH_DATA", raising=False)
    monkeypatch.delenv("GAPBENCH_MIRROR", raising=False)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: big-endian magic 0x0000080<ndim>, dims, row-major bytes."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x00000800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass
class TinyIdx:
    """A tiny MNIST-format dataset: arrays, their IDX payloads and gzipped files."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def payloads(self):
        return dict(zip(IDX_NAMES, map(idx_bytes, (self.train_x, self.train_y, self.test_x, self.test_y))))

    @functools.cached_property
    def gz(self):
        return {n: gzip.compress(p, mtime=0) for n, p in self.payloads.items()}

    def write(self, folder: Path, gzipped: bool = True) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for n, p in self.payloads.items():
            if gzipped:
                (folder / n).write_bytes(self.gz[n])
            else:
                (folder / n[:-3]).write_bytes(p)
        return folder

    def spec(self, base: registry.DatasetSpec, checksums: bool = True) -> registry.DatasetSpec:
        files = tuple(
            FileSpec(n, sha256(self.gz[n]) if checksums else None, sha256(p) if checksums else None)
            for n, p in self.payloads.items()
        )
        return dataclasses.replace(
            base, num_train=len(self.train_x), num_test=len(self.test_x), num_valid=4, files=files, downloads=files,
            system_dirs=(),
        )


def make_tiny_idx(num_train=20, num_test=6, side=28, seed=0) -> TinyIdx:
    rng = np.random.default_rng(seed)
    return TinyIdx(
        rng.integers(0, 256, (num_train, side, side), dtype=np.uint8),
        (np.arange(num_train) % 10).astype(np.uint8),
        rng.integers(0, 256, (num_test, side, side), dtype=np.uint8),
        (np.arange(num_test) % 10).astype(np.uint8),
    )


@pytest.fixture
def tiny_mnist(monkeypatch):
    """A TinyIdx whose spec replaces mnist's in the registry (checksums of the tiny files)."""
    tiny = make_tiny_idx()
    monkeypatch.setitem(registry.SPECS, "mnist", tiny.spec(registry.SPECS["mnist"]))
    return tiny


# ------------------------------------------------------------------ CIFAR


def cifar_blobs(num_per_batch=4, num_test=5, seed=0):
    """(arrays, {file name: pickled bytes}) in the python-batch format: b'data' uint8 [N, 3072], b'labels'."""
    rng = np.random.default_rng(seed)
    blobs, arrays = {}, {}
    for name in CIFAR_NAMES[:-1]:
        n = num_test if name == "test_batch" else num_per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        arrays[name] = (data, labels)
        blobs[name] = pickle.dumps({b"batch_label": name.encode(), b"data": data, b"labels": labels})
    blobs["batches.meta"] = pickle.dumps(
        {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": num_per_batch}
    )
    return arrays, blobs


def tar_gz(members: dict, extra=None) -> bytes:
    """A tar.gz with regular files ``{path: bytes}``; ``extra(tar)`` may add crafted members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, data in members.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra:
            extra(tar)
    return buf.getvalue()


def crafted_member(kind, name, linkname=""):
    """An ``extra`` for :func:`tar_gz` adding one regular file, symlink or hard link named ``name``."""
    def extra(tar):
        info = tarfile.TarInfo(name)
        if kind == "file":
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        else:
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = linkname
            tar.addfile(info)

    return extra


def cifar_spec(blobs, archive: bytes = None):
    base = registry.SPECS["cifar10"]
    num_train = sum(len(pickle.loads(blobs[f"data_batch_{i}"])[b"labels"]) for i in range(1, 6))
    num_test = len(pickle.loads(blobs["test_batch"])[b"labels"])
    files = tuple(FileSpec(n, payload_sha256=sha256(b)) for n, b in blobs.items())
    downloads = (FileSpec(registry.CIFAR_ARCHIVE, sha256=sha256(archive) if archive else None),)
    return dataclasses.replace(base, num_train=num_train, num_test=num_test, num_valid=3, files=files, downloads=downloads)


# ------------------------------------------------------------------ Omniglot


def letter_images(n: int, side: int = 28, seed: int = 0) -> np.ndarray:
    """n asymmetric images in [0, 1] (an 'L' plus noise): a transposed one differs from the original."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.2, (n, side, side)).astype(np.float32)
    images[:, 2:20, 3] = 1.0  # vertical stroke
    images[:, 19, 3:15] = 1.0  # foot going right
    return images


def write_chardata(path: Path, train: np.ndarray, test: np.ndarray, num_classes: int = 50, seed: int = 0):
    """chardata.mat as the IWAE repository has it: columns are column-major images; one-hot labels."""
    import scipy.io

    rng = np.random.default_rng(seed)

    def cols(images):
        return np.stack([im.flatten(order="F") for im in images], axis=1).astype(np.float64)

    def onehot(n):
        labels = rng.integers(0, num_classes, n)
        out = np.zeros((num_classes, n))
        out[labels, np.arange(n)] = 1
        return out, labels

    target, train_labels = onehot(len(train))
    testtarget, test_labels = onehot(len(test))
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        str(path),
        {"data": cols(train), "testdata": cols(test), "target": target, "testtarget": testtarget,
         "targetchar": np.ones((1, len(train)))},
    )
    return train_labels, test_labels


def omniglot_spec(num_train: int, num_test: int, num_valid: int = 3, md5: str = None):
    base = registry.SPECS["omniglot"]
    return dataclasses.replace(
        base, num_train=num_train, num_test=num_test, num_valid=num_valid,
        downloads=(FileSpec("chardata.mat", md5=md5),),
    )


# ------------------------------------------------------------------ HTTP


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    requests: list = []

    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.requests.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    """A server on 127.0.0.1 (free port) serving ``server.files`` ({url path: bytes}); shut down after the test."""
    handler = type("Handler", (_Handler,), {"files": {}, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.files = handler.files
    server.requests = handler.requests
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
