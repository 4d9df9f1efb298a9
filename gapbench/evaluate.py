"""gapbench evaluate-gaps: the gap decomposition of a trained run, saved batch by batch.

Datapoints are chosen reproducibly (a seeded permutation of the split). Each
stage (one estimator) runs over batches of them; every finished (stage, batch)
is saved at once under ``gaps/.partial/<split>/``, so ``--resume`` recomputes
nothing that finished. Each (stage, batch) runs under its own seed, so a
resumed evaluation gives exactly the numbers of an uninterrupted one on CPU.
A run trained with a method that refines the encoder's q at test time
(``Method.refines``) gets the stage "refined", L[q_refined], after the amortized one.
When the recipe asks for diagnostics of the model (``evaluate.diagnostics``:
active units, mutual information, the decoder's Jacobian, the q~_k curve), they are
one more unit of work, the stage "diagnostics", on all the evaluated points at once.
The outputs ``gaps/<split>.csv`` (one row per datapoint, with its class label when
the dataset has labels) and ``gaps/<split>.json`` (summary, diagnostics, settings,
convergence traces) are written atomically at the end. ``checkpoint=E`` evaluates the
weights kept at epoch E (``train.keep_checkpoints``) instead of the final checkpoint, into
``gaps/epoch_<E>/`` (with its own ``.partial/``), never mixed with the final model's gaps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from gapbench.errors import GapbenchError
from gapbench.experiment import configure_threads, evaluation_split, load_inputs, load_trained_model, open_run, resolve_device
from gapbench.gaps import local_family_kwargs, local_init, run_ais, run_refined, run_stage, stage_label, stage_names
from gapbench.gaps_files import EvalSummary, jsonable, load_batch, write_gaps_files
from gapbench.io import read_json_or_none, remove_stale_temporaries, save_torch, write_json
from gapbench.lock import command_line, folder_lock
from gapbench.recipe import MODEL_DIAGNOSTICS, Recipe
from gapbench.scale import SINGLE, RankFailed, Workers

log = logging.getLogger(__name__)

# AIS at fewer intermediate distributions, on a few points, for the convergence figure; 0.5 and
# 1.0 give the change of the estimate over the last doubling of steps, the convergence check.
AIS_SWEEP_FRACTIONS = (0.01, 0.03, 0.1, 0.3, 0.5, 1.0)
AIS_SWEEP_POINTS = 20

# Settings of the diagnostics stage that recipes leave fixed (they enter its key): the active-unit
# threshold of Burda et al. (2016); samples of z per point for I(x; z) and for the decoder's Jacobian;
# a singular value under 1e-3 of the largest counts as unused; IWAE_k averaged over >= 1000 samples per k.
DIAGNOSTIC_SETTINGS = {
    "active_units": {"threshold": 0.01, "num_samples": 1000},
    "mutual_information": {"num_samples": 10},
    "jacobian": {"num_samples": 1, "relative_threshold": 1e-3},
    "iwae_curve": {"min_samples_per_k": 1000},
}

# How long an array shard waits for another shard's brief hold of the run folder (setting up, assembling).
SHARD_LOCK_WAIT = 600.0


def _check_overrides(overrides: Sequence[str]) -> None:
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if not (key.startswith("evaluate.") or key in ("device", "num_threads")):
            raise GapbenchError(
                f"--set {key}: only evaluate.* settings (and device, num_threads) can change after training; "
                "retrain with the recipe changed instead"
            )


def select_points(num_available: int, num_points: int, seed: int, split: str) -> torch.Tensor:
    """The first ``num_points`` of a permutation seeded by (seed, split), sorted."""
    if num_points > num_available:
        raise GapbenchError(
            f"evaluate.num_points: the {split} split has {num_available} datapoints; ask for at most {num_available}"
        )
    salt = {"train": 1, "valid": 2, "test": 3}[split]
    perm = torch.randperm(num_available, generator=torch.Generator().manual_seed(seed * 7919 + salt))
    return perm[:num_points].sort().values


def _stage_seed(seed: int, stage: str, batch: int) -> int:
    digest = hashlib.sha256(f"{seed}/{stage}/{batch}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


@dataclasses.dataclass
class _Plan:
    """One evaluation, resolved: what to compute, where its batches go and what they depend on."""

    run: object
    recipe: Recipe
    dev: torch.device
    x_all: torch.Tensor
    idx: torch.Tensor
    model: object
    refines: bool
    labels: Optional[torch.Tensor]  # class labels of the chosen points [len(idx)], or None
    stages: List[str]
    families: List[str]
    all_stages: List[str]
    stage_settings: Dict[str, Dict]
    keys: Dict[str, str]
    context: Dict
    fingerprint: str
    batches: List[torch.Tensor]

    @property
    def cfg(self):
        return self.recipe.evaluate

    @property
    def gaps_dir(self) -> Path:
        return self.run.gaps_dir  # gaps/, or gaps/epoch_<E>/ for kept weights

    @property
    def partial(self) -> Path:
        return self.gaps_dir / ".partial" / self.cfg.split

    @property
    def stamp(self) -> Path:
        return self.partial / "settings.json"

    @property
    def final(self) -> Path:
        return self.gaps_dir / f"{self.cfg.split}.json"

    def part(self, stage: str, b: int) -> Path:
        return self.partial / f"{stage}-{self.keys[stage]}-{b:04d}.pt"

    def num_batches(self, stage: str) -> int:
        return 1 if stage in ONE_UNIT_STAGES else len(self.batches)

    def missing(self) -> List[tuple]:
        """The (stage, batch) pairs whose results are not on disk."""
        return [(s, b) for s in self.all_stages for b in range(self.num_batches(s)) if not self.part(s, b).exists()]

    def write_stamp(self, stages_saved: Dict, workers: Workers) -> None:
        write_json(self.stamp, {"fingerprint": self.fingerprint, "context": self.context, "points": self.idx.tolist(),
                                "stages": stages_saved,
                                "layout": {"kind": workers.kind, "world_size": workers.world_size}})


def evaluate_run(
    run_dir,
    overrides: Sequence[str] = (),
    device: Optional[str] = None,
    resume: bool = False,
    callback: Optional[Callable[[str, float, int], None]] = None,
    settings_from: Optional[Recipe] = None,
    restart: bool = False,
    refresh_report: bool = True,
    workers: Optional[Workers] = None,
    merge: bool = False,
    checkpoint: Optional[int] = None,
) -> EvalSummary:
    """Decompose the gaps of a trained run; ``callback(stage_label, batches_done, num_batches)`` reports progress.

    The evaluation settings are the run's recipe.yaml with ``overrides``, or, when
    ``settings_from`` is given (``gapbench run``), that recipe's evaluate section,
    device and thread count.

    ``resume``: keep finished batches (and a finished evaluation) whose provenance
    matches (see :mod:`gapbench.provenance`); anything that does not match is
    recomputed, with one warning saying what changed. Without ``resume``, finished
    batches of an interrupted evaluation are an error unless ``restart`` discards them.
    ``refresh_report``: rebuild the run's report/ (when there is one) from the new gaps.

    ``workers`` (:mod:`gapbench.scale`; default one process): this process's share of
    the batches. torchrun ranks split the batches and rank 0 writes the gaps files
    once all have finished; an array shard computes its share (always keeping
    matching finished batches, which are the other shards' work) and the last shard
    to finish writes them. ``merge``: compute nothing, write the gaps files from the
    finished batches, or fail naming the missing ones. ``checkpoint``: evaluate the weights
    kept at that epoch (train.keep_checkpoints) into gaps/epoch_<E>/ instead of checkpoint.pt.
    """
    workers = workers or SINGLE
    if merge and workers.kind != "single":
        raise GapbenchError("--merge assembles what the shards wrote; run it as one process, without --shard")
    group = None
    if workers.distributed:
        from gapbench.scale import team

        group = team(workers, resolve_device(device or _device_setting(run_dir, overrides, settings_from)).type)
    try:
        return _evaluate(run_dir, overrides, device, resume, callback, settings_from, restart, refresh_report,
                         workers, merge, group, checkpoint)
    except BaseException as exc:
        if group is not None and not isinstance(exc, RankFailed):
            group.fail(str(exc) or type(exc).__name__)
        raise


def _device_setting(run_dir, overrides, settings_from) -> Optional[str]:
    """The device the evaluation will ask for: read from the recipe alone (the checkpoint is loaded once, later)."""
    from gapbench.experiment import RECIPE_FILE
    from gapbench.recipe import load_recipe

    if settings_from is not None:
        return settings_from.device
    recipe_file = Path(run_dir) / RECIPE_FILE
    if not recipe_file.is_file():
        return None  # _plan reports what is wrong with the folder
    return load_recipe(recipe_file, overrides).device


def _plan(run_dir, overrides, device, settings_from, workers: Workers, checkpoint: Optional[int] = None) -> _Plan:
    from gapbench import provenance as prov
    from gapbench.methods import get_method, method_name
    from gapbench.preflight import check_memory
    from gapbench.scale import rank_device

    _check_overrides(overrides)
    run = open_run(run_dir, overrides, checkpoint)
    if settings_from is not None:
        run.recipe = dataclasses.replace(
            run.recipe,
            evaluate=settings_from.evaluate,
            device=settings_from.device,
            num_threads=settings_from.num_threads,
        )
    else:
        _warn_if_older_recipe(run.path, run.recipe, overrides)
    recipe = run.recipe
    cfg = recipe.evaluate
    dev = rank_device(workers, resolve_device(device or recipe.device))
    inputs = load_inputs(recipe)
    configure_threads(recipe)
    x_all = evaluation_split(inputs, recipe, cfg.split)
    idx = select_points(x_all.shape[0], cfg.num_points, recipe.seed, cfg.split)
    labels = inputs.labels(cfg.split)
    if labels is not None and labels.shape[0] != x_all.shape[0]:
        raise GapbenchError(f"the {cfg.split} split of {recipe.data.dataset} has {x_all.shape[0]} images but "
                            f"{labels.shape[0]} labels; its files are damaged: get the dataset again")
    check_memory(recipe, inputs, dev)
    model = load_trained_model(run, inputs, dev)
    refines = bool(getattr(get_method(method_name(recipe.train)), "refines", False))
    # What every result depends on besides its stage's settings: the checkpoint, the data
    # selection, the seed and batching, the code and the device (see gapbench.provenance).
    context = prov.evaluation_context(run, recipe, idx, x_all[idx], dev)
    return plan_from_parts(run, recipe, dev, x_all, idx, model, refines,
                           None if labels is None else labels[idx], context)


def plan_from_parts(run, recipe: Recipe, dev: torch.device, x_all: torch.Tensor, idx: torch.Tensor, model,
                    refines: bool, labels: Optional[torch.Tensor], context: Dict) -> _Plan:
    """The plan of evaluating ``model`` on the points ``idx`` of ``x_all`` with ``recipe``'s settings.

    ``run``: where the results go (``gaps_dir``, ``path``, ``epoch``, ``checkpoint``); ``context``:
    everything the numbers depend on besides each stage's settings (its fingerprint decides reuse).
    """
    from gapbench import provenance as prov

    cfg = recipe.evaluate
    stages = stage_names(cfg, recipe.model.encoder, refines=refines)
    families = [s.split("_", 1)[1] for s in stages if s.startswith("local_")]
    all_stages = stages + (["ais_sweep"] if cfg.ais.enabled else [])
    all_stages += ["diagnostics"] if _model_diagnostics(cfg) else []
    stage_settings = {stage: _stage_settings(stage, cfg, recipe.train) for stage in all_stages}
    keys = {stage: prov.fingerprint({"stage": stage, **stage_settings[stage]})[:8] for stage in all_stages}
    batches = [idx[i : i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
    return _Plan(run=run, recipe=recipe, dev=dev, x_all=x_all, idx=idx, model=model, refines=refines,
                 labels=labels, stages=stages, families=families,
                 all_stages=all_stages, stage_settings=stage_settings, keys=keys, context=context,
                 fingerprint=prov.fingerprint(context), batches=batches)


def _warn_if_older_recipe(run_path: Path, recipe: Recipe, overrides: Sequence[str]) -> None:
    """Warn when the run's recipe.yaml lacks evaluate keys that this version writes.

    A resolved recipe spells out every setting, so one written by an older gapbench keeps
    that version's defaults for the keys it has, while the keys it lacks take today's:
    a mix that neither version would choose. ``--recipe`` (or ``gapbench run``) avoids it.
    """
    import yaml

    from gapbench.experiment import RECIPE_FILE
    from gapbench.recipe import _to_plain

    try:
        saved = yaml.safe_load((run_path / RECIPE_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return
    given = [text.split("=", 1)[0].strip() for text in overrides]
    have = set(_dotted(saved.get("evaluate") or {}, "evaluate."))
    missing = [k for k in _dotted(_to_plain(recipe.evaluate), "evaluate.")
               if k not in have and not any(k == g or k.startswith(g + ".") for g in given)]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        log.warning("%s/%s was written by an older gapbench: it lacks %s (these take today's defaults) while its "
                    "other evaluate settings are that version's defaults; to evaluate with a current recipe's "
                    "settings, pass --recipe RECIPE", run_path, RECIPE_FILE, shown)


def _dotted(tree: Dict, prefix: str) -> List[str]:
    """The leaf keys of a nested dict, dotted: {"local": {"lr": 1}} -> ["local.lr"]."""
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            keys += _dotted(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _evaluate(run_dir, overrides, device, resume, callback, settings_from, restart, refresh_report,
              workers: Workers, merge: bool, group, checkpoint: Optional[int] = None) -> EvalSummary:
    plan = _plan(run_dir, overrides, device, settings_from, workers, checkpoint)
    cfg = plan.cfg
    path = plan.gaps_dir / f"{cfg.split}.csv"
    started = time.time()

    if merge:
        with folder_lock(plan.run.path, command_line()):
            return _merge(plan, refresh_report)

    if workers.sharded:
        # Shards share the folder: each holds its lock only while it sets up or assembles.
        with folder_lock(plan.run.path, command_line(), wait=SHARD_LOCK_WAIT):
            done = _setup(plan, resume=True, restart=False, workers=workers)
        if done is not None:
            return done
        _compute(plan, workers, callback, None)
        with folder_lock(plan.run.path, command_line(), wait=SHARD_LOCK_WAIT):
            done = _finished_evaluation(plan.final, plan.fingerprint, plan.keys)
            if done is not None:  # another shard, finishing at the same time, assembled it
                return EvalSummary(path=path, split=cfg.split, summary=done, reused=False)
            missing = plan.missing()
            if missing:
                return EvalSummary(path=path, split=cfg.split, summary={}, reused=False,
                                   waiting=_describe_missing(plan, missing, workers))
            return _assemble(plan, workers, refresh_report, started)

    if group is None:  # one process
        with folder_lock(plan.run.path, command_line()):
            done = _setup(plan, resume, restart, workers)
            if done is not None:
                return done
            _compute(plan, workers, callback, None)
            return _assemble(plan, workers, refresh_report, started)

    # torchrun ranks: rank 0 holds the folder and sets up; every rank computes its share;
    # rank 0 assembles once all have posted theirs.
    prepared, done_phase, written = group.phase("eval-prepared"), group.phase("eval-done"), group.phase("eval-written")
    if workers.is_main:
        with folder_lock(plan.run.path, command_line()):
            done = _setup(plan, resume, restart, workers)
            group.post(prepared, "reused" if done is not None else "ok")
            if done is not None:
                return done
            _compute(plan, workers, callback, group)
            group.post(done_phase)
            group.gather(done_phase, what="computing its share of the batches")
            summary = _assemble(plan, workers, refresh_report, started)
            group.post(written)
            return summary
    state = group.gather(prepared, ranks=[0], what="setting up the evaluation")[0]
    if state == "ok":
        _compute(plan, workers, callback, group)
        group.post(done_phase)
        group.gather(written, ranks=[0], what="writing the gaps files")
    done = _finished_evaluation(plan.final, plan.fingerprint, plan.keys)
    if done is None:
        raise GapbenchError(f"{plan.final} is missing or from other inputs after rank 0 wrote it: the run folder "
                            "must be on a file system that every rank sees")
    return EvalSummary(path=path, split=cfg.split, summary=done, reused=state != "ok")


def _setup(plan: _Plan, resume: bool, restart: bool, workers: Workers) -> Optional[EvalSummary]:
    """Check the finished work against the inputs: the finished evaluation when it can be reused, else None.

    Drops batches made from other inputs or settings (saying what changed) and
    writes the stamp naming the stages the gaps file will be made from.
    """
    from gapbench import provenance as prov

    cfg, partial = plan.cfg, plan.partial
    if resume and not restart:
        done = _finished_evaluation(plan.final, plan.fingerprint, plan.keys)
        # Settings that no stage depends on (the AIS tolerance, compiling) leave every batch valid,
        # but the summary judged by them is made again from those batches below.
        if done is not None and done.get("settings") == jsonable(dataclasses.asdict(cfg)):
            return EvalSummary(path=plan.gaps_dir / f"{cfg.split}.csv", split=cfg.split, summary=done, reused=True)
    saved = read_json_or_none(plan.stamp)
    # A kill during an atomic write leaves its temporary behind; nothing reads it, so clear it.
    remove_stale_temporaries(partial)
    finished = sorted(partial.glob("*.pt")) if partial.is_dir() else []
    if partial.exists() and (saved is None or saved.get("fingerprint") != plan.fingerprint):
        if finished:
            why = prov.describe(saved.get("context", {}), plan.context) if saved else "an unreadable settings.json"
            log.warning("discarding %d finished batches in %s, made with other inputs (%s); "
                        "recomputing", len(finished), partial, why)
        shutil.rmtree(partial)
        saved, finished = None, []
    elif finished and not resume:
        # Without --resume everything is recomputed; but batches that an interrupted evaluation
        # left (ones no gaps file was made from) cost time to redo, so they are never dropped silently.
        reusable = [f for f in finished if f.name.split("-")[1] in plan.keys.values()]
        made_final = saved is not None and _finished_evaluation(
            plan.final, saved.get("fingerprint"), {s: v.get("key") for s, v in saved.get("stages", {}).items()})
        if reusable and not restart and not made_final:
            raise GapbenchError(
                f"{partial} holds {len(reusable)} finished batches of an interrupted evaluation of these inputs: "
                "pass --resume to keep them, or --restart to discard them and start over"
            )
        shutil.rmtree(partial)
        saved, finished = None, []
    stages_saved = dict((saved or {}).get("stages", {}))
    for stage in plan.all_stages:
        # This stage's batches made with other settings: say what changed, then drop them.
        stale = [f for f in partial.glob(f"{stage}-*.pt") if f.name.split("-")[1] != plan.keys[stage]] \
            if partial.is_dir() else []
        if stale:
            label = _label(stage)
            before = stages_saved.get(stage, {}).get("settings", {})
            log.warning("%s settings changed (%s); recomputing %s",
                        label, prov.describe(before, plan.stage_settings[stage]), label)
            for f in stale:
                f.unlink()
    # The stamp describes exactly the stages the gaps file is made from (an interrupted evaluation
    # is one whose stamp no gaps file matches).
    plan.write_stamp({s: {"key": plan.keys[s], "settings": plan.stage_settings[s]} for s in plan.all_stages}, workers)
    return None


# Stages of one unit of work on the whole selection rather than per batch.
ONE_UNIT_STAGES = ("ais_sweep", "diagnostics")


def _compute(plan: _Plan, workers: Workers, callback, group) -> None:
    """This worker's share of every stage's batches, each saved as soon as it is done.

    Stages run in order (a batch's flow and AIS may start from its FFG fit, on this same
    worker); a torchrun rank checks between batches whether another rank has failed.
    Under torchrun a one-unit stage (the AIS sweep, the diagnostics) goes to whichever
    rank finishes its share first; otherwise to worker 0.
    """
    state: Dict = {}  # the training method, built when the refined stage first needs it
    deferred = [s for s in plan.all_stages if group is not None and s in ONE_UNIT_STAGES]
    for stage in plan.all_stages:
        if stage not in deferred:
            _run_units(plan, stage, workers.share(plan.num_batches(stage)), workers, callback, group, state)
    for stage in deferred:
        claim = group.phase(f"claim-{stage}")  # every rank names it, in the same order
        if plan.part(stage, 0).exists() or not group.claim(claim):
            continue
        # The sweep starts at batch 0's FFG fit and takes its longest run from batch 0's AIS, both
        # by the rank that owns batch 0.
        needs = [plan.part(s, 0) for s in ("local_ffg", "ais") if stage == "ais_sweep" and s in plan.keys]
        while not all(p.exists() for p in needs):
            group.check()
            time.sleep(0.5)
        _run_units(plan, stage, [0], workers, callback, group, state)


def _run_units(plan: _Plan, stage: str, mine: List[int], workers: Workers, callback, group, state: Dict) -> None:
    """Compute and save the units ``mine`` of ``stage`` that are not on disk yet."""
    from gapbench import provenance as prov
    from gapbench.methods import build_method

    cfg, model, x_all, dev, part = plan.cfg, plan.model, plan.x_all, plan.dev, plan.part
    label = _label(stage)
    todo = [b for b in mine if not part(stage, b).exists()]
    if callback and mine:
        callback(label, len(mine) - len(todo), len(mine))
    for i, b in enumerate(todo):
        if group is not None:
            group.check()
        started = time.time()
        finished = len(mine) - len(todo) + i

        def progress(done, total, label=label, finished=finished, num_batches=len(mine)):
            if callback and total:
                callback(label, finished + min(done / total, 1.0), num_batches)

        seed = _stage_seed(plan.recipe.seed, stage, b)
        ffg_part = part("local_ffg", b) if "local_ffg" in plan.keys else None
        if stage == "ais_sweep":
            xb = x_all[plan.batches[0][:AIS_SWEEP_POINTS]].to(dev)
            init = _ais_start(cfg, model, xb, ffg_part)
            full = _main_ais(part("ais", 0), xb.shape[0])
            result = {"columns": {}, "traces": _ais_sweep(model, xb, cfg, seed, init, progress, full)}
        elif stage == "diagnostics":
            xb = x_all[plan.idx].to(dev)  # every evaluated point: a spread over x, an aggregate posterior
            summaries, per_point = _diagnostics(model, xb, cfg, seed, progress)
            result = {"columns": {}, "traces": {}, "diagnostics": summaries, "per_point": per_point}
        elif stage == "refined":
            xb = x_all[plan.batches[b]].to(dev)
            if "method" not in state:
                state["method"] = build_method(model, plan.recipe.train)
            torch.manual_seed(seed)  # as every stage: the refinement may draw samples
            cols, family = run_refined(state["method"], model, xb, cfg)
            progress(1, 1)
            result = {"columns": {k: v.detach().double().cpu() for k, v in cols.items()}, "traces": {},
                      "refined_family": family}
        else:
            xb = x_all[plan.batches[b]].to(dev)
            fam_kwargs, init = None, None
            if stage.startswith("local_"):
                family = stage.split("_", 1)[1]
                fam_kwargs = local_family_kwargs(family, cfg, plan.recipe.model)
                init = _local_start(local_init(family, cfg), model, xb, ffg_part)
            elif stage == "ais":
                init = _ais_start(cfg, model, xb, ffg_part)
            cols, traces = run_stage(stage, model, xb, cfg, seed, fam_kwargs, init, progress_fn=progress)
            result = {
                "columns": {k: v.detach().double().cpu() for k, v in cols.items()},
                "traces": {k: v.detach().cpu() for k, v in traces.items()},
            }
        result["seconds"] = time.time() - started  # this batch alone; the summary adds them up
        result["provenance"] = {**prov.with_recorded(plan.context, plan.run, dev), "fingerprint": plan.fingerprint,
                                "stage": stage, "stage_key": plan.keys[stage],
                                "settings": plan.stage_settings[stage], "worker": workers.label()}
        save_torch(part(stage, b), result)
        if callback:
            callback(label, finished + 1, len(mine))


def _assemble(plan: _Plan, workers: Workers, refresh_report: bool, started: float) -> EvalSummary:
    """Write gaps/<split>.csv and .json from every finished batch (all must be there)."""
    from gapbench import provenance as prov

    missing = plan.missing()
    if missing:
        raise GapbenchError(_describe_missing(plan, missing, workers) + "; the run folder must be on a file system "
                            "that every process sees")
    stages_saved = {s: {"key": plan.keys[s], "settings": plan.stage_settings[s]} for s in plan.all_stages}
    layout = {"kind": workers.kind, "world_size": workers.world_size, "wall_seconds": round(time.time() - started, 3)}
    summary = write_gaps_files(plan.run, plan.cfg, plan.recipe, plan.idx, plan.batches, plan.stages, plan.families,
                               plan.recipe.model.encoder, plan.part, plan.dev,
                               labels=None if plan.labels is None else plan.labels.numpy(),
                               provenance={**prov.with_recorded(plan.context, plan.run, plan.dev),
                                           "fingerprint": plan.fingerprint, "stages": stages_saved, "layout": layout})
    if refresh_report and plan.run.epoch is None:  # the run's report shows the final model's gaps
        _refresh_report(plan.run.path, plan.cfg.split)
    return summary


def _merge(plan: _Plan, refresh_report: bool) -> EvalSummary:
    """``--merge``: the gaps files from the shards' finished batches, or an error naming the missing ones."""
    from gapbench import provenance as prov

    saved = read_json_or_none(plan.stamp)
    if saved is None:
        raise GapbenchError(f"{plan.partial} holds no shards' batches for these inputs: run the shards first "
                            f"(gapbench evaluate-gaps {plan.run.path} --shard I/N)")
    if saved.get("fingerprint") != plan.fingerprint:
        raise GapbenchError(
            f"the batches in {plan.partial} were made from other inputs ({prov.describe(saved.get('context', {}), plan.context)}); "
            "rerun the shards with these inputs")
    layout = saved.get("layout") or {}
    workers = Workers(world_size=int(layout.get("world_size", 1)), kind=layout.get("kind", "shard"))
    missing = plan.missing()
    if missing:
        raise GapbenchError(_describe_missing(plan, missing, workers) + ": rerun those shards, then --merge again")
    done = _finished_evaluation(plan.final, plan.fingerprint, plan.keys)
    if done is not None:
        return EvalSummary(path=plan.gaps_dir / f"{plan.cfg.split}.csv", split=plan.cfg.split, summary=done,
                           reused=True)
    return _assemble(plan, workers, refresh_report, time.time())


def _describe_missing(plan: _Plan, missing: List[tuple], workers: Workers) -> str:
    """'missing batches 1, 3 (local flow 2, AIS 2; shard 1/2)': which batches, of which stages and workers."""
    batches = sorted({b for _, b in missing})
    per_stage = {}
    for s, b in missing:
        per_stage.setdefault(s, []).append(b)
    stages = "; ".join(f"{s}: {len(bs)}" for s, bs in per_stage.items())
    owners = ""
    if workers.world_size > 1:
        who = sorted({workers.owner(b) for b in batches})
        owners = f", from {', '.join(workers.label(r) for r in who)}"
    shown = ", ".join(str(b) for b in batches[:12]) + (f" and {len(batches) - 12} more" if len(batches) > 12 else "")
    return (f"{plan.partial}: {len(missing)} of {sum(plan.num_batches(s) for s in plan.all_stages)} stage batches "
            f"missing, batches {shown} of {len(plan.batches)} ({stages}{owners})")


def _finished_evaluation(final: Path, fingerprint: str, keys: Dict[str, str]) -> Optional[Dict]:
    """The summary in gaps/<split>.json when it (and its CSV) were made from exactly these inputs and settings."""
    summary = read_json_or_none(final) if final.with_suffix(".csv").is_file() else None
    if not isinstance(summary, dict):
        return None
    p = summary.get("provenance") or {}
    made = {s: v.get("key") for s, v in (p.get("stages") or {}).items()}
    if p.get("fingerprint") != fingerprint or made != keys:
        return None
    return summary


def _refresh_report(run_path: Path, split: str) -> None:
    """Rebuild the run's own report/ when it exists, so it never shows an older evaluation."""
    from gapbench.report import rebuild_report

    out = run_path / "report"
    if out.is_dir() and any(out.iterdir()):
        rebuild_report(out, default_runs=[run_path], default_split=split)


def _label(stage: str) -> str:
    """A stage's name in progress bars and warnings."""
    return {"ais_sweep": "AIS convergence sweep", "diagnostics": "diagnostics"}.get(stage) or stage_label(stage)


def _model_diagnostics(cfg) -> List[str]:
    """The diagnostics of the stage "diagnostics" that ``cfg`` asks for, in a fixed order."""
    return [name for name in MODEL_DIAGNOSTICS if name in cfg.diagnostics]


def _stage_settings(stage: str, cfg, train_cfg=None) -> Dict:
    """The settings a stage's results depend on (its key is a hash of them).

    The refined stage depends on what its training method is built from: the method, its own
    section of the train settings (``train.<method>``) and the train section's plain keys.
    The diagnostics stage depends on which diagnostics it computes and their settings.
    """
    if stage == "diagnostics":
        names = _model_diagnostics(cfg)
        settings = {name: dict(DIAGNOSTIC_SETTINGS[name]) for name in names}
        if "iwae_curve" in settings:
            settings["iwae_curve"].update(ks=list(cfg.diagnostic_ks), elbo_samples=cfg.elbo_samples)
        return {"diagnostics": names, "settings": settings}
    if stage == "amortized":
        return {"elbo_samples": cfg.elbo_samples}
    if stage == "refined":
        from gapbench.methods import method_name, method_settings

        section = method_settings(train_cfg)
        plain = {f.name: getattr(train_cfg, f.name) for f in dataclasses.fields(train_cfg)
                 if not dataclasses.is_dataclass(getattr(train_cfg, f.name)) and f.name != "keep_checkpoints"}
        return {"elbo_samples": cfg.elbo_samples, "method": method_name(train_cfg),
                "settings": None if section is None else jsonable(dataclasses.asdict(section)),
                "train": jsonable(plain)}
    if stage == "iwae":
        return {"iwae_samples": cfg.iwae_samples}
    if stage in ("ais", "ais_sweep"):
        relevant = dataclasses.asdict(cfg.ais)
        # Speed and reporting only: compiled and eager AIS give the same estimates, and the
        # tolerance only decides whether to warn.
        relevant.pop("compile", None)
        relevant.pop("convergence_tolerance", None)
        if cfg.ais.init == "ffg":  # AIS then starts at q*_FFG, which depends on the local settings
            relevant["local"] = dataclasses.asdict(cfg.local)
        if stage == "ais_sweep":
            relevant["grid"] = _sweep_grid(cfg.ais.num_steps)
            relevant["num_points"] = AIS_SWEEP_POINTS
        return relevant
    # local fits; a flow started at q*_FFG depends on the FFG fit's settings too
    return dataclasses.asdict(cfg.local)


def _diagnostics(model, x, cfg, seed: int, progress_fn=None):
    """The model diagnostics ``cfg`` asks for on x [N, ...]: (summaries as plain numbers, per-point tensors).

    Each diagnostic draws from its own seed, derived from ``seed`` and its name, so its numbers do not
    depend on which others are computed. ``progress_fn(done, total)`` counts diagnostics.
    """
    from gapbench import diagnostics as diag

    names = _model_diagnostics(cfg)
    summaries: Dict[str, Dict] = {}
    per_point: Dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        own_seed = _stage_seed(seed, name, 0)
        settings = DIAGNOSTIC_SETTINGS[name]
        if name == "active_units":
            res = diag.active_units(model, x, threshold=settings["threshold"], num_samples=settings["num_samples"],
                                    seed=own_seed)
            summaries[name] = {**res.to_dict(), "latent_dim": int(res.activity.numel())}
        elif name == "mutual_information":
            res = diag.mutual_information(model, x, num_samples=settings["num_samples"], seed=own_seed)
            summaries[name] = res.to_dict()
            per_point["mutual_information"] = res.per_point.cpu()
        elif name == "jacobian":
            res = diag.decoder_jacobian_spectrum(model, x, num_samples=settings["num_samples"],
                                                 relative_threshold=settings["relative_threshold"], seed=own_seed)
            summaries[name] = {**res.to_dict(), "latent_dim": int(res.singular_values.shape[-1]),
                               "num_points": int(x.shape[0])}
            per_point["jacobian_num_used"] = res.num_used.cpu()  # [S, N]
        else:  # iwae_curve
            res = diag.iwae_gap_curve(model, x, ks=cfg.diagnostic_ks, num_elbo_samples=cfg.elbo_samples,
                                      min_samples_per_k=settings["min_samples_per_k"], seed=own_seed)
            summaries[name] = res.to_dict()
            per_point["iwae_curve_gap"] = res.gap.cpu()  # [K, N]
        if progress_fn is not None:
            progress_fn(i + 1, len(names))
    return summaries, per_point


def _sweep_grid(num_steps: int) -> List[int]:
    return sorted({max(2, int(round(num_steps * f))) for f in AIS_SWEEP_FRACTIONS})


def _sweep_runs(num_steps: int) -> List[int]:
    """The AIS runs the sweep makes itself: its grid but the last entry, the recipe's num_steps, which
    is the evaluation's own AIS of the same points."""
    return _sweep_grid(num_steps)[:-1]


def _local_start(where: str, model, x, ffg_part: Optional[Path]):
    """The posterior a local fit starts from: None (prior), the encoder's q, or this batch's FFG q*."""
    if where == "prior":
        return None
    if where == "encoder":
        with torch.no_grad():
            return model.posterior(x).detach()
    return _fitted_ffg(model, ffg_part, x.shape[0], x.device)


def _ais_start(cfg, model, x, ffg_part: Optional[Path]):
    """This batch's fitted q*_FFG (its first len(x) points) when AIS starts there, else None."""
    return _fitted_ffg(model, ffg_part, x.shape[0], x.device) if cfg.ais.init == "ffg" else None


def _fitted_ffg(model, ffg_part: Path, num_points: int, device):
    """q*_FFG of the first ``num_points`` datapoints of a batch, from its saved local FFG fit."""
    from gapbench.models.posterior import DiagonalGaussian

    traces = load_batch(ffg_part)["traces"]
    params = {
        "mean": traces["ffg_mean"][:num_points].to(device),
        "log_var": traces["ffg_log_var"][:num_points].to(device),
    }
    return DiagonalGaussian(model.latent_dim).posterior(params)


def _main_ais(ais_part: Path, num_points: int) -> Optional[torch.Tensor]:
    """The evaluation's own AIS estimates [n] of the first ``num_points`` points of batch 0, or None
    when that batch is not on disk (the sweep then runs the recipe's num_steps itself)."""
    if not ais_part.exists():
        return None
    return load_batch(ais_part)["columns"]["ais"][:num_points].double()


def _ais_sweep(model, x, cfg, seed, init=None, progress_fn=None, full=None) -> Dict[str, torch.Tensor]:
    """AIS log p̂(x) at a grid of num_steps on a few points: [len(grid)] steps and [len(grid), n] estimates.

    ``full``: the evaluation's own AIS estimates [n] of these points at the recipe's num_steps (the
    grid's last entry), from its own chains: that run is then not repeated (it is half the grid's
    transitions), and the sweep's last doubling compares two independent runs as before.
    ``progress_fn(done, total)`` counts transitions over the runs the sweep makes.
    """
    grid = _sweep_grid(cfg.ais.num_steps)
    todo = _sweep_runs(cfg.ais.num_steps) if full is not None else grid
    total, values = sum(todo), []
    for i, steps in enumerate(todo):
        before = sum(todo[:i])

        def forward(done, of, before=before, steps=steps):
            if progress_fn is not None and of:
                progress_fn(before + steps * done / of, total)

        res = run_ais(model, x, cfg, seed, num_steps=steps, init=init, progress_fn=forward)
        values.append(res.log_px.detach().double().cpu())
    if full is not None:
        values.append(full.cpu())
    return {"steps": torch.tensor(grid), "log_px": torch.stack(values)}


