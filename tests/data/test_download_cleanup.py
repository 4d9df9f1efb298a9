"""A failed download leaves no folder it created and no partial file, and its error names only documented fixes.

No test reaches the network: the fetching function is replaced.
"""

import re
import urllib.error
from pathlib import Path

import pytest

from gapbench.data import DataError, download_dataset, registry
from gapbench.data import download as download_module
from tests.cli_runner import run_cli

from .conftest import cifar_blobs, cifar_spec, tar_gz

README = Path(__file__).resolve().parents[2] / "README.md"


def _unreachable(url, dest, f):
    raise urllib.error.URLError("network is unreachable")


def _serving(files, fail_on=()):
    """A stand-in for the fetching function: writes ``files[name]`` to dest, or fails for names in ``fail_on``."""

    def fetch(url, dest, f):
        if f.name in fail_on:
            raise urllib.error.URLError("connection reset")
        dest.write_bytes(files[f.name])

    return fetch


def test_a_failed_download_removes_the_folders_it_created(tmp_path, tiny_mnist, monkeypatch):
    monkeypatch.setattr(download_module, "_fetch", _unreachable)
    root = tmp_path / "new" / "data"
    with pytest.raises(DataError, match="could not download mnist/train-images-idx3-ubyte.gz"):
        download_dataset("mnist", root=root)
    assert list(tmp_path.iterdir()) == []  # neither new/ nor new/data/ nor new/data/mnist/


def test_a_failed_download_into_the_cache_leaves_no_cache_folder(tmp_path, tiny_mnist, monkeypatch):
    monkeypatch.setattr(download_module, "_fetch", _unreachable)
    with pytest.raises(DataError):
        download_dataset("mnist")
    assert not (tmp_path / "xdg-cache").exists()


def test_files_fetched_before_the_failure_go_with_the_folder_it_created(tmp_path, tiny_mnist, monkeypatch):
    monkeypatch.setattr(download_module, "_fetch", _serving(tiny_mnist.gz, fail_on={"t10k-images-idx3-ubyte.gz"}))
    with pytest.raises(DataError):
        download_dataset("mnist", root=tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_a_folder_that_was_there_keeps_its_files(tmp_path, tiny_mnist, monkeypatch):
    folder = tmp_path / "root" / "mnist"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    monkeypatch.setattr(download_module, "_fetch", _unreachable)
    with pytest.raises(DataError):
        download_dataset("mnist", root=tmp_path / "root")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_a_half_extracted_archive_is_removed(tmp_path, monkeypatch):
    """Extraction that breaks midway (a full disk, say) leaves no cifar-10-batches-py/ that looks like the dataset."""
    _, blobs = cifar_blobs()
    archive = tar_gz({f"cifar-10-batches-py/{n}": b for n, b in blobs.items()})
    monkeypatch.setitem(registry.SPECS, "cifar10", cifar_spec(blobs, archive))
    monkeypatch.setattr(download_module, "_fetch", _serving({registry.CIFAR_ARCHIVE: archive}))

    def extract_then_fail(path, dest):
        (dest / "cifar-10-batches-py").mkdir()
        (dest / "cifar-10-batches-py" / "data_batch_1").write_bytes(blobs["data_batch_1"])
        raise DataError(f"{path}: truncated or corrupt archive (No space left on device); delete it and get it again")

    monkeypatch.setattr(download_module, "safe_extract", extract_then_fail)
    folder = tmp_path / "cifar10"
    folder.mkdir()  # there before: it stays, but nothing half-extracted may be left in it
    with pytest.raises(DataError, match="No space left"):
        download_dataset("cifar10", root=tmp_path)
    assert list(folder.iterdir()) == []


def test_the_error_names_only_documented_fixes(tmp_path, tiny_mnist, monkeypatch):
    monkeypatch.setattr(download_module, "_fetch", _unreachable)
    with pytest.raises(DataError) as err:
        download_dataset("mnist", root=tmp_path / "root")
    message = str(err.value)
    assert "\n" not in message and "network is unreachable" in message
    readme = README.read_text()
    datasets_section = readme[readme.index("## Datasets"): readme.index("\n## ", readme.index("## Datasets") + 1)]
    for variable in re.findall(r"\$?\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", message):
        assert f"${variable.lstrip('$')}" in datasets_section, f"{variable} is not documented under Datasets"
    assert "$GAPBENCH_MIRROR" in message and str(tmp_path / "root" / "mnist") in message


def test_a_folder_that_cannot_be_made_names_documented_alternatives(tmp_path, tiny_mnist):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(DataError) as err:
        download_dataset("mnist", root=blocker / "sub")
    message = str(err.value)
    assert "--data-dir" in message and "data.data_dir" in message and "$GAPBENCH_DATA" in message
    readme = README.read_text()
    for way in ("--data-dir", "data.data_dir", "$GAPBENCH_DATA"):
        assert way in readme


def test_the_command_leaves_nothing_after_a_failed_download(tmp_path, tiny_mnist, monkeypatch, capsys):
    monkeypatch.setattr(download_module, "_fetch", _unreachable)
    code, _, err = run_cli(["datasets", "--download", "mnist", "--data-dir", tmp_path / "d"], capsys)
    assert code == 2 and err.startswith("error: could not download mnist/")
    assert not (tmp_path / "d").exists()
