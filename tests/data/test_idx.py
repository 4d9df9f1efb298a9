"""MNIST-format (IDX) loading on tiny files: exact values, splits, and every way a file can be wrong."""

import dataclasses
import gzip
import struct

import numpy as np
import pytest
import torch

from gapbench.data import DataError, load_dataset, registry
from gapbench.data.idx import IMAGES_MAGIC, LABELS_MAGIC, parse_idx

from .conftest import idx_bytes, make_tiny_idx


def test_loads_exact_values_and_split_sizes(tmp_path, tiny_mnist):
    tiny_mnist.write(tmp_path / "mnist")
    ds = load_dataset("mnist", data_dir=tmp_path, split_seed=3)
    assert ds.train.shape == (16, 1, 28, 28) and ds.valid.shape == (4, 1, 28, 28) and ds.test.shape == (6, 1, 28, 28)
    assert ds.train.dtype == torch.float32 and ds.train_labels.dtype == torch.int64
    assert ds.image_shape == (1, 28, 28) and ds.num_levels is None
    assert ds.source == str(tmp_path / "mnist")
    # train + valid are exactly the standard training set, scaled by 1/255
    both = torch.cat([ds.train, ds.valid])
    expected = torch.from_numpy(tiny_mnist.train_x.astype(np.float32) / 255).unsqueeze(1)
    order = torch.cat([ds.train_labels, ds.valid_labels])
    assert sorted(map(tuple, both.flatten(1).tolist())) == sorted(map(tuple, expected.flatten(1).tolist()))
    assert torch.equal(ds.test, torch.from_numpy(tiny_mnist.test_x.astype(np.float32) / 255).unsqueeze(1))
    assert torch.equal(ds.test_labels, torch.from_numpy(tiny_mnist.test_y.astype(np.int64)))
    assert sorted(order.tolist()) == sorted(tiny_mnist.train_y.tolist())


def test_split_is_the_seeded_permutation(tmp_path, tiny_mnist):
    tiny_mnist.write(tmp_path / "mnist")
    ds = load_dataset("mnist", data_dir=tmp_path, split_seed=7, num_valid=5)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(7))
    x = torch.from_numpy(tiny_mnist.train_x.astype(np.float32) / 255).unsqueeze(1)
    assert torch.equal(ds.valid, x[perm[:5].sort().values])
    assert torch.equal(ds.train, x[perm[5:].sort().values])
    again = load_dataset("mnist", data_dir=tmp_path, split_seed=7, num_valid=5)
    assert torch.equal(again.valid, ds.valid)
    other = load_dataset("mnist", data_dir=tmp_path, split_seed=8, num_valid=5)
    assert not torch.equal(other.valid, ds.valid)


def test_uncompressed_files_in_torchvision_layout(tmp_path, tiny_mnist):
    tiny_mnist.write(tmp_path / "MNIST" / "raw", gzipped=False)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.source == str(tmp_path / "MNIST" / "raw")
    assert torch.equal(ds.test_labels, torch.from_numpy(tiny_mnist.test_y.astype(np.int64)))


@pytest.mark.parametrize("num_valid", [0, 20, -1])
def test_bad_num_valid(tmp_path, tiny_mnist, num_valid):
    tiny_mnist.write(tmp_path / "mnist")
    with pytest.raises(DataError, match=r"num_valid=.*between 1 and 19"):
        load_dataset("mnist", data_dir=tmp_path, num_valid=num_valid)


def test_quantize_bits_rejected_for_continuous_datasets():
    with pytest.raises(DataError, match="quantize_bits applies to 8-bit datasets"):
        load_dataset("digits", quantize_bits=3)


def _corrupt(tmp_path, tiny, name, data, gz=True):
    folder = tiny.write(tmp_path / "mnist")
    (folder / name).write_bytes(gzip.compress(data) if gz else data)
    return folder / name


def test_wrong_magic_number(tmp_path, tiny_mnist):
    # labels where images belong: magic 0x00000801
    path = _corrupt(tmp_path, tiny_mnist, "train-images-idx3-ubyte.gz", idx_bytes(tiny_mnist.train_y))
    with pytest.raises(DataError, match=r"magic number 0x00000801, expected 0x00000803") as err:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_gzip(tmp_path, tiny_mnist):
    good = tiny_mnist.gz["t10k-images-idx3-ubyte.gz"]
    folder = tiny_mnist.write(tmp_path / "mnist")
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        load_dataset("mnist", data_dir=tmp_path)


def test_header_count_larger_than_payload(tmp_path, tiny_mnist):
    data = bytearray(idx_bytes(tiny_mnist.train_x))
    data[4:8] = struct.pack(">I", 21)  # header claims one image more than the payload holds
    _corrupt(tmp_path, tiny_mnist, "train-images-idx3-ubyte.gz", bytes(data))
    with pytest.raises(DataError, match=r"truncated: header says 21x28x28 = 16464 bytes of data, file has 15680"):
        load_dataset("mnist", data_dir=tmp_path)


def test_trailing_bytes(tmp_path, tiny_mnist):
    _corrupt(tmp_path, tiny_mnist, "train-labels-idx1-ubyte.gz", idx_bytes(tiny_mnist.train_y) + b"\0")
    with pytest.raises(DataError, match="has trailing bytes"):
        load_dataset("mnist", data_dir=tmp_path)


def test_images_and_labels_count_mismatch(tmp_path, monkeypatch):
    tiny = make_tiny_idx()
    spec = dataclasses.replace(tiny.spec(registry.SPECS["mnist"], checksums=False))
    monkeypatch.setitem(registry.SPECS, "mnist", spec)
    _corrupt(tmp_path, tiny, "train-labels-idx1-ubyte.gz", idx_bytes(tiny.train_y[:19]))
    with pytest.raises(DataError, match=r"has 20 images but .* has 19 labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_count_differs_from_spec(tmp_path, monkeypatch):
    tiny = make_tiny_idx()
    spec = dataclasses.replace(tiny.spec(registry.SPECS["mnist"], checksums=False), num_test=7)
    monkeypatch.setitem(registry.SPECS, "mnist", spec)
    tiny.write(tmp_path / "mnist")
    with pytest.raises(DataError, match=r"6 images of 28x28, expected 7 of 28x28 for mnist"):
        load_dataset("mnist", data_dir=tmp_path)


def test_wrong_image_size(tmp_path, monkeypatch):
    tiny = make_tiny_idx(side=27)
    monkeypatch.setitem(registry.SPECS, "mnist", tiny.spec(registry.SPECS["mnist"], checksums=False))
    tiny.write(tmp_path / "mnist")
    with pytest.raises(DataError, match=r"20 images of 27x27, expected 20 of 28x28"):
        load_dataset("mnist", data_dir=tmp_path)


def test_found_file_with_wrong_content_checksum(tmp_path, tiny_mnist):
    other = make_tiny_idx(seed=1)
    _corrupt(tmp_path, tiny_mnist, "t10k-images-idx3-ubyte.gz", idx_bytes(other.test_x))
    with pytest.raises(DataError, match="content SHA-256 .* differs from the expected"):
        load_dataset("mnist", data_dir=tmp_path)


def test_recompressed_file_is_accepted(tmp_path, tiny_mnist):
    """Found files are checked by their decompressed content, not their gzip bytes (as Debian recompresses)."""
    folder = tiny_mnist.write(tmp_path / "mnist")
    payload = tiny_mnist.payloads["train-images-idx3-ubyte.gz"]
    recompressed = gzip.compress(payload, compresslevel=1, mtime=12345)
    assert recompressed != tiny_mnist.gz["train-images-idx3-ubyte.gz"]
    (folder / "train-images-idx3-ubyte.gz").write_bytes(recompressed)
    assert load_dataset("mnist", data_dir=tmp_path).train.shape[0] == 16


def test_label_out_of_range(tmp_path, monkeypatch):
    tiny = make_tiny_idx()
    tiny.train_y[3] = 10
    monkeypatch.setitem(registry.SPECS, "mnist", tiny.spec(registry.SPECS["mnist"], checksums=False))
    tiny.write(tmp_path / "mnist")
    with pytest.raises(DataError, match=r"label 10 outside 0..9"):
        load_dataset("mnist", data_dir=tmp_path)


def test_parse_idx_short_header(tmp_path):
    with pytest.raises(DataError, match="too short for an IDX header"):
        parse_idx(b"\0\0\x08", tmp_path / "x", LABELS_MAGIC)
    arr = parse_idx(idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)), tmp_path / "x", IMAGES_MAGIC)
    assert arr.shape == (2, 3, 4) and arr[1, 2, 3] == 23
