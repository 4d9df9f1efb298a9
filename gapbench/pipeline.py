"""gapbench run: train -> evaluate-gaps -> report, skipping stages whose complete outputs exist.

A stage that was interrupted is resumed, not restarted: training continues
from its last checkpoint, the evaluation from its last finished batch.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

from gapbench.experiment import CHECKPOINT_FILE, META_FILE
from gapbench.io import read_json
from gapbench.recipe import load_recipe

log = logging.getLogger(__name__)


def training_complete(run_dir: Path) -> bool:
    """The run finished training: its meta.json is written only after the last epoch."""
    return (run_dir / META_FILE).is_file() and (run_dir / CHECKPOINT_FILE).is_file()


def evaluation_complete(run_dir: Path, recipe) -> bool:
    """gaps/<split>.json exists and was made with the recipe's evaluation settings."""
    path = run_dir / "gaps" / f"{recipe.evaluate.split}.json"
    if not path.is_file():
        return False
    from gapbench.evaluate import _jsonable

    return read_json(path).get("settings") == _jsonable(dataclasses.asdict(recipe.evaluate))


def run_pipeline(
    recipe_path,
    overrides: Sequence[str] = (),
    out: Optional[str] = None,
    device: Optional[str] = None,
    train_callback: Optional[Callable] = None,
    eval_callback: Optional[Callable] = None,
    stage_callback: Optional[Callable[[str], None]] = None,
):
    """Run every stage of the recipe; returns (run_dir, the report's Markdown table)."""
    from gapbench.evaluate import evaluate_run
    from gapbench.report import make_report
    from gapbench.train import train_run

    recipe = load_recipe(recipe_path, overrides)
    run_dir = Path(out) if out else Path("runs") / recipe.name
    say = stage_callback or (lambda msg: None)

    if training_complete(run_dir):
        from gapbench.train import _check_resume

        _check_resume(recipe, run_dir)
        say(f"train: {run_dir} is already trained, skipping")
    else:
        resume = (run_dir / CHECKPOINT_FILE).is_file()
        say(f"train: {'resuming' if resume else 'training'} {recipe.name} -> {run_dir}")
        result = train_run(recipe, run_dir, device=device, resume=resume, callback=train_callback)
        say(result.summary_line())

    if evaluation_complete(run_dir, recipe):
        say(f"evaluate-gaps: {run_dir}/gaps/{recipe.evaluate.split}.json is up to date, skipping")
    else:
        say(f"evaluate-gaps: {recipe.evaluate.num_points} {recipe.evaluate.split} points")
        summary = evaluate_run(run_dir, device=device, resume=True, callback=eval_callback, settings_from=recipe)
        say(summary.summary_line())

    out_dir = run_dir / "report"
    written = make_report([run_dir], out_dir, split=recipe.evaluate.split)
    say(f"report: {len(written)} files in {out_dir}")
    return run_dir, (out_dir / "table.md").read_text()
