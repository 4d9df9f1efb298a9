"""Your own data (data.dataset: files): each accepted format, each refusal, and a whole run on it."""

from __future__ import annotations

import json
import re
import zipfile

import numpy as np
import pytest
import torch
import yaml

from gapbench.data import DataError, load_dataset, load_files
from gapbench.data.digits import load_digits_set
from gapbench.recipe import RecipeError, load_recipe
from tests.cli_runner import run_cli


def digits_uint8():
    """The bundled digits as 8-bit images [1797, 8, 8] (counts 0..16 times 15: 0..240) and labels."""
    x, y = load_digits_set()
    return np.rint(x * 16).astype(np.uint8) * 15, y


def expected_split(num, num_valid, num_test, seed=0):
    """The documented rule: a permutation seeded by ``seed``; test its head, valid the next, train the rest."""
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    test, rest = perm[:num_test].sort().values, perm[num_test:]
    return rest[num_valid:].sort().values, rest[:num_valid].sort().values, test


def assert_splits(ds, x, y, num_valid, num_test, seed=0):
    """``ds`` holds the images x [N, C, H, W] (float32) and labels y split by the documented rule."""
    for name, idx in zip(("train", "valid", "test"), expected_split(len(x), num_valid, num_test, seed)):
        assert torch.equal(getattr(ds, name), x[idx]), name
        labels = getattr(ds, f"{name}_labels")
        assert (labels is None) if y is None else torch.equal(labels, y[idx]), name


# ---------------------------------------------------------------- formats


def test_npz_of_one_array_splits_as_digits_does(tmp_path):
    x, y = load_digits_set()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_files(tmp_path / "d.npz", num_valid=300, num_test=300)
    ref = load_dataset("digits")
    for name in ("train", "valid", "test"):
        assert torch.equal(getattr(ds, name), getattr(ref, name))
        assert torch.equal(getattr(ds, f"{name}_labels"), getattr(ref, f"{name}_labels"))
    assert ds.image_shape == (1, 8, 8) and ds.num_levels is None


def test_npy_and_only_array_default_to_a_tenth_each(tmp_path):
    x8, _ = digits_uint8()
    np.save(tmp_path / "d.npy", x8)
    np.savez(tmp_path / "only.npz", images=x8)
    x = torch.from_numpy(x8.astype(np.float32) / 255).unsqueeze(1)
    for name in ("d.npy", "only.npz"):
        ds = load_files(tmp_path / name, split_seed=3)
        assert_splits(ds, x, None, 179, 179, seed=3)
        assert "8-bit" in ds.description


def test_npz_with_splits_and_channels_last(tmp_path):
    rng = np.random.default_rng(0)
    sizes = {"train": 7, "valid": 3, "test": 4}
    arrays = {s: rng.integers(0, 256, (n, 5, 6, 3), dtype=np.uint8) for s, n in sizes.items()}
    labels = {f"{s}_labels": np.arange(len(a)) % 2 for s, a in arrays.items()}
    np.savez(tmp_path / "s.npz", **arrays, **labels)
    ds = load_files(tmp_path / "s.npz")
    assert ds.image_shape == (3, 5, 6)
    for s, a in arrays.items():
        want = torch.from_numpy(a.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255))
        assert torch.equal(getattr(ds, s), want)
        assert torch.equal(getattr(ds, f"{s}_labels"), torch.from_numpy(labels[f"{s}_labels"]).long())


def test_npz_without_valid_carves_it_from_train(tmp_path):
    x, y = load_digits_set()
    np.savez(tmp_path / "tt.npz", train=x[:1000], test=x[1000:], train_labels=y[:1000], test_labels=y[1000:])
    ds = load_files(tmp_path / "tt.npz", split_seed=2)
    train_idx, valid_idx, _ = expected_split(1000, 100, 0, seed=2)
    xt = torch.from_numpy(x[:1000].copy()).unsqueeze(1)
    assert torch.equal(ds.train, xt[train_idx]) and torch.equal(ds.valid, xt[valid_idx])
    assert torch.equal(ds.test, torch.from_numpy(x[1000:].copy()).unsqueeze(1))
    assert torch.equal(ds.valid_labels, torch.from_numpy(y[:1000].copy())[valid_idx])


def test_folder_of_pngs_with_class_subfolders_reads_as_the_array(tmp_path):
    from PIL import Image

    x8, y = digits_uint8()
    x8, y = x8[:60], y[:60]
    order = np.argsort(y, kind="stable")  # read class by class, names sorted within each
    for i in order:
        folder = tmp_path / "imgs" / f"class{y[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x8[i]).save(folder / f"{i:03d}.png")
    (tmp_path / "imgs" / ".hidden").write_text("skipped")
    ds = load_files(tmp_path / "imgs", num_valid=6, num_test=6)
    x = torch.from_numpy(x8[order].astype(np.float32) / np.float32(255)).unsqueeze(1)
    assert_splits(ds, x, torch.from_numpy(y[order]).long(), 6, 6)
    assert "10 class folders" in ds.description


def test_flat_folder_of_rgb_images_has_no_labels(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    x8 = rng.integers(0, 256, (12, 4, 5, 3), dtype=np.uint8)
    for i, im in enumerate(x8):
        Image.fromarray(im).save(tmp_path / f"{i:02d}.png")
    ds = load_files(tmp_path, num_valid=2, num_test=2)
    assert_splits(ds, torch.from_numpy(x8.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)), None, 2, 2)


@pytest.mark.parametrize("stored", [np.bool_, np.uint8, np.int64])
def test_binary_values_are_kept_as_zero_and_one(tmp_path, stored):
    bits = np.random.default_rng(2).random((30, 4, 4)) > 0.5
    np.save(tmp_path / "b.npy", bits.astype(stored))
    ds = load_files(tmp_path / "b.npy")
    assert_splits(ds, torch.from_numpy(bits.astype(np.float32)).unsqueeze(1), None, 3, 3)
    assert "binary" in ds.description


def test_quantize_bits_on_8_bit_images(tmp_path):
    x8, _ = digits_uint8()
    np.save(tmp_path / "d.npy", x8)
    ds = load_files(tmp_path / "d.npy", quantize_bits=3)
    x = torch.from_numpy((x8 >> 5).astype(np.float32) / np.float32(7)).unsqueeze(1)
    assert_splits(ds, x, None, 179, 179)
    assert ds.num_levels == 8


# ---------------------------------------------------------------- refusals


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _garbage(path):
    path.write_bytes(b"not numpy at all" * 10)
    return path


def _truncated(path):
    np.savez_compressed(path, x=np.zeros((50, 8, 8), np.float32))
    path.write_bytes(path.read_bytes()[:200])
    return path


def _different_sizes(path):
    from PIL import Image

    path.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(path / "b.png")
    return path


def _not_an_image(path):
    path.mkdir()
    (path / "a.png").write_bytes(b"\x89PNG broken")
    return path


GOOD = np.zeros((20, 4, 4), np.float32)
NAN = GOOD.copy()
NAN[3, 1, 2] = np.nan
NAN[7, 0, 0] = np.inf

REFUSALS = {
    "missing": (lambda p: p, "no such file or folder"),
    "not numpy": (_garbage, "is not a NumPy .npy/.npz file"),
    "truncated": (_truncated, "damaged or truncated"),
    "wrong keys": (lambda p: _npz(p, images=GOOD, labels=np.zeros(20)), "(found images, labels)"),
    "no test": (lambda p: _npz(p, train=GOOD), "lacks test (found train)"),
    "labels of some splits": (lambda p: _npz(p, train=GOOD, test=GOOD, train_labels=np.zeros(20)),
                              "has labels for train but not for test"),
    "nan": (lambda p: _npz(p, x=NAN), "x holds 2 NaN or infinite value(s), the first at index [3, 0, 1, 2]"),
    "floats above 1": (lambda p: _npz(p, x=GOOD + 2), "values from 2 to 2, outside the range of floats in [0, 1]"),
    "negative integers": (lambda p: _npz(p, x=np.full((20, 4, 4), -1)),
                          "values from -1 to -1, outside the range of integers 0..255"),
    "shapes": (lambda p: _npz(p, train=GOOD, test=np.zeros((5, 5, 4), np.float32)), "train [1, 4, 4], test [1, 5, 4]"),
    "mixed types": (lambda p: _npz(p, train=GOOD, test=np.zeros((5, 4, 4), np.uint8)), "mix value types"),
    "flat": (lambda p: _npz(p, x=np.zeros((20, 16), np.float32)), "has shape [20, 16]; expected images"),
    "too few": (lambda p: _npz(p, x=GOOD[:2]), "the images number 2, too few for 1 test + 1 valid + at least 1 train"),
    "sizes in a folder": (_different_sizes,
                          "images of different sizes: a.png is 8x8 greyscale, b.png is 8x9 greyscale"),
    "not an image": (_not_an_image, "a.png is not a readable PNG or JPEG image"),
    "empty folder": (lambda p: p.mkdir() or p, "holds no PNG or JPEG image"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_naming_the_file(tmp_path, case):
    make, words = REFUSALS[case]
    path = make(tmp_path / ("data" if "folder" in case or "image" in case else "data.npz"))
    with pytest.raises(DataError) as info:
        load_files(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and words in msg, msg


def test_quantize_bits_needs_8_bit_images(tmp_path):
    np.save(tmp_path / "f.npy", GOOD)
    with pytest.raises(DataError, match=r"quantize_bits needs 8-bit images .* these are floats in \[0, 1\]"):
        load_files(tmp_path / "f.npy", quantize_bits=3)


def test_split_sizes_that_do_not_apply_are_refused(tmp_path):
    _npz(tmp_path / "s.npz", train=GOOD, valid=GOOD, test=GOOD)
    with pytest.raises(DataError, match="has its own valid array, so data.num_valid does not apply"):
        load_files(tmp_path / "s.npz", num_valid=3)
    with pytest.raises(DataError, match="has its own test array, so data.num_test does not apply"):
        load_files(tmp_path / "s.npz", num_test=3)


def test_a_changed_file_no_longer_matches_its_recorded_hash(tmp_path):
    path = _npz(tmp_path / "d.npz", x=GOOD)
    from gapbench.data import content_sha256

    recorded = content_sha256(path)
    _npz(path, x=GOOD + 0.5)
    with pytest.raises(DataError, match=r"has changed since data.sha256 was recorded \(" + recorded[:12]):
        load_files(path, sha256=recorded)


# ---------------------------------------------------------------- recipes


def test_recipe_path_is_read_from_the_recipe_folder_and_hashed(tmp_path, monkeypatch):
    from gapbench.data import content_sha256

    (tmp_path / "recipes" / "data").mkdir(parents=True)
    path = _npz(tmp_path / "recipes" / "data" / "d.npz", x=GOOD)
    (tmp_path / "recipes" / "r.yaml").write_text("data: {dataset: files, path: data/d.npz}\n")
    monkeypatch.chdir(tmp_path)
    d = load_recipe("recipes/r.yaml").data
    assert d.path == str(path) and d.sha256 == content_sha256(path)
    # A --set path is read from the working directory.
    assert load_recipe("recipes/r.yaml", ["data.path=recipes/data/d.npz"]).data.path == str(path)


@pytest.mark.parametrize("data, key", [
    ({"dataset": "files"}, "data.dataset: 'files' reads your own images from data.path"),
    ({"dataset": "digits", "path": "x.npz"}, "data.path: applies to your own data (dataset 'files'), not 'digits'"),
    ({"dataset": "files", "path": "x.npz", "download": True}, "data.download: applies to the built-in datasets"),
    ({"dataset": "files", "path": "x.npz", "sha256": "abc"}, "data.sha256: expected a SHA-256"),
])
def test_recipe_keys_of_own_data_where_they_apply(tmp_path, data, key):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"data": data}))
    with pytest.raises(RecipeError, match=re.escape(key)):
        load_recipe(tmp_path / "r.yaml")


# ---------------------------------------------------------------- a whole run

TINY_FILES = """
name: own
seed: 0
device: cpu
num_threads: 1
data: {dataset: files, path: digits.npz, binarize: threshold, num_valid: 300, num_test: 300}
model: {latent_dim: 2, encoder_hidden: [16], decoder_hidden: [16], flow_hidden: 8}
train: {batch_size: 100, num_epochs: 2, lr_schedule: constant, lr: 3.0e-3, warmup_epochs: 1}
evaluate:
  num_points: 6
  batch_size: 6
  families: [ffg]
  elbo_samples: 50
  iwae_samples: 100
  local: {num_samples: 5, check_every: 5, patience: 1, max_steps: 20, num_final_samples: 50}
  ais: {num_steps: 5, num_chains: 2, num_leapfrog: 2, init: encoder}
"""


def test_gapbench_run_on_own_data_end_to_end(tmp_path, capsys):
    torch.set_num_threads(1)
    x, y = load_digits_set()
    data = _npz(tmp_path / "digits.npz", x=x, y=y)
    recipe = tmp_path / "own.yaml"
    recipe.write_text(TINY_FILES)
    run = tmp_path / "run"
    code, out, err = run_cli(["-q", "run", recipe, "--out", run], capsys)
    assert code == 0, err
    assert (run / "report" / "table.md").is_file() and (run / "gaps" / "test.csv").is_file()
    saved = yaml.safe_load((run / "recipe.yaml").read_text())["data"]
    from gapbench.data import content_sha256

    sha = content_sha256(data)
    assert saved["path"] == str(data) and saved["sha256"] == sha
    assert sha in json.loads((run / "meta.json").read_text())["data_description"]
    context = json.loads((run / "gaps" / "test.json").read_text())["provenance"]
    assert context["data"]["sha256"] == sha and "path" not in context["data"]

    # The same file again: everything is reused.
    code, out, err = run_cli(["run", recipe, "--out", run], capsys)
    assert code == 0 and "already trained, skipping" in out + err, out + err

    # A changed file: the run is not continued on it, and its evaluation refuses it.
    _npz(data, x=x[::-1].copy(), y=y)
    code, out, err = run_cli(["-q", "run", recipe, "--out", run], capsys)
    assert code == 2 and "data.sha256" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = run_cli(["-q", "evaluate-gaps", run], capsys)
    assert code == 2 and f"data.path {data}: has changed since data.sha256 was recorded" in err, err


def test_gapbench_run_refuses_a_missing_file_and_writes_nothing(tmp_path, capsys):
    recipe = tmp_path / "own.yaml"
    recipe.write_text(TINY_FILES)
    code, out, err = run_cli(["-q", "run", recipe, "--out", tmp_path / "run"], capsys)
    assert code == 2 and f"data.path {tmp_path / 'digits.npz'}: no such file or folder" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    code, out, err = run_cli(["datasets"], capsys)
    assert code == 0 and "digits" in out


def test_a_corrupt_npz_member_is_a_data_error(tmp_path):
    """A zip whose member is not an array (a CRC-correct but foreign file)."""
    path = tmp_path / "z.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", b"garbage, not an array")
    with pytest.raises(DataError, match=re.escape(f"data.path {path}: holds x, which is not a NumPy array")):
        load_files(path)
