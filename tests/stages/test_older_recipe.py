"""A run folder whose recipe.yaml an older gapbench wrote: evaluating it says which settings it lacks."""

import logging
import shutil

import yaml

from gapbench.evaluate import evaluate_run

FAST = ["evaluate.num_points=4", "evaluate.batch_size=4", "evaluate.ais.enabled=false", "evaluate.families=[ffg]"]


def _copy(trained_tiny, dest):
    shutil.copytree(trained_tiny, dest, ignore=shutil.ignore_patterns("gaps", "report", ".gapbench.lock"))
    return dest


def _older(messages):
    return [m for m in messages if "written by an older gapbench" in m]


def test_a_recipe_lacking_current_keys_is_named_in_a_warning(trained_tiny, tmp_path, caplog):
    run = _copy(trained_tiny, tmp_path / "run")
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    del saved["evaluate"]["local"]["procedure"]  # as a version before the key existed wrote it
    del saved["evaluate"]["diagnostics"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with caplog.at_level(logging.WARNING, logger="gapbench.evaluate"):
        evaluate_run(run, overrides=FAST)
    (warning,) = _older(caplog.messages)
    assert "evaluate.local.procedure" in warning and "evaluate.diagnostics" in warning
    assert "--recipe" in warning


def test_a_current_recipe_or_an_overridden_key_gives_no_warning(trained_tiny, tmp_path, caplog):
    run = _copy(trained_tiny, tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="gapbench.evaluate"):
        evaluate_run(run, overrides=FAST)
    assert not _older(caplog.messages)

    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    del saved["evaluate"]["local"]["procedure"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gapbench.evaluate"):
        evaluate_run(run, overrides=FAST + ["evaluate.local.procedure=fast"], restart=True)
    assert not _older(caplog.messages)  # the command line gives the key: nothing is left to a default
