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


def test_flows_check_on_their_own_window():
    """local.check_every is the FFG's window, local.flow_check_every the flows' (null: the same)."""
    import dataclasses

    from gapbench.gaps import run_stage
    from gapbench.recipe import EvaluateConfig
    from tests.inference.conftest import make_linear_gaussian, simulate

    model = make_linear_gaussian()
    x = simulate(model, 3)
    local = dataclasses.replace(LocalConfig(), check_every=7, flow_check_every=3, patience=2, max_steps=300,
                                num_samples=10, num_final_samples=50)
    cfg = EvaluateConfig(local=local)
    kwargs = {"num_flow_steps": 1, "flow_hidden": 4}
    ffg, _ = run_stage("local_ffg", model, x, cfg, seed=0)
    flow, _ = run_stage("local_flow", model, x, cfg, seed=0, family_kwargs=kwargs)
    assert ffg["converged_ffg"].all() and flow["converged_flow"].all()
    assert (ffg["steps_ffg"] % 7 == 0).all() and (flow["steps_flow"] % 3 == 0).all()
    assert not (flow["steps_flow"] % 7 == 0).all()
    same = EvaluateConfig(local=dataclasses.replace(local, flow_check_every=None))
    flow7, _ = run_stage("local_flow", model, x, same, seed=0, family_kwargs=kwargs)
    assert (flow7["steps_flow"] % 7 == 0).all()
