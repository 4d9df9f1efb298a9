"""Recipe errors name where the bad value came from (the file, its base, or a --set) and read as English."""

from pathlib import Path

import pytest

from gapbench.recipe import RecipeError, load_recipe, recipe_from_dict

GOOD = "data: {dataset: digits}\nmodel: {latent_dim: 3}\n"


def write(path, text):
    path.write_text(text)
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------ --set or file


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.num_epochs=abc", "--set train.num_epochs=abc: expected an integer, got 'abc'"),
        ("model.latent_dim=0", "--set model.latent_dim=0: must be at least 1, got 0"),
        ("model.latnt_dim=3", "--set model.latnt_dim=3: unknown key model.latnt_dim in model (did you mean 'latent_dim'?)"),
        ("modle.latent_dim=3", "--set modle.latent_dim=3: unknown key modle in the recipe's top level (did you mean 'model'?)"),
        ("model=5", "--set model=5: expected a mapping, got 5"),
        ("evaluate.families=[ffg, flw]", "--set evaluate.families=[ffg, flw]: evaluate.families[1]: expected one of"),
        ("data.dataset=mnsit", "--set data.dataset=mnsit: expected one of"),
        ("model.architecture=conv", "--set model.architecture=conv: 'conv' is built for 32x32x3 images"),
    ],
)
def test_an_error_in_a_set_names_the_set_not_the_file(tmp_path, override, message):
    got = error_of(write(tmp_path / "r.yaml", GOOD), [override])
    assert got.startswith(message), got
    assert "r.yaml" not in got


def test_an_error_in_the_file_names_the_file_even_with_sets(tmp_path):
    path = write(tmp_path / "r.yaml", GOOD + "train: {num_epochs: abc}\n")
    got = error_of(path, ["model.latent_dim=4"])
    assert got == f"{path}: train.num_epochs: expected an integer, got 'abc'"


def test_a_later_set_of_the_same_key_is_blamed(tmp_path):
    path = write(tmp_path / "r.yaml", GOOD)
    got = error_of(path, ["train.num_epochs=3", "train.num_epochs=-1"])
    assert got == "--set train.num_epochs=-1: must be at least 1, got -1"
    # and a --set that repairs the file's value clears the file's error
    bad = write(tmp_path / "b.yaml", GOOD + "train: {num_epochs: abc}\n")
    assert load_recipe(bad, ["train.num_epochs=2"]).train.num_epochs == 2


def test_a_clash_between_file_and_set_names_both(tmp_path):
    path = write(tmp_path / "c.yaml", "data: {dataset: cifar10}\nmodel: {architecture: conv}\n")
    got = error_of(path, ["data.dataset=mnist"])
    assert got.startswith(f"{path} (with --set data.dataset=mnist): model.architecture: 'conv' is built for"), got


def test_an_error_in_a_base_names_the_base(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", GOOD + "train: {lr: fast}\n")
    child = write(tmp_path / "sub" / "child.yaml", "base: ../base.yaml\nmodel: {latent_dim: 5}\n")
    got = error_of(child)
    assert got.startswith(str(tmp_path / "base.yaml") + ": train.lr: expected a number"), got


# ------------------------------------------------------------ base: files


def test_a_missing_base_names_the_recipe_and_the_path_looked_for(tmp_path):
    (tmp_path / "recipes").mkdir()
    path = write(tmp_path / "recipes" / "x.yaml", "base: other.yaml\n" + GOOD)
    got = error_of(path)
    looked = (tmp_path / "recipes" / "other.yaml").resolve()
    assert got == f"{path}: base: other.yaml does not exist (looked for {looked}); fix the base: line"


def test_a_missing_base_of_a_base_names_the_base_that_refers_to_it(tmp_path):
    write(tmp_path / "mid.yaml", "base: gone.yaml\n" + GOOD)
    path = write(tmp_path / "top.yaml", "base: mid.yaml\n")
    got = error_of(path)
    assert got.startswith(f"{tmp_path / 'mid.yaml'}: base: gone.yaml does not exist"), got


# ------------------------------------------------------------ type names


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: {encoder_hidden: 200}", "model.encoder_hidden: expected a list of integers, got 200"),
        ("model: {conv_channels: [64, x]}", "model.conv_channels[1]: expected an integer, got 'x'"),
        (
            "evaluate: {families: ffg}",
            "evaluate.families: expected a list whose items are each one of 'ffg', 'flow', 'realnvp', got 'ffg'",
        ),
    ],
)
def test_type_names_read_as_english(tmp_path, text, message):
    got = error_of(write(tmp_path / "t.yaml", "data: {dataset: digits}\n" + text))
    assert got.endswith(message), got
    assert "a list of an" not in got and "a list of one of" not in got


# ------------------------------------------------------------ empty recipes


@pytest.mark.parametrize("text", ["", "# only a comment\n", "name: x\nseed: 3\n", "name: x\ndevice: cpu\n"])
def test_an_empty_recipe_is_an_error_naming_what_it_needs(tmp_path, text):
    path = write(tmp_path / "x.yaml", text)
    got = error_of(path)
    assert got.startswith(f"{path}: the recipe is empty; it needs at least a data section naming the dataset")
    assert "data: {dataset: digits}" in got and "recipes/quickstart.yaml" in got


def test_an_empty_recipe_with_an_empty_base_is_empty(tmp_path):
    write(tmp_path / "b.yaml", "seed: 1\n")
    got = error_of(write(tmp_path / "x.yaml", "base: b.yaml\n"))
    assert "the recipe is empty" in got


@pytest.mark.parametrize("text", ["model: {latent_dim: 3}\n", "data: {binarize: static}\n", "data: {}\n"])
def test_a_recipe_must_name_its_dataset(tmp_path, text):
    path = write(tmp_path / "x.yaml", text)
    got = error_of(path)
    assert got.startswith(f"{path}: data.dataset is not given"), got
    assert "--set data.dataset=NAME" in got


def test_the_dataset_may_come_from_a_base_or_a_set(tmp_path):
    write(tmp_path / "b.yaml", "data: {dataset: mnist}\n")
    assert load_recipe(write(tmp_path / "x.yaml", "base: b.yaml\nmodel: {latent_dim: 3}\n")).data.dataset == "mnist"
    nod = write(tmp_path / "n.yaml", "model: {latent_dim: 3}\n")
    assert load_recipe(nod, ["data.dataset=digits"]).data.dataset == "digits"
    assert load_recipe(nod, ["data={dataset: omniglot}"]).data.dataset == "omniglot"


def test_settings_only_files_and_plain_dicts_need_no_dataset(tmp_path):
    path = write(tmp_path / "s.yaml", "evaluate: {num_points: 7}\n")
    assert load_recipe(path, require_data=False).evaluate.num_points == 7
    assert load_recipe(write(tmp_path / "e.yaml", ""), require_data=False).data.dataset == "digits"
    assert recipe_from_dict({}).data.dataset == "digits"
    assert recipe_from_dict({"model": {"latent_dim": 4}}).model.latent_dim == 4


def test_every_shipped_experiment_still_loads():
    """Every recipe in recipes/ loads, except the two overlays that only reduce a budget on top of a base."""
    root = Path(__file__).parent.parent / "recipes"
    overlays = {"small.yaml", "small-followups.yaml"}
    paths = sorted(root.rglob("*.yaml"))
    assert paths
    for path in paths:
        if path.name in overlays:
            assert "data.dataset is not given" in error_of(path)
            load_recipe(path, ["data.dataset=digits"])  # valid once a dataset is named
        else:
            load_recipe(path)
