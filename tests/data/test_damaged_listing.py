"""`gapbench datasets` checks the files it lists: a truncated or wrong file is "damaged", never "available"."""

import gzip

import pytest

from gapbench.data import DataError, available_datasets, load_dataset, registry
from tests.cli_runner import run_cli

from .conftest import cifar_blobs, cifar_spec, idx_bytes, letter_images, omniglot_spec, tar_gz, write_chardata


def _row(root, name):
    return {r.name: r for r in available_datasets(root)}[name]


def _assert_damaged(root, name, path, why):
    row = _row(root, name)
    assert row.status == "damaged" and not row.available
    assert row.problem.startswith(f"damaged: {path} is truncated or corrupt (")
    assert why in row.problem and row.problem.endswith(f"delete it and download again (gapbench datasets --download {name})")
    assert row.how_to_get == row.problem and "\n" not in row.problem
    with pytest.raises(DataError):  # what the listing calls damaged, loading refuses too
        load_dataset(name, data_dir=root)


def test_whole_files_are_available(tmp_path, tiny_mnist):
    tiny_mnist.write(tmp_path / "mnist")
    row = _row(tmp_path, "mnist")
    assert row.status == "available" and row.available and row.problem is None


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_a_truncated_gzip_is_damaged(tmp_path, tiny_mnist, keep):
    folder = tiny_mnist.write(tmp_path / "mnist")
    path = folder / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    _assert_damaged(tmp_path, "mnist", path, "gzip stream cut short")


def test_a_truncated_uncompressed_file_is_damaged(tmp_path, tiny_mnist):
    folder = tiny_mnist.write(tmp_path / "mnist", gzipped=False)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    _assert_damaged(tmp_path, "mnist", path, "cut short: 4604 bytes of data, the header says 4704")


def test_a_file_of_zeros_is_damaged(tmp_path, tiny_mnist):
    folder = tiny_mnist.write(tmp_path / "mnist")
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes(len(tiny_mnist.payloads["t10k-labels-idx1-ubyte.gz"]))))
    _assert_damaged(tmp_path, "mnist", path, "magic number 0x00000000, expected 0x00000801")


def test_trailing_bytes_are_damage(tmp_path, tiny_mnist):
    folder = tiny_mnist.write(tmp_path / "mnist")
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(tiny_mnist.train_y) + b"\0\0"))
    _assert_damaged(tmp_path, "mnist", path, "has trailing bytes")


def test_recompressed_and_multi_member_gzip_are_not_damage(tmp_path, tiny_mnist):
    """A gzip of several members records only its last member's length; the check then reads it through."""
    folder = tiny_mnist.write(tmp_path / "mnist")
    payload = tiny_mnist.payloads["train-images-idx3-ubyte.gz"]
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(payload[:1000]) + gzip.compress(payload[1000:]))
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(tiny_mnist.payloads["t10k-images-idx3-ubyte.gz"], compresslevel=1, mtime=7)
    )
    assert _row(tmp_path, "mnist").status == "available"
    assert load_dataset("mnist", data_dir=tmp_path).train.shape[0] == 16


def test_cifar_batch_cut_short_is_damaged(tmp_path, monkeypatch):
    _, blobs = cifar_blobs()
    monkeypatch.setitem(registry.SPECS, "cifar10", cifar_spec(blobs))
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
    assert _row(tmp_path, "cifar10").status == "available"
    path = folder / "data_batch_3"
    path.write_bytes(blobs["data_batch_3"][:-7])
    _assert_damaged(tmp_path, "cifar10", path, "the pickle lacks its end mark")


def test_cifar_archive_cut_short_is_damaged(tmp_path, monkeypatch):
    _, blobs = cifar_blobs()
    archive = tar_gz({f"cifar-10-batches-py/{n}": b for n, b in blobs.items()})
    monkeypatch.setitem(registry.SPECS, "cifar10", cifar_spec(blobs, archive))
    path = tmp_path / "cifar10" / registry.CIFAR_ARCHIVE
    path.parent.mkdir()
    path.write_bytes(archive)
    assert _row(tmp_path, "cifar10").status == "available"
    path.write_bytes(archive[: len(archive) * 2 // 3])
    _assert_damaged(tmp_path, "cifar10", path, "archive cut short or damaged")


def test_omniglot_cut_short_is_damaged(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.SPECS, "omniglot", omniglot_spec(6, 2))
    path = tmp_path / "omniglot" / "chardata.mat"
    write_chardata(path, letter_images(6), letter_images(2))
    assert _row(tmp_path, "omniglot").status == "available"
    path.write_bytes(path.read_bytes()[:-1000])
    _assert_damaged(tmp_path, "omniglot", path, "cut short: an element at byte")


def test_the_command_does_not_call_a_damaged_file_available(tmp_path, tiny_mnist, capsys):
    folder = tiny_mnist.write(tmp_path / "mnist")
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    code, out, _ = run_cli(["datasets", "--data-dir", tmp_path], capsys)
    assert code == 0
    (line,) = [line for line in out.splitlines() if line.split()[0] == "mnist"]
    assert "available" not in line and line.split()[1] == "damaged:"  # not "missing    damaged: ..."
    assert f"damaged: {path} is truncated or corrupt" in line and "delete it and download again" in line
