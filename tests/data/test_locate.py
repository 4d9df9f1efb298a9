"""Where files are looked for, in which order, and what a missing dataset's error says."""

import dataclasses
from pathlib import Path

import pytest

from gapbench.data import DataError, available_datasets, candidate_dirs, load_dataset, registry
from gapbench.data.registry import get_spec


def test_unknown_name_suggests_the_closest():
    with pytest.raises(DataError, match=r"unknown dataset 'fashon-mnist': did you mean 'fashion-mnist'\?"):
        load_dataset("fashon-mnist")
    with pytest.raises(DataError, match=r"did you mean 'cifar10'"):
        get_spec("cifar-10")
    with pytest.raises(DataError, match=r"valid names are digits, mnist, fashion-mnist, cifar10, omniglot"):
        get_spec("imagenet")


def test_search_order(tmp_path, monkeypatch):
    spec = registry.SPECS["fashion-mnist"]
    cache = tmp_path / "xdg-cache" / "gapbench"
    assert candidate_dirs(spec) == [cache / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]
    dirs = candidate_dirs(spec, tmp_path / "d")
    assert [str(d) for d in dirs] == [
        str(tmp_path / "d" / "fashion-mnist"),
        str(tmp_path / "d" / "FashionMNIST" / "raw"),
        str(cache / "fashion-mnist"),
        "/usr/share/datasets/fashion-mnist",
    ]
    monkeypatch.setenv("GAPBENCH_DATA", str(tmp_path / "env"))
    assert candidate_dirs(spec)[0] == tmp_path / "env" / "fashion-mnist"
    assert candidate_dirs(spec, tmp_path / "d")[0] == tmp_path / "d" / "fashion-mnist"  # the argument wins
    assert candidate_dirs(registry.SPECS["cifar10"], tmp_path / "d")[:2] == [tmp_path / "d" / "cifar10", tmp_path / "d"]


def test_first_match_wins(tmp_path, tiny_mnist, monkeypatch):
    tiny_mnist.write(tmp_path / "xdg-cache" / "gapbench" / "mnist")
    assert load_dataset("mnist").source == str(tmp_path / "xdg-cache" / "gapbench" / "mnist")
    tiny_mnist.write(tmp_path / "env" / "mnist")
    monkeypatch.setenv("GAPBENCH_DATA", str(tmp_path / "env"))
    assert load_dataset("mnist").source == str(tmp_path / "env" / "mnist")


def test_missing_lists_every_place_and_the_fixes(tmp_path, monkeypatch):
    spec = dataclasses.replace(registry.SPECS["fashion-mnist"], system_dirs=(str(tmp_path / "usr-share"),))
    monkeypatch.setitem(registry.SPECS, "fashion-mnist", spec)
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", data_dir=tmp_path / "d")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("fashion-mnist not found: looked in ")
    for place in (tmp_path / "d" / "fashion-mnist", tmp_path / "d" / "FashionMNIST" / "raw",
                  tmp_path / "xdg-cache" / "gapbench" / "fashion-mnist", tmp_path / "usr-share"):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "gapbench datasets --download fashion-mnist" in msg
    assert f"in {tmp_path / 'd' / 'fashion-mnist'}" in msg
    assert "train-images-idx3-ubyte.gz" in msg


def test_missing_says_which_files_a_folder_lacks(tmp_path, tiny_mnist):
    folder = tiny_mnist.write(tmp_path / "mnist")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"has only train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images"):
        load_dataset("mnist", data_dir=tmp_path)


def test_available_datasets(tmp_path, tiny_mnist):
    tiny_mnist.write(tmp_path / "mnist")
    rows = {r.name: r for r in available_datasets(tmp_path)}
    assert list(rows) == ["digits", "mnist", "fashion-mnist", "cifar10", "omniglot"]
    assert rows["digits"].available and rows["mnist"].available and rows["mnist"].location == str(tmp_path / "mnist")
    assert not rows["cifar10"].available and rows["cifar10"].location is None
    assert "gapbench datasets --download cifar10" in rows["cifar10"].how_to_get
    assert "cifar-10-python.tar.gz" in rows["cifar10"].how_to_get
    assert "apt-get install dataset-fashion-mnist" in rows["fashion-mnist"].how_to_get
