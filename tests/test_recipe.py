"""Recipes: validation, defaults, base extension, overrides, and a property test of the parser."""

import dataclasses

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gapbench.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict


def write(path, text):
    path.write_text(text)
    return path


def test_a_recipe_naming_only_its_dataset_resolves_every_default(tmp_path):
    r = load_recipe(write(tmp_path / "e.yaml", "data: {dataset: digits}\n"))
    assert r.name == "e"
    assert r.model.latent_dim == 50 and r.model.encoder_hidden == (200, 200)
    assert r.train.adam_eps == 1e-4 and r.train.lr_schedule == "iwae"
    assert r.evaluate.local.procedure == "fast" and r.evaluate.local.gradient == "path"
    assert r.evaluate.ais.num_leapfrog == 10
    tree = r.to_dict()
    # every field of every section appears in the resolved recipe
    for section in ("data", "model", "train", "evaluate"):
        cls = type(getattr(r, section))
        assert set(tree[section]) == {f.name for f in dataclasses.fields(cls)}


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(write(tmp_path / "a.yaml", "data: {dataset: digits}\nmodel: {latent_dim: 7, encoder: flow}\n"), ["evaluate.families=[ffg]"])
    again = load_recipe(write(tmp_path / "b.yaml", r.to_yaml()))
    assert again == r


def test_recipe_is_frozen(tmp_path):
    r = load_recipe(write(tmp_path / "a.yaml", "data: {dataset: digits}\n"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.model.latent_dim = 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: {latnt_dim: 3}", "unknown key model.latnt_dim in model (did you mean 'latent_dim'?)"),
        ("modle: {latent_dim: 3}", "unknown key modle in the recipe's top level (did you mean 'model'?)"),
        ("evaluate: {ais: {shedule: linear}}", "did you mean 'schedule'?"),
        ("model: {latent_dim: three}", "model.latent_dim: expected an integer, got 'three'"),
        ("model: {latent_dim: 0}", "model.latent_dim: must be at least 1, got 0"),
        ("model: {latent_dim: 2.5}", "model.latent_dim: expected an integer, got 2.5"),
        ("train: {lr: -0.1}", "train.lr: must be greater than 0, got -0.1"),
        ("train: {num_epochs: -3}", "train.num_epochs: must be at least 1, got -3"),
        ("evaluate: {local: {max_steps: 0}}", "evaluate.local.max_steps: must be at least 1"),
        ("data: {dataset: fashion_mnist}", "did you mean 'fashion-mnist'?"),
        ("data: {download: yes please}", "data.download: expected true or false"),
        ("model: {encoder_hidden: 200}", "model.encoder_hidden: expected a list of integers"),
        ("model: 5", "model: expected a mapping, got 5"),
        ("- a\n- b", "a recipe must be a mapping of sections, got list"),
        ("model: {latent_dim: [1, 2", "malformed YAML at line"),
        ("model: {likelihood: categorical}", "needs quantized data"),
        ("model: {architecture: conv}", "'conv' is built for 32x32x3 images"),
        ("data: {quantize_bits: 9}", "data.quantize_bits: must be at most 8"),
        ("model: {encoder: flow}\nevaluate: {ais: {init: encoder}}", "needs an exact log q"),
        ("model: {encoder: flow}\nevaluate: {families: [flow], ais: {init: ffg}}", "add ffg to evaluate.families"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, text, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path / "bad.yaml", text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_base_extends_and_overrides_section_by_section(tmp_path):
    write(tmp_path / "base.yaml", "seed: 3\ndata: {dataset: digits}\nmodel: {latent_dim: 20, activation: tanh}\ntrain: {num_epochs: 9}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nmodel: {latent_dim: 5}\n")
    r = load_recipe(child)
    assert (r.seed, r.model.latent_dim, r.model.activation, r.train.num_epochs) == (3, 5, "tanh", 9)
    assert r.name == "child"


def test_base_loop_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="loops back"):
        load_recipe(tmp_path / "a.yaml")


def test_set_overrides_parse_yaml_values(tmp_path):
    r = load_recipe(
        write(tmp_path / "a.yaml", "data: {dataset: digits}\n"),
        ["model.latent_dim=8", "train.lr=3e-4", "evaluate.families=[ffg, realnvp]", "data.download=true",
         "evaluate.ais.num_steps=1e3"],
    )
    assert r.model.latent_dim == 8 and r.train.lr == 3e-4 and r.data.download is True
    assert r.evaluate.families == ("ffg", "realnvp") and r.evaluate.ais.num_steps == 1000


@pytest.mark.parametrize("bad", ["latent_dim", "=3", "model..latent_dim=3"])
def test_malformed_set_is_an_error(tmp_path, bad):
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(write(tmp_path / "a.yaml", ""), [bad])


def test_shipped_recipes_are_valid():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))
    assert recipes, "no recipes shipped"
    overlays = {"small.yaml", "small-followups.yaml"}  # budget reductions applied on top of a base; no dataset
    for path in recipes:
        load_recipe(path, ["data.dataset=digits"] if path.name in overlays else [])


# ------------------------------------------------------------ property-based

_INT_FIELDS = [
    ("model", "latent_dim", 1), ("train", "batch_size", 1), ("train", "num_epochs", 1),
    ("train", "warmup_epochs", 0), ("evaluate", "num_points", 1),
]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(_INT_FIELDS), st.integers(min_value=-10**6, max_value=10**6))
def test_integer_fields_accept_exactly_their_range(field, value):
    section, key, lo = field
    if value >= lo:
        r = recipe_from_dict({section: {key: value}})
        assert getattr(getattr(r, section), key) == value
    else:
        with pytest.raises(RecipeError, match=f"{section}.{key}: must be at least {lo}"):
            recipe_from_dict({section: {key: value}})


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "seed", "data", "model", "train", "evaluate", "modle", "x"]), _json, max_size=4))
def test_parser_never_fails_with_anything_but_a_recipe_error(tree):
    """Arbitrary YAML-shaped input either validates or raises RecipeError with one line."""
    try:
        r = recipe_from_dict(tree)
    except RecipeError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(r, Recipe)
        assert recipe_from_dict(yaml.safe_load(r.to_yaml())) == r


def test_base_list_merges_in_order(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\ndata: {dataset: digits}\nmodel: {latent_dim: 20, activation: tanh}\n")
    write(tmp_path / "b.yaml", "model: {latent_dim: 7}\ntrain: {num_epochs: 3}\n")
    r = load_recipe(write(tmp_path / "c.yaml", "base: [a.yaml, b.yaml]\ntrain: {lr: 0.01}\n"))
    assert (r.seed, r.model.latent_dim, r.model.activation, r.train.num_epochs, r.train.lr) == (1, 7, "tanh", 3, 0.01)
