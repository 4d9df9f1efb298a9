"""Omniglot chardata.mat: column-major images (as the IWAE code reads them), labels, bad files."""

import numpy as np
import pytest
import scipy.io
import torch

from gapbench.data import DataError, load_dataset, registry
from gapbench.data.omniglot import columns_to_images

from .conftest import letter_images, omniglot_spec, write_chardata


@pytest.fixture
def tiny_omniglot(tmp_path, monkeypatch):
    train, test = letter_images(12, seed=0), letter_images(5, seed=1)
    monkeypatch.setitem(registry.SPECS, "omniglot", omniglot_spec(12, 5))
    labels = write_chardata(tmp_path / "omniglot" / "chardata.mat", train, test)
    return train, test, labels


def test_images_are_upright_not_transposed(tmp_path, tiny_omniglot):
    train, test, (train_labels, test_labels) = tiny_omniglot
    ds = load_dataset("omniglot", data_dir=tmp_path)
    assert ds.test.shape == (5, 1, 28, 28) and ds.train.shape == (9, 1, 28, 28) and ds.valid.shape == (3, 1, 28, 28)
    assert torch.equal(ds.test[:, 0], torch.from_numpy(test))
    assert not torch.equal(ds.test[:, 0], torch.from_numpy(test).transpose(1, 2))  # the images are asymmetric
    # the 'L': a vertical stroke in column 3 and a foot along row 19
    assert (ds.test[:, 0, 2:20, 3] == 1).all() and (ds.test[:, 0, 19, 3:15] == 1).all()
    assert ds.test_labels.tolist() == test_labels.tolist()
    assert sorted(torch.cat([ds.train_labels, ds.valid_labels]).tolist()) == sorted(train_labels.tolist())
    assert ds.num_levels is None and 0 <= ds.train.min() and ds.train.max() <= 1


def test_matches_the_iwae_reshape(tmp_path, tiny_omniglot):
    """The IWAE code: data.T.reshape(-1, 28, 28).reshape(-1, 784, order='F'), then images are rows read row-major."""
    mat = scipy.io.loadmat(str(tmp_path / "omniglot" / "chardata.mat"))
    iwae = mat["testdata"].T.reshape((-1, 28, 28)).reshape((-1, 784), order="F").reshape(-1, 28, 28)
    assert np.array_equal(columns_to_images(mat["testdata"]), iwae)


def test_wrong_shape(tmp_path, monkeypatch, tiny_omniglot):
    monkeypatch.setitem(registry.SPECS, "omniglot", omniglot_spec(13, 5))
    with pytest.raises(DataError, match=r"'data' has shape \[784, 12\], expected \[784, 13\]"):
        load_dataset("omniglot", data_dir=tmp_path)


def test_missing_key(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.SPECS, "omniglot", omniglot_spec(2, 2))
    (tmp_path / "omniglot").mkdir()
    scipy.io.savemat(str(tmp_path / "omniglot" / "chardata.mat"), {"data": np.zeros((784, 2)), "target": np.eye(50)[:, :2]})
    with pytest.raises(DataError, match=r"no 'testdata' array"):
        load_dataset("omniglot", data_dir=tmp_path)


def test_not_a_mat_file(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.SPECS, "omniglot", omniglot_spec(2, 2))
    (tmp_path / "omniglot").mkdir()
    (tmp_path / "omniglot" / "chardata.mat").write_bytes(b"<html>404 not found</html>")
    with pytest.raises(DataError, match="not a readable MATLAB file"):
        load_dataset("omniglot", data_dir=tmp_path)
