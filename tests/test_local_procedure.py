"""evaluate.local.procedure: gapbench's fast local fits by default, the paper's procedure one key away."""

from pathlib import Path

from gapbench.recipe import PAPER_LOCAL, LocalConfig, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]


def _local(tree):
    return recipe_from_dict(tree).evaluate.local


def test_paper_fills_every_unset_key_with_the_papers_value():
    local = _local({"evaluate": {"local": {"procedure": "paper"}}})
    for key, value in PAPER_LOCAL.items():
        assert getattr(local, key) == value, key
    assert (local.lr, local.num_samples, local.check_every, local.patience) == (1e-3, 50, 100, 10)
    assert (local.init, local.flow_init, local.gradient) == ("prior", "prior", "total")


def test_fast_is_the_default_and_differs_from_the_paper():
    local = _local({})
    assert local == LocalConfig() and local.procedure == "fast"
    differ = [k for k, v in PAPER_LOCAL.items() if getattr(local, k) != v]
    assert {"gradient", "init", "lr_decay", "improvement_se"} <= set(differ)


def test_keys_a_recipe_sets_win_over_the_preset():
    local = _local({"evaluate": {"local": {"procedure": "paper", "lr": 2e-3, "max_steps": 77}}})
    assert local.lr == 2e-3 and local.max_steps == 77 and local.patience == 10


def test_one_set_switches_a_recipe_to_the_paper(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {dataset: digits}\nevaluate: {local: {max_steps: 500}}\n")
    fast = load_recipe(path).evaluate.local
    paper = load_recipe(path, ["evaluate.local.procedure=paper"]).evaluate.local
    assert fast.gradient == "path" and paper.gradient == "total" and paper.lr == 1e-3
    assert fast.max_steps == paper.max_steps == 500


def test_a_resolved_paper_recipe_round_trips(tmp_path):
    r = recipe_from_dict({"data": {"dataset": "digits"}, "evaluate": {"local": {"procedure": "paper"}}})
    path = tmp_path / "again.yaml"
    path.write_text(r.to_yaml())
    assert load_recipe(path) == r


def test_the_full_table2_recipes_use_the_paper_and_the_cpu_budget_the_fast_fits():
    full = load_recipe(REPO / "recipes" / "cremer2018" / "fashion_ffg.yaml", require_data=False).evaluate.local
    small = load_recipe(REPO / "recipes" / "cremer2018-small" / "fashion_ffg.yaml", require_data=False).evaluate.local
    assert full.procedure == "paper" and full.gradient == "total" and full.init == "prior"
    assert small.procedure == "fast" and small.gradient == "path" and small.init == "encoder"
