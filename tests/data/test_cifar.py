"""CIFAR-10 python batches on tiny files: layout, archive reading, 3-bit quantization, unsafe archives."""

import pickle

import numpy as np
import pytest
import torch

from gapbench.data import DataError, load_dataset, registry
from gapbench.data.archive import safe_extract

from .conftest import CIFAR_NAMES, cifar_blobs, cifar_spec, crafted_member, tar_gz


@pytest.fixture
def tiny_cifar(monkeypatch):
    arrays, blobs = cifar_blobs()
    monkeypatch.setitem(registry.SPECS, "cifar10", cifar_spec(blobs))
    return arrays, blobs


def _write_extracted(root, blobs):
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for n, b in blobs.items():
        (folder / n).write_bytes(b)
    return folder


def _expected(arrays, names, bits=None):
    data = np.concatenate([arrays[n][0] for n in names]).reshape(-1, 3, 32, 32)
    if bits is None:
        return torch.from_numpy(data.astype(np.float32) / 255)
    return torch.from_numpy((data // 2 ** (8 - bits)).astype(np.float32) / (2**bits - 1))


def test_channel_major_layout_and_labels(tmp_path, tiny_cifar):
    arrays, blobs = tiny_cifar
    _write_extracted(tmp_path, blobs)
    ds = load_dataset("cifar10", data_dir=tmp_path, num_valid=3)
    assert ds.train.shape == (17, 3, 32, 32) and ds.valid.shape == (3, 3, 32, 32) and ds.test.shape == (5, 3, 32, 32)
    test_data, test_labels = arrays["test_batch"]
    # pixel (c, i, j) of image k is byte c*1024 + i*32 + j of row k
    assert ds.test[2, 1, 5, 7].item() == pytest.approx(test_data[2, 1024 + 5 * 32 + 7] / 255)
    assert torch.equal(ds.test, _expected(arrays, ["test_batch"]))
    assert ds.test_labels.tolist() == test_labels
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    full = _expected(arrays, [f"data_batch_{i}" for i in range(1, 6)])
    assert torch.equal(ds.valid, full[perm[:3].sort().values])


def test_three_bit_quantization(tmp_path, tiny_cifar):
    arrays, blobs = tiny_cifar
    _write_extracted(tmp_path, blobs)
    ds = load_dataset("cifar10", data_dir=tmp_path, quantize_bits=3)
    assert ds.num_levels == 8
    assert torch.equal(ds.test, _expected(arrays, ["test_batch"], bits=3))
    levels = torch.unique(torch.cat([ds.train, ds.valid, ds.test]) * 7)
    assert torch.allclose(levels, levels.round()) and levels.min() == 0 and levels.max() == 7
    # byte 255 -> level 7 -> 1.0; byte 31 -> level 0; byte 32 -> level 1 -> 1/7
    from gapbench.data.cifar import quantize

    assert quantize(np.array([0, 31, 32, 63, 64, 255], np.uint8), 3).tolist() == [0, 0, 1, 1, 2, 7]


def test_reads_archive_without_extracting(tmp_path, tiny_cifar):
    arrays, blobs = tiny_cifar
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / registry.CIFAR_ARCHIVE).write_bytes(tar_gz({f"cifar-10-batches-py/{n}": b for n, b in blobs.items()}))
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.source == str(folder / registry.CIFAR_ARCHIVE)
    assert torch.equal(ds.test, _expected(arrays, ["test_batch"]))
    assert sorted(p.name for p in folder.iterdir()) == [registry.CIFAR_ARCHIVE]


def test_batch_with_wrong_checksum_is_not_unpickled(tmp_path, tiny_cifar):
    _, blobs = tiny_cifar
    folder = _write_extracted(tmp_path, blobs)
    (folder / "data_batch_3").write_bytes(blobs["data_batch_2"])
    with pytest.raises(DataError, match=r"data_batch_3: SHA-256 .* differs"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    _, blobs = cifar_blobs()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    blobs["data_batch_1"] = pickle.dumps({b"data": Evil(), b"labels": []})
    monkeypatch.setitem(registry.SPECS, "cifar10", cifar_spec(blobs))
    _write_extracted(tmp_path, blobs)
    with pytest.raises(DataError, match=r"refusing to build builtins.print"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_wrong_batch_shape(tmp_path, monkeypatch):
    _, blobs = cifar_blobs()
    blobs["test_batch"] = pickle.dumps({b"data": np.zeros((5, 3000), np.uint8), b"labels": [0] * 5})
    monkeypatch.setitem(registry.SPECS, "cifar10", cifar_spec(blobs))
    _write_extracted(tmp_path, blobs)
    with pytest.raises(DataError, match=r"b'data' is uint8 \[5, 3000\], expected uint8 \[N, 3072\]"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_truncated_archive(tmp_path, tiny_cifar):
    _, blobs = tiny_cifar
    folder = tmp_path / "cifar10"
    folder.mkdir()
    data = tar_gz({f"cifar-10-batches-py/{n}": b for n, b in blobs.items()})
    (folder / registry.CIFAR_ARCHIVE).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt archive"):
        load_dataset("cifar10", data_dir=tmp_path)


MALICIOUS = [
    ("absolute", crafted_member("file", "/tmp/gapbench-evil"), "an absolute path"),
    ("dotdot", crafted_member("file", "cifar-10-batches-py/../../evil"), "a path that climbs out"),
    ("symlink", crafted_member("symlink", "cifar-10-batches-py/link", "/etc/passwd"), "a link"),
    ("hardlink", crafted_member("hardlink", "cifar-10-batches-py/hard", "../../outside"), "a link"),
]


@pytest.mark.parametrize("case, extra, reason", MALICIOUS, ids=[m[0] for m in MALICIOUS])
def test_unsafe_archive_is_refused_and_nothing_extracted(tmp_path, case, extra, reason):
    _, blobs = cifar_blobs()
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz({f"cifar-10-batches-py/{n}": b for n, b in blobs.items()}, extra=extra))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DataError, match=f"refusing an unsafe archive: member .* is {reason}"):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()


def test_safe_extract_writes_regular_files(tmp_path):
    _, blobs = cifar_blobs()
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz({f"cifar-10-batches-py/{n}": b for n, b in blobs.items()}))
    safe_extract(archive, tmp_path / "dest")
    got = {p.name: p.read_bytes() for p in (tmp_path / "dest" / "cifar-10-batches-py").iterdir()}
    assert got == blobs and sorted(got) == sorted(CIFAR_NAMES)
