"""gapbench run: train -> evaluate-gaps -> report, reusing each stage's outputs only while they are current.

* Training: a finished run is reused when the recipe trains the same model for
  the same number of epochs. More epochs continue from the checkpoint (as
  ``train --resume`` does); an interrupted run resumes; anything else that
  changed (data, model, seed, other training settings) stops with the changed
  keys named, as do fewer epochs than were trained.
* Evaluation: reused only when it was made from this checkpoint, these
  datapoints, these settings and this code (:mod:`gapbench.provenance`);
  otherwise the stages whose inputs changed are recomputed.
* Report: rebuilt whenever its inputs (the gaps files, the code) changed.

The run folder is locked for the whole pipeline (:mod:`gapbench.lock`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

from gapbench.errors import GapbenchError
from gapbench.experiment import CHECKPOINT_FILE, META_FILE
from gapbench.io import load_torch, output_dir
from gapbench.recipe import load_recipe

log = logging.getLogger(__name__)

HOW = "gapbench run"


def training_complete(run_dir: Path) -> bool:
    """The run finished training: its meta.json is written only after the last epoch."""
    return (run_dir / META_FILE).is_file() and (run_dir / CHECKPOINT_FILE).is_file()


def run_pipeline(
    recipe_path,
    overrides: Sequence[str] = (),
    out: Optional[str] = None,
    device: Optional[str] = None,
    train_callback: Optional[Callable] = None,
    eval_callback: Optional[Callable] = None,
    stage_callback: Optional[Callable[[str], None]] = None,
):
    """Run every stage of the recipe; returns (run_dir, the report's Markdown table).

    Under torchrun (:mod:`gapbench.scale`) rank 0 holds the run folder, decides what
    training needs and writes the report; every rank takes part in training (as
    ``gapbench train`` does under torchrun) and takes its share of the evaluation.
    """
    from gapbench.experiment import resolve_device
    from gapbench.scale import detect, team

    recipe = load_recipe(recipe_path, overrides)
    run_dir = Path(out) if out else Path("runs") / recipe.name
    workers = detect()
    if not workers.distributed:
        return _pipeline(recipe, run_dir, device, workers, None, train_callback, eval_callback, stage_callback)
    group = team(workers, resolve_device(device or recipe.device).type)
    try:
        if workers.is_main:
            return _pipeline(recipe, run_dir, device, workers, group, train_callback, eval_callback, stage_callback)
        return _follow(recipe, run_dir, device, workers, group)
    except BaseException as exc:
        from gapbench.scale import RankFailed

        if not isinstance(exc, RankFailed):
            group.fail(str(exc) or type(exc).__name__)
        raise


def _pipeline(recipe, run_dir: Path, device, workers, group, train_callback, eval_callback, stage_callback):
    """The pipeline on one process, or on torchrun's rank 0 (which tells the other ranks what it does)."""
    from gapbench.evaluate import evaluate_run
    from gapbench.lock import command_line, folder_lock
    from gapbench.report import make_report, report_is_current
    from gapbench.train import train_run

    say = stage_callback or (lambda msg: None)
    with output_dir(run_dir, keep_if=lambda p: (p / CHECKPOINT_FILE).is_file()), \
            folder_lock(run_dir, command_line()):
        action, message = _training_action(recipe, run_dir, device)
        if group is not None:
            group.post(group.phase("pipeline-train"), action)
        say(message)
        if action != "skip":
            result = train_run(recipe, run_dir, device=device, resume=action == "resume", callback=train_callback,
                               how=HOW)
            say(result.summary_line())

        summary = evaluate_run(run_dir, device=device, resume=True, callback=eval_callback, settings_from=recipe,
                               refresh_report=False, workers=workers)
        gaps = f"{run_dir}/gaps/{recipe.evaluate.split}.json"
        if summary.reused:
            say(f"evaluate-gaps: {gaps} is up to date (same checkpoint, points, settings and code), skipping")
        say(summary.summary_line())

        out_dir = run_dir / "report"
        if report_is_current([run_dir], out_dir, split=recipe.evaluate.split):
            say(f"report: {out_dir} is up to date, skipping")
        else:
            written = make_report([run_dir], out_dir, split=recipe.evaluate.split)
            say(f"report: {len(written)} files in {out_dir}")
        if group is not None:
            group.post(group.phase("pipeline-report"))
    return run_dir, (out_dir / "table.md").read_text()


def _follow(recipe, run_dir: Path, device, workers, group):
    """A torchrun rank other than 0: train and evaluate alongside rank 0, as it decides; write nothing itself."""
    from gapbench.evaluate import evaluate_run
    from gapbench.train import train_run

    action = group.gather(group.phase("pipeline-train"), ranks=[0], what="deciding what to train")[0]
    if action != "skip":
        train_run(recipe, run_dir, device=device, resume=action == "resume", how=HOW)
    evaluate_run(run_dir, device=device, resume=True, settings_from=recipe, refresh_report=False, workers=workers)
    group.gather(group.phase("pipeline-report"), ranks=[0], what="writing the report")
    return run_dir, (run_dir / "report" / "table.md").read_text()


def _training_action(recipe, run_dir: Path, device):
    """What training the run folder needs: ("train" | "resume" | "skip", the line that says so)."""
    from gapbench.train import _check_resume

    ckpt = run_dir / CHECKPOINT_FILE
    if not ckpt.is_file():
        from gapbench.experiment import load_inputs, resolve_device
        from gapbench.preflight import check_before_training

        # Checked here too (train_run checks again), so a refusal is the only line printed.
        check_before_training(recipe, load_inputs(recipe), resolve_device(device or recipe.device))
        return "train", f"train: training {recipe.name} -> {run_dir}"
    _check_resume(recipe, run_dir, HOW)
    state = load_torch(ckpt)
    epochs, asked = int(state.get("epoch", 0)), recipe.train.num_epochs
    if epochs > asked:
        raise GapbenchError(
            f"{HOW}: {run_dir} has already trained {epochs} epochs, more than train.num_epochs={asked} "
            f"asks for; ask for at least {epochs} (--set train.num_epochs={epochs}), or choose another --out"
        )
    stopped = bool(state.get("stopped_early"))
    if training_complete(run_dir) and (epochs == asked or stopped):
        why = f"stopped early at epoch {epochs}" if stopped and epochs < asked else f"{epochs} epochs"
        return "skip", f"train: {run_dir} is already trained, skipping ({why})"
    what = (f"continuing {run_dir} from epoch {epochs} to {asked}" if training_complete(run_dir)
            else f"resuming {run_dir} from epoch {epochs}")
    return "resume", f"train: {what}"
