"""Downloads from a local HTTP server: verified, atomic, mirror fallback, bad files removed, archives checked."""

import hashlib
import os

import pytest
import torch

from gapbench.data import DataError, download_dataset, load_dataset, registry
from gapbench.data.download import mirrors_for

from .conftest import cifar_blobs, cifar_spec, letter_images, omniglot_spec, tar_gz, write_chardata, crafted_member


def _serve(server, prefix, files):
    for name, data in files.items():
        server.files[f"{prefix}/{name}"] = data


def test_download_then_load(tmp_path, tiny_mnist, http_server):
    _serve(http_server, "/mnist", tiny_mnist.gz)
    folder = download_dataset("mnist", root=tmp_path / "root", base_urls=[http_server.url + "/mnist"])
    assert folder == tmp_path / "root" / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(tiny_mnist.gz)  # no temporary file left
    for name, data in tiny_mnist.gz.items():
        assert (folder / name).read_bytes() == data
    ds = load_dataset("mnist", data_dir=tmp_path / "root")
    assert ds.test.shape == (6, 1, 28, 28)
    # a second call finds every file already verified and fetches nothing
    num_requests = len(http_server.requests)
    download_dataset("mnist", root=tmp_path / "root", base_urls=[http_server.url + "/mnist"])
    assert len(http_server.requests) == num_requests


def test_default_target_is_the_user_cache(tmp_path, tiny_mnist, http_server, monkeypatch):
    _serve(http_server, "/mnist", tiny_mnist.gz)
    monkeypatch.setenv("GAPBENCH_MIRROR", http_server.url)  # files under <mirror>/<dataset>/
    folder = download_dataset("mnist")
    assert folder == tmp_path / "xdg-cache" / "gapbench" / "mnist"
    assert load_dataset("mnist").source == str(folder)


def test_load_with_download_flag(tmp_path, tiny_mnist, http_server, monkeypatch):
    _serve(http_server, "/mnist", tiny_mnist.gz)
    monkeypatch.setenv("GAPBENCH_MIRROR", http_server.url)
    with pytest.raises(DataError, match="not found"):
        load_dataset("mnist")
    assert load_dataset("mnist", download=True).train.shape == (16, 1, 28, 28)


def test_corrupted_download_is_removed_and_nothing_else_touched(tmp_path, tiny_mnist, http_server):
    bad = bytearray(tiny_mnist.gz["t10k-images-idx3-ubyte.gz"])
    bad[len(bad) // 2] ^= 0xFF
    _serve(http_server, "/mnist", {**tiny_mnist.gz, "t10k-images-idx3-ubyte.gz": bytes(bad)})
    folder = tmp_path / "root" / "mnist"
    folder.mkdir(parents=True)
    bystander = folder / "notes.txt"
    bystander.write_text("mine")
    os.utime(bystander, (1, 1))
    with pytest.raises(DataError) as err:
        download_dataset("mnist", root=tmp_path / "root", base_urls=[http_server.url + "/mnist"])
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "SHA256" in msg and "deleted" in msg and "\n" not in msg
    names = sorted(p.name for p in folder.iterdir())
    assert "t10k-images-idx3-ubyte.gz" not in names and not any(n.endswith(".part") for n in names)
    assert bystander.read_text() == "mine" and bystander.stat().st_mtime == 1
    # the files fetched before the bad one are intact and verified
    assert (folder / "train-images-idx3-ubyte.gz").read_bytes() == tiny_mnist.gz["train-images-idx3-ubyte.gz"]


def test_mirror_fallback(tmp_path, tiny_mnist, http_server):
    _serve(http_server, "/good", tiny_mnist.gz)
    _serve(http_server, "/bad", {n: b"garbage" for n in tiny_mnist.gz})
    urls = [http_server.url + "/missing", http_server.url + "/bad", http_server.url + "/good"]
    folder = download_dataset("mnist", root=tmp_path, base_urls=urls)
    assert load_dataset("mnist", data_dir=tmp_path).source == str(folder)
    assert "/missing/train-images-idx3-ubyte.gz" in http_server.requests


def test_every_mirror_failing(tmp_path, tiny_mnist, http_server):
    with pytest.raises(DataError, match=r"could not download mnist/train-images-idx3-ubyte.gz: .*404.*GAPBENCH_MIRROR"):
        download_dataset("mnist", root=tmp_path, base_urls=[http_server.url + "/nothing"])
    assert not (tmp_path / "mnist").exists()  # the folder the download created is removed


def test_unreachable_host(tmp_path, tiny_mnist):
    with pytest.raises(DataError, match="could not download"):
        download_dataset("mnist", root=tmp_path, base_urls=["http://127.0.0.1:9/"])


def test_cifar_archive_is_verified_extracted_and_removed(tmp_path, http_server, monkeypatch):
    _, blobs = cifar_blobs()
    archive = tar_gz({f"cifar-10-batches-py/{n}": b for n, b in blobs.items()})
    monkeypatch.setitem(registry.SPECS, "cifar10", cifar_spec(blobs, archive))
    _serve(http_server, "/c", {registry.CIFAR_ARCHIVE: archive})
    folder = download_dataset("cifar10", root=tmp_path, base_urls=[http_server.url + "/c"])
    assert sorted(p.name for p in folder.iterdir()) == ["cifar-10-batches-py"]
    assert load_dataset("cifar10", data_dir=tmp_path).test.shape == (5, 3, 32, 32)


def test_malicious_archive_download_is_refused(tmp_path, http_server, monkeypatch):
    _, blobs = cifar_blobs()
    archive = tar_gz({f"cifar-10-batches-py/{n}": b for n, b in blobs.items()}, extra=crafted_member("file", "../escape"))
    monkeypatch.setitem(registry.SPECS, "cifar10", cifar_spec(blobs, archive))
    _serve(http_server, "/c", {registry.CIFAR_ARCHIVE: archive})
    with pytest.raises(DataError, match="refusing an unsafe archive"):
        download_dataset("cifar10", root=tmp_path / "root", base_urls=[http_server.url + "/c"])
    assert not (tmp_path / "root").exists()  # the folders the download created are removed
    assert not (tmp_path / "root" / "escape").exists()


def test_omniglot_checked_by_md5(tmp_path, http_server, monkeypatch):
    src = tmp_path / "src" / "chardata.mat"
    write_chardata(src, letter_images(6), letter_images(2))
    data = src.read_bytes()
    _serve(http_server, "/o", {"chardata.mat": data})
    monkeypatch.setitem(registry.SPECS, "omniglot", omniglot_spec(6, 2, md5="0" * 32))
    with pytest.raises(DataError, match="MD5 .* differs"):
        download_dataset("omniglot", root=tmp_path / "root", base_urls=[http_server.url + "/o"])
    monkeypatch.setitem(registry.SPECS, "omniglot", omniglot_spec(6, 2, md5=hashlib.md5(data).hexdigest()))
    download_dataset("omniglot", root=tmp_path / "root", base_urls=[http_server.url + "/o"])
    assert torch.equal(load_dataset("omniglot", data_dir=tmp_path / "root").test[:, 0], torch.from_numpy(letter_images(2)))


def test_digits_needs_no_download():
    with pytest.raises(DataError, match="needs no download"):
        download_dataset("digits")


def test_mirror_order(monkeypatch):
    assert mirrors_for("mnist")[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert mirrors_for("mnist", ["http://a/x"]) == ["http://a/x/"]
    monkeypatch.setenv("GAPBENCH_MIRROR", "http://m/")
    assert mirrors_for("cifar10") == ["http://m/cifar10/"]


def test_canonical_urls_and_checksums():
    spec = registry.SPECS["cifar10"]
    assert spec.mirrors[0] + spec.downloads[0].name == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert spec.downloads[0].sha256 == "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
    omni = registry.SPECS["omniglot"]
    assert omni.mirrors[0] + "chardata.mat" == "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"
    assert omni.downloads[0].sha256 is None  # not known: MD5 and structure only
    for name in ("mnist", "fashion-mnist"):
        for f in registry.SPECS[name].downloads:
            assert len(f.sha256) == 64 and len(f.payload_sha256) == 64 and len(f.md5) == 32
