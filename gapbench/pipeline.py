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

``gapbench run --seeds 0,1,2`` (:func:`run_seeds`) runs the pipeline once per seed,
into ``<out>/seed_S``, then reports over the seeds' runs in ``<out>/report``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

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


# ---------------------------------------------------------------- seeds

#: The folder of seed S's run inside the seeds' folder: ``<out>/seed_S``.
SEED_FOLDER = "seed_{seed}"


def parse_seeds(text: str) -> List[int]:
    """The seeds of ``--seeds``: integers and ranges separated by commas ("0,1,2", "0-4", "0-2,7"), in order."""
    how = "give seeds as 0,1,2 or a range 0-4 (or both: 0-2,7)"
    seeds: List[int] = []
    for part in str(text).split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
            raise GapbenchError(f"--seeds {text!r}: {part!r} is not a seed or a range; {how}")
        lo, hi = int(first), int(last) if dash else int(first)
        if hi < lo:
            raise GapbenchError(f"--seeds {text!r}: the range {part!r} is empty; {how}, "
                                "the first no larger than the last")
        seeds += range(lo, hi + 1)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise GapbenchError(f"--seeds {text!r} names seed {', '.join(map(str, repeated))} more than once; "
                            "give each seed once")
    return seeds


def run_seeds(
    recipe_path,
    seeds: Sequence[int],
    overrides: Sequence[str] = (),
    out: Optional[str] = None,
    device: Optional[str] = None,
    callbacks_fn: Optional[Callable[[int], Tuple[Optional[Callable], Optional[Callable]]]] = None,
    stage_callback: Optional[Callable[[str], None]] = None,
):
    """:func:`run_pipeline` once per seed (``--set seed=S``), then one report over the seeds' runs.

    Seed S's run goes to ``<out>/seed_S`` (``out`` defaults to runs/<recipe name>), one
    after the other; the report over all of them, with the table of their mean and
    its standard error between seeds (seeds.md), to ``<out>/report``.
    ``callbacks_fn(seed)`` gives each run's (train_callback, eval_callback).
    Returns (the seeds' folder, the run folders, the report's table.md and seeds.md).
    Under torchrun every rank runs each seed's pipeline; rank 0 alone writes the report.
    """
    from gapbench.experiment import RECIPE_FILE
    from gapbench.report import make_report, report_is_current
    from gapbench.scale import detect

    if any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise GapbenchError("--seeds and --set seed=... both set the seed; give one of them")
    if not seeds:
        raise GapbenchError("--seeds names no seed; give seeds as 0,1,2 or a range 0-4")
    recipe = load_recipe(recipe_path, overrides)
    base = Path(out) if out else Path("runs") / recipe.name
    if (base / RECIPE_FILE).is_file():
        raise GapbenchError(f"{base} is a run folder (it has {RECIPE_FILE}); the seeds' runs go into a folder of "
                            f"their own: give --out DIR")
    main = detect().is_main
    say = stage_callback if stage_callback is not None and main else (lambda msg: None)
    run_dirs = []
    for seed in seeds:
        run_dir = base / SEED_FOLDER.format(seed=seed)
        say(f"seed {seed}: {run_dir}")
        train_cb, eval_cb = callbacks_fn(seed) if callbacks_fn is not None else (None, None)
        run_pipeline(recipe_path, [*overrides, f"seed={seed}"], out=str(run_dir), device=device,
                     train_callback=train_cb, eval_callback=eval_cb, stage_callback=stage_callback)
        run_dirs.append(run_dir)
    out_dir = base / "report"
    if not main:
        return base, run_dirs, "", ""
    if report_is_current(run_dirs, out_dir, split=recipe.evaluate.split):
        say(f"report: {out_dir} is up to date, skipping")
    else:
        written = make_report(run_dirs, out_dir, split=recipe.evaluate.split)
        seeds_word = "1 seed" if len(run_dirs) == 1 else f"{len(run_dirs)} seeds"
        say(f"report: {len(written)} files over {seeds_word} in {out_dir}")
    seeds_md = out_dir / "seeds.md"
    return base, run_dirs, (out_dir / "table.md").read_text(), seeds_md.read_text() if seeds_md.is_file() else ""
