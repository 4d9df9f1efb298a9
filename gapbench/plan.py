"""gapbench plan: what ``gapbench run RECIPE`` would do, and how long each stage would take on this machine.

The estimate comes from a calibration of a few seconds: the recipe's model, at random
initialization (a trained model costs the same per step), runs a few steps of each
piece of work at the recipe's own sizes, and each stage's cost is extrapolated:

    training      seconds per step x steps per epoch x epochs, + validations, checkpoints, the test ELBO
    L[q], IWAE    seconds per sample for a batch x samples x batches
    local fits    seconds per step of m active points, c(m) = c(n) (m / n)^p, through timings on
                  n / 4 and n points; a batch runs all n points for L steps, then empties at an even
                  pace until its slowest point stops at S: L c(n) + (S - L) c(n) / (p + 1), with
                  L = 2 x (mean steps) - S, so that the points' mean is the typical one
    AIS           seconds per transition of a batch's chains x num_steps x batches
    AIS sweep     seconds per transition on its points, c(m), x the sum of its grid of num_steps
    diagnostics   timed on a few points and scaled to the evaluated ones

A local fit stops when its own stopping rule fires, which cannot be known before it
runs: its estimate takes the step counts that committed evaluations saw
(:data:`TYPICAL_CHECKS`), and its bound takes every point to ``max_steps``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from gapbench.errors import GapbenchError
from gapbench.recipe import Recipe

#: Seconds each timed piece of work runs for (after a warm-up call): long enough to average over
#: scheduler noise, short enough that a plan's calibration takes a few seconds.
CALIBRATION_BUDGET = 0.25

#: Checks of a local fit's stopping rule (each ``check_every`` steps) that a point takes, typically
#: (mean over points) and for the slowest point of a batch (mean over batches), at patience 5,
#: by family: what the committed evaluations of results/ saw with the fast procedure (steps from
#: the encoder's q, flows from q*_FFG). FFG: Fashion-MNIST 8.9 and 14 (test), 8.7 and 12.5 (train),
#: digits 7.9 to 9.1 and 13 to 17. Flow: Fashion-MNIST 30 and 36 (ffg encoder), 33 and 40 (flow
#: encoder), digits 17 and 21. Other patiences scale them by (patience + 1) / 6.
TYPICAL_CHECKS = {"ffg": (9.0, 14.0), "flow": (30.0, 36.0), "realnvp": (30.0, 36.0)}
TYPICAL_PATIENCE = 5

#: Epochs that aggressive training (train.method aggressive) stays aggressive, typically: the
#: committed digits run took 10.5 s for 60 epochs; at this plan's costs per epoch on the same
#: 2-core CPU (0.065 s plain, about 1.4 s aggressive), about 5 of them were aggressive.
AGGRESSIVE_EPOCHS = 5

#: Points the diagnostics are timed on; the mutual information (all pairs of points) is timed on
#: twice as many too, to see how it grows.
DIAGNOSTIC_POINTS = 8


@dataclass
class StageEstimate:
    """One stage of ``gapbench run``: what it computes and how long it would take here.

    ``seconds``: the estimate for the work that would run (0 when all of it is reused).
    ``upper``: at most this, where the work is unknown before running (local fits: every
    point to max_steps); None where the estimate is the whole story.
    """

    stage: str
    label: str
    work: str
    seconds: float
    upper: Optional[float] = None
    reused: str = ""  # what is reused instead of computed ("" = nothing)


@dataclass
class RunPlan:
    """What ``gapbench run`` would do with a recipe and a run folder, with time estimates."""

    recipe: Recipe
    run_dir: Path
    device: torch.device
    num_threads: int
    data: str
    summary: List[Tuple[str, str]]  # (section, one line) of the resolved recipe
    actions: List[Tuple[str, str]]  # (stage, what gapbench run would do)
    stages: List[StageEstimate]
    notes: List[str] = field(default_factory=list)
    calibration_seconds: float = 0.0
    stops: Optional[str] = None  # why gapbench run would stop before finishing, or None

    def total(self) -> Tuple[float, float]:
        """(estimate, upper bound) of everything that would run, in seconds."""
        est = sum(s.seconds for s in self.stages)
        return est, sum(s.seconds if s.upper is None else s.upper for s in self.stages)

    def text(self, full: bool = False) -> str:
        """The plan as the ``plan`` command prints it; ``full``: the whole resolved recipe."""
        lines = []
        if full:
            lines += ["# resolved recipe (every default filled in)", self.recipe.to_yaml().rstrip(), ""]
        else:
            width = max(len(k) for k, _ in self.summary)
            lines += [f"{k:<{width}}  {v}" for k, v in self.summary]
            lines += ["(--full prints the whole resolved recipe)", ""]
        lines.append(f"gapbench run would, in {self.run_dir}:")
        width = max(len(k) for k, _ in self.actions)
        lines += [f"  {k:<{width}}  {v}" for k, v in self.actions]
        if self.stops:
            lines.append(f"  and stop: {self.stops}")
        lines.append("")
        if self.stages:
            lines += self._table()
        else:
            lines.append("no time estimate: a run that would stop is not timed")
        lines.append("")
        lines += [f"* {n}" for n in self.notes]
        return "\n".join(lines)

    def _table(self) -> List[str]:
        rows = [("stage", "work", "estimate", "at most")]
        for s in self.stages:
            est = duration(s.seconds) if s.seconds > 0 or not s.reused else "reused"
            work = s.work + (f" ({s.reused})" if s.reused else "")
            rows.append((s.label, work, est, "" if s.upper is None else duration(s.upper)))
        est, upper = self.total()
        rows.append(("total", f"on {self.device.type}, {self.num_threads} thread{'s' * (self.num_threads != 1)}",
                     duration(est), duration(upper) if upper > est else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        out = []
        for i, r in enumerate(rows):
            out.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip())
            if i == 0 or i == len(rows) - 2:
                out.append("  ".join("-" * w for w in widths))
        return out


def duration(seconds: float) -> str:
    """'0.4 s', '45 s', '3.2 min', '1.5 h', '2.1 days'."""
    if seconds < 0.05:
        return "< 0.1 s"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# ---------------------------------------------------------------- the plan


def make_plan(recipe: Recipe, run_dir, device: Optional[str] = None, budget: float = CALIBRATION_BUDGET) -> RunPlan:
    """Decide what ``gapbench run`` would do in ``run_dir`` and time every stage on ``device``.

    ``budget``: seconds each piece of the calibration is timed for. The recipe's thread
    count applies during the calibration; torch's is restored afterwards.
    """
    from gapbench.experiment import configure_threads, resolve_device

    run_dir = Path(run_dir)
    dev = resolve_device(device or recipe.device)
    threads_before = torch.get_num_threads()
    started = time.perf_counter()
    try:
        configure_threads(recipe)
        threads = torch.get_num_threads()
        inputs, data_line, stand_in = _inputs(recipe)
        num_params = _num_parameters(recipe, inputs)
        actions, stops, epochs_done, eval_reuse = _actions(recipe, run_dir, device, dev, inputs, stand_in)
        timer = _Timer(dev, budget)
        stages: List[StageEstimate] = []
        notes: List[str] = []
        if stops is None:  # a run that would stop is not timed: its settings may not fit this machine
            cuda = [torch.cuda.current_device() if dev.index is None else dev.index] if dev.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(recipe.seed)
                stages, notes = _estimates(recipe, inputs, stand_in, dev, timer, epochs_done, eval_reuse)
    finally:
        torch.set_num_threads(threads_before)
    elapsed = time.perf_counter() - started
    notes = _assumptions(recipe, dev, threads, stand_in) + notes
    notes += [f"{what}: timed on {m} points and extended in proportion to a batch's {n}"
              for what, m, n in timer.scaled]
    if timer.spread > 1.5:
        notes.append(f"the timings were unsteady (two timings of the same work up to {timer.spread:.1f}x apart; "
                     "the faster counts): take the estimates as rough")
    notes.append(f"planning took {elapsed:.1f} s ({timer.seconds:.1f} s of it timing the stages)")
    return RunPlan(recipe=recipe, run_dir=run_dir, device=dev, num_threads=threads, data=data_line,
                   summary=_summary(recipe, inputs, data_line, num_params), actions=actions, stages=stages,
                   notes=notes, calibration_seconds=timer.seconds, stops=stops)


def _inputs(recipe: Recipe):
    """(inputs, a line saying where they came from, whether they stand in for data that did not load).

    The data are loaded as ``gapbench run`` would, but never downloaded; when they cannot be
    loaded, the dataset registry gives their shapes and counts, as shape-only (meta) tensors.
    """
    from gapbench.experiment import load_inputs

    no_download = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, download=False))
    started = time.perf_counter()
    try:
        inputs = load_inputs(no_download)
    except GapbenchError as exc:
        why = str(exc).split(";")[0]
        return _registry_inputs(recipe), (f"not loaded ({why}); shapes and counts from the dataset registry, "
                                          "random images for the timing"), True
    seconds = time.perf_counter() - started
    return inputs, f"{inputs.description}; loaded from {inputs.source} in {seconds:.1f} s", False


def _registry_inputs(recipe: Recipe):
    """Inputs of the recipe's dataset with the registry's shapes and split sizes, as meta tensors (no memory)."""
    from gapbench.data.registry import get_spec
    from gapbench.experiment import Inputs

    d = recipe.data
    spec = get_spec(d.dataset)
    num_valid = spec.num_valid if d.num_valid is None else d.num_valid
    pool = spec.num_train - spec.num_test if d.dataset == "digits" else spec.num_train  # digits: one pool
    num_train = pool - num_valid if d.num_train is None else min(d.num_train, pool - num_valid)

    def split(n: int) -> torch.Tensor:
        return torch.empty((n,) + tuple(spec.image_shape), device="meta")

    return Inputs(train=split(num_train), valid=split(num_valid), test=split(spec.num_test),
                  image_shape=tuple(spec.image_shape),
                  num_levels=None if d.quantize_bits is None else 2**d.quantize_bits,
                  dynamic=d.binarize == "dynamic", source="the dataset registry", description=spec.name)


def _images(inputs, recipe: Recipe, split: str, n: int, stand_in: bool) -> torch.Tensor:
    """n images of ``split`` as the model sees them: the first n, or random ones when the data stand in."""
    from gapbench.experiment import evaluation_split

    if not stand_in:
        x = inputs.train if split == "train-batches" else evaluation_split(inputs, recipe, split)
        return x[:n]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((n,) + tuple(inputs.image_shape), generator=gen)
    if inputs.num_levels is not None:
        return torch.floor(x * inputs.num_levels) / (inputs.num_levels - 1)
    if recipe.data.binarize == "none" or (inputs.dynamic and split == "train-batches"):
        return x  # grey levels (dynamic: training batches are binarized as they are drawn)
    return (x > 0.5).float()


def _actions(recipe: Recipe, run_dir: Path, device, dev, inputs, stand_in: bool):
    """What ``gapbench run`` would do: ([(stage, line)], why it would stop or None, epochs already
    trained, {stage: batches reused} or None when nothing of the evaluation is reused)."""
    from gapbench.experiment import CHECKPOINT_FILE
    from gapbench.io import load_torch
    from gapbench.methods import get_method, method_name
    from gapbench.pipeline import _training_action
    from gapbench.preflight import check_before_training

    actions: List[Tuple[str, str]] = []
    split = recipe.evaluate.split
    problem = get_method(method_name(recipe.train)).check(recipe)
    if problem:
        stop = f"train.method {method_name(recipe.train)}: {problem}"
        return [("train", "refuse to train")], stop, 0, None
    if not (run_dir / CHECKPOINT_FILE).is_file():
        try:
            check_before_training(recipe, inputs, dev)
        except GapbenchError as exc:
            return [("train", "refuse to train")], str(exc), 0, None
        actions.append(("train", f"train {recipe.name} from scratch ({recipe.train.num_epochs} epochs)"))
        epochs_done, action = 0, "train"
    else:
        try:
            action, message = _training_action(recipe, run_dir, device)
        except GapbenchError as exc:
            return [("train", "refuse to continue the run folder")], str(exc), 0, None
        epochs_done = int(load_torch(run_dir / CHECKPOINT_FILE).get("epoch", 0))
        actions.append(("train", message.split(": ", 1)[1]))
    if action != "skip":
        actions.append(("evaluate", f"every stage, on the {'new' if action == 'train' else 'updated'} checkpoint"))
        actions.append(("report", f"write {run_dir / 'report'}"))
        return actions, None, epochs_done, None
    reuse, line, current = _evaluation_reuse(recipe, run_dir, device, stand_in)
    actions.append(("evaluate", line))
    if current:
        from gapbench.report import report_is_current

        fresh = report_is_current([run_dir], run_dir / "report", split=split)
        actions.append(("report", f"keep {run_dir / 'report'} (up to date)" if fresh
                        else f"write {run_dir / 'report'}"))
    else:
        actions.append(("report", f"write {run_dir / 'report'}"))
    return actions, None, epochs_done, reuse


def _evaluation_reuse(recipe: Recipe, run_dir: Path, device, stand_in: bool):
    """({stage: batches reused} or None, a line saying so, whether the finished evaluation is reused whole).

    The same checks as ``evaluate-gaps --resume`` (gapbench.evaluate): a finished evaluation is
    reused when its provenance and settings match; otherwise the finished batches of an
    interrupted one whose inputs match.
    """
    from gapbench.evaluate import _finished_evaluation, _plan
    from gapbench.gaps_files import jsonable
    from gapbench.io import read_json_or_none
    from gapbench.scale import SINGLE

    split = recipe.evaluate.split
    if stand_in:
        there = (run_dir / "gaps" / f"{split}.json").is_file()
        what = "a finished evaluation is there, but" if there else "no finished evaluation;"
        return None, f"{what} without the data its reuse cannot be checked: counted as computed", False
    try:
        p = _plan(run_dir, [], device, recipe, SINGLE)
    except GapbenchError as exc:
        return None, f"cannot check what is reusable ({exc}): counted as computed", False
    done = _finished_evaluation(p.final, p.fingerprint, p.keys)
    if done is not None and done.get("settings") == jsonable(dataclasses.asdict(p.cfg)):
        return ({s: p.num_batches(s) for s in p.all_stages},
                f"reuse {p.final} (same checkpoint, points, settings and code)", True)
    stamp = read_json_or_none(p.stamp) or {}
    if stamp.get("fingerprint") != p.fingerprint:
        return None, f"every stage (no finished evaluation of these inputs in {run_dir / 'gaps'})", False
    reuse = {s: sum(p.part(s, b).exists() for b in range(p.num_batches(s))) for s in p.all_stages}
    kept = sum(reuse.values())
    if not kept:
        return None, "every stage (no finished batches of these settings)", False
    total = sum(p.num_batches(s) for s in p.all_stages)
    return reuse, f"resume: {kept} of {total} stage batches are finished and reused", False


# ---------------------------------------------------------------- timing


class _Timer:
    """Times work on a device (synchronizing a GPU), keeping the total time spent.

    ``scaled``: (what, points timed, points of a batch) for each cost timed on fewer points
    than a batch holds and extended to it in proportion.
    """

    def __init__(self, dev: torch.device, budget: float):
        self.dev, self.budget, self.seconds = dev, budget, 0.0
        self.scaled: List[Tuple[str, int, int]] = []
        self.spread = 1.0  # the largest ratio of two timings of the same work: how steady the machine was

    def _again(self, took: float, fn: Callable[[], object]) -> float:
        """The faster of ``took`` and another timing of ``fn``."""
        again = self.once(fn)
        self.spread = max(self.spread, max(took, again) / max(min(took, again), 1e-9))
        return min(took, again)

    def once(self, fn: Callable[[], object]) -> float:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        started = time.perf_counter()
        fn()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        took = time.perf_counter() - started
        self.seconds += took
        return took

    def per_unit(self, run_fn: Callable[[int], object], max_units: int) -> float:
        """Seconds per unit of ``run_fn(k)`` (k units: steps, transitions, samples).

        After a warm-up call of one unit and a timing of one unit, k grows until the units beyond
        the first take half the budget (or k reaches ``max_units``); a run within the budget is made
        once more and the faster of the two counts, so that a moment of other work on the machine
        does not (the plan assumes the machine otherwise idle). The cost is the slope between the
        two, (t(k) - t(1)) / (k - 1): what a call costs beyond its units (a local fit's setup and
        final estimate, some 50 ms for 25 flows: more than one step) is paid once per batch, not per
        unit. At ``max_units`` the run is the whole work and counts as t(k) / k. A unit slower than
        twice the budget counts from its warm-up (first-call costs are small beside it), and from
        one more run when that costs at most four budgets.
        """
        took = self.once(lambda: run_fn(1))
        if took >= 2 * self.budget:
            return self._again(took, lambda: run_fn(1)) if took <= 4 * self.budget else took
        one = self.once(lambda: run_fn(1))
        if one <= self.budget:
            one = self._again(one, lambda: run_fn(1))
        k, took = 1, one
        while k < max_units and took - one < self.budget / 2:
            unit = (took - one) / (k - 1) if k > 1 and took > one else one  # at first, the whole call's
            k = min(max_units, 8 * k, max(k + 1, int(1 + 1.2 * self.budget / 2 / max(unit, 1e-6))))
            took = self.once(lambda: run_fn(k))
        if k > 1 and took <= self.budget:
            took = self._again(took, lambda: run_fn(k))
        if k >= max_units or took <= one:  # the whole work, or units too cheap to tell from the call's cost
            return took / k
        return (took - one) / (k - 1)

    def per_point(self, what: str, run_at: Callable[[int], Callable[[int], object]], num_points: int,
                  max_units: int) -> "PointCost":
        """Seconds per unit of work on m points, through timings on a quarter of ``num_points`` and on
        all of them; when a unit on all of them would take long, in proportion to the quarter's
        (work that large is all arithmetic)."""
        m = max(1, num_points // 4)
        at_m = self.per_unit(run_at(m), max_units)
        if m == num_points:
            return PointCost(at_m, num_points, 1.0)
        if at_m * num_points / m > 4 * self.budget:
            self.scaled.append((what, m, num_points))
            return PointCost(at_m * num_points / m, num_points, 1.0)
        at_n = self.per_unit(run_at(num_points), max_units)
        power = math.log(max(at_n, 1e-12) / max(at_m, 1e-12)) / math.log(num_points / m)
        return PointCost(at_n, num_points, min(max(power, 0.0), 2.0))


@dataclass(frozen=True)
class PointCost:
    """Seconds per unit of work (a step, a transition) on m points: c(m) = at_n (m / n)^power.

    Small batches pay a fixed cost per pass (power < 1); per-datapoint flows grow faster than
    their points (power > 1: each point's own networks, caches).
    """

    at_n: float
    n: int
    power: float

    def __call__(self, m: int) -> float:
        return self.at_n * (m / self.n) ** self.power

    def emptying(self, m: int) -> float:
        """Mean cost per step while a batch of m points empties at an even pace: c(m) / (power + 1)."""
        return self(m) / (self.power + 1)


def _batches(cfg) -> List[int]:
    """The sizes of the evaluation's batches."""
    return [min(cfg.batch_size, cfg.num_points - i) for i in range(0, cfg.num_points, cfg.batch_size)]


def _num_parameters(recipe: Recipe, inputs) -> int:
    """The parameters of the recipe's model, counted on the meta device (no memory, no time)."""
    from gapbench.experiment import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(recipe, inputs).parameters())


def _estimates(recipe: Recipe, inputs, stand_in: bool, dev, timer: _Timer, epochs_done: int, eval_reuse):
    """([StageEstimate] of training and each evaluation stage, notes on what they assume)."""
    from gapbench.experiment import build_model

    model = build_model(recipe, inputs).to(dev)
    notes: List[str] = []
    stages = [_training(recipe, inputs, stand_in, model, dev, timer, epochs_done, notes)]
    model.eval()
    stages += _evaluation(recipe, inputs, stand_in, model, dev, timer, eval_reuse, notes)
    return stages, notes


def _training(recipe, inputs, stand_in, model, dev, timer: _Timer, epochs_done: int, notes) -> StageEstimate:
    """Training: a few steps of the method at the recipe's batch size, and a validation pass, timed."""
    from gapbench.experiment import training_batch
    from gapbench.methods import build_method, method_name
    from gapbench.schedules import learning_rate
    from gapbench.train import dataset_elbo

    t = recipe.train
    n_train, n_valid, n_test = (int(inputs.split(s).shape[0]) for s in ("train", "valid", "test"))
    steps_per_epoch = math.ceil(n_train / t.batch_size)
    epochs = max(t.num_epochs - epochs_done, 0)
    validations = sum(1 for e in range(epochs_done + 1, t.num_epochs + 1) if e % t.eval_every == 0 or e == t.num_epochs)
    checkpoints = sum(1 for e in range(epochs_done + 1, t.num_epochs + 1)
                      if e % t.checkpoint_every == 0 or e == t.num_epochs)
    work = (f"{epochs:,} epochs x {steps_per_epoch:,} steps of {t.batch_size} "
            f"+ {validations:,} validations of {n_valid:,}")
    label = f"train ({method_name(t)})"
    if epochs == 0:
        return StageEstimate("train", label, f"{t.num_epochs:,} epochs", 0.0, reused="already trained")

    method = build_method(model, t)
    pool = _images(inputs, recipe, "train-batches", min(n_train, 2 * t.batch_size), stand_in)
    pool_inputs = dataclasses.replace(inputs, train=pool, valid=pool)
    method.set_lr(learning_rate(0, t.lr, t.lr_schedule))
    method.begin_epoch(1, pool_inputs, dev)
    gen = torch.Generator().manual_seed(recipe.seed)
    model.train()

    def steps(k: int) -> None:
        for _ in range(k):
            idx = torch.randperm(pool.shape[0], generator=gen)[: t.batch_size]
            method.step(training_batch(pool_inputs, pool[idx], gen).to(dev), 1.0)

    per_step = timer.per_unit(steps, max_units=50)
    upper = None
    if getattr(method, "aggressive", False):  # aggressive training: inner loops until I(x; z) stops rising
        method.aggressive = False
        plain = timer.per_unit(steps, max_units=50)
        phase = min(AGGRESSIVE_EPOCHS, epochs) if epochs_done == 0 else 0
        upper = epochs * steps_per_epoch * per_step
        per_step = (phase * per_step + (epochs - phase) * plain) / epochs
        notes.append(f"training: the aggressive phase (inner loops of up to {t.aggressive.max_inner_steps} "
                     f"encoder steps) estimated at {AGGRESSIVE_EPOCHS} epochs; at most every epoch")
    model.eval()
    x_valid = _images(inputs, recipe, "valid", min(n_valid, 500), stand_in)
    per_point = timer.per_unit(lambda k: [dataset_elbo(model, x_valid, dev) for _ in range(k)], max_units=5)
    per_point /= x_valid.shape[0]
    buf = io.BytesIO()
    state = {"model": model.state_dict(), "optimizer": method.state_dict(), "best_model": model.state_dict()}
    per_checkpoint = timer.once(lambda: torch.save(state, buf))
    seconds = (epochs * steps_per_epoch * per_step + validations * n_valid * per_point
               + 10 * n_test * per_point + checkpoints * per_checkpoint)
    if t.early_stopping_patience is not None:
        notes.append("training: early stopping may end it sooner than train.num_epochs")
    if upper is not None:
        upper += seconds - epochs * steps_per_epoch * per_step
    return StageEstimate("train", label, work, seconds, upper=upper,
                         reused=f"trained: {epochs_done} epochs" if epochs_done else "")


def _evaluation(recipe, inputs, stand_in, model, dev, timer: _Timer, eval_reuse, notes) -> List[StageEstimate]:
    """Each evaluation stage, timed on one batch at the recipe's settings."""
    from gapbench.evaluate import AIS_SWEEP_POINTS, _label, _model_diagnostics, _sweep_runs
    from gapbench.gaps import stage_names
    from gapbench.methods import get_method, method_name

    cfg = recipe.evaluate
    sizes = _batches(cfg)
    n = sizes[0]
    x = _images(inputs, recipe, cfg.split, n, stand_in).to(dev)
    refines = bool(getattr(get_method(method_name(recipe.train)), "refines", False))
    all_stages = stage_names(cfg, recipe.model.encoder, refines=refines)
    all_stages += ["ais_sweep"] if cfg.ais.enabled else []
    all_stages += ["diagnostics"] if _model_diagnostics(cfg) else []
    reuse = eval_reuse or {}
    per_sample = _per_sample(model, x, timer, cfg.elbo_samples)  # seconds per sample of a batch's L[q]
    ais_cost = None
    out = []
    for stage in all_stages:
        units = 1 if stage in ("ais_sweep", "diagnostics") else len(sizes)
        kept = min(reuse.get(stage, 0), units)
        todo = sizes[kept:] if units == len(sizes) else ([] if kept else [n])
        upper = None
        if not todo:
            seconds, work = 0.0, _work(stage, cfg, sizes)
        elif stage == "amortized":
            seconds, work = per_sample * cfg.elbo_samples * len(todo), _work(stage, cfg, sizes)
        elif stage == "iwae":
            from gapbench.inference import iwae

            q = model.posterior(x)
            rate = timer.per_unit(lambda k: iwae(model, x, q, num_samples=k, seed=0), max_units=cfg.iwae_samples)
            seconds, work = rate * cfg.iwae_samples * len(todo), _work(stage, cfg, sizes)
        elif stage == "refined":
            seconds, work = _refined(recipe, model, x, timer) + per_sample * cfg.elbo_samples, _work(stage, cfg, sizes)
            seconds *= len(todo)
        elif stage.startswith("local_"):
            seconds, upper, work = _local(stage.split("_", 1)[1], recipe, model, x, timer, todo, per_sample, notes)
        elif stage in ("ais", "ais_sweep"):
            if ais_cost is None:
                ais_cost = _ais_cost(cfg, model, x, timer)  # per transition of m points
            if stage == "ais":
                seconds = sum(ais_cost(m) * cfg.ais.num_steps for m in todo)
                work = _work(stage, cfg, sizes)
            else:
                m = min(AIS_SWEEP_POINTS, n)
                grid = _sweep_runs(cfg.ais.num_steps)
                seconds = ais_cost(m) * sum(grid)
                work = f"{m} points x {', '.join(f'{g:,}' for g in grid)} steps"
        else:  # diagnostics
            seconds, work = _diagnostics(recipe, inputs, stand_in, model, dev, timer)
        if kept:
            reused = f"all {units} reused" if kept == units else f"{kept} of {units} batches reused"
            if units == 1:
                reused = "reused"
        else:
            reused = ""
        out.append(StageEstimate(stage, _label(stage), work, seconds,
                                 upper=None if upper is None or not todo else upper, reused=reused))
    if cfg.ais.enabled and cfg.ais.compile:
        notes.append("AIS timed without torch.compile: compiling adds about 10 s per chunk shape, "
                     "and may then make transitions faster")
    return out


def _work(stage: str, cfg, sizes: List[int]) -> str:
    points = f"{len(sizes)} batch{'es' * (len(sizes) != 1)} x {sizes[0]} points"
    return {
        "amortized": f"{points} x {cfg.elbo_samples:,} samples",
        "iwae": f"{points} x {cfg.iwae_samples:,} samples",
        "refined": f"{points}, the method's refinement + {cfg.elbo_samples:,} samples",
        "ais": (f"{points} x {cfg.ais.num_chains} chains x {cfg.ais.num_steps:,} steps "
                f"of {cfg.ais.num_leapfrog} leapfrog"),
    }.get(stage, points)


def _per_sample(model, x, timer: _Timer, max_samples: int) -> float:
    """Seconds per sample of the ELBO of batch x (the amortized stage and a local fit's final estimate)."""
    from gapbench.inference.bounds import elbo_and_stderr

    with torch.no_grad():
        q = model.posterior(x)
    return timer.per_unit(lambda k: elbo_and_stderr(model, x, q, k), max_units=max_samples)


def _refined(recipe, model, x, timer: _Timer) -> float:
    """Seconds of the training method's test-time refinement of one batch."""
    from gapbench.methods import build_method

    method = build_method(model, recipe.train)
    took = timer.once(lambda: method.refine(x))
    model.zero_grad(set_to_none=True)
    return took


def _local(family: str, recipe, model, x, timer: _Timer, todo: List[int], per_sample: float, notes):
    """(estimate, upper bound, work) of the local fits of ``family`` on the batches ``todo``."""
    from gapbench.gaps import local_family_kwargs, local_init
    from gapbench.inference import fit_local

    cfg, loc = recipe.evaluate, recipe.evaluate.local
    n = x.shape[0]
    check_every = loc.check_every if family == "ffg" or loc.flow_check_every is None else loc.flow_check_every
    kwargs = local_family_kwargs(family, cfg, recipe.model)

    def fit(points: int):
        xs = x[:points]
        init = _local_start(local_init(family, cfg), model, xs)

        def run(k: int):
            fit_local(model, xs, family=family, init=init, lr=loc.lr, num_samples=loc.num_samples,
                      check_every=k + 1, patience=loc.patience, max_steps=k, num_final_samples=1,
                      lr_decay=loc.lr_decay, improvement_se=loc.improvement_se, gradient=loc.gradient,
                      seed=0, family_kwargs=kwargs)

        return run

    cost = timer.per_point(f"local {family} steps", fit, n, loc.max_steps)  # per step of m active points
    mean_checks, slowest_checks = TYPICAL_CHECKS.get(family, TYPICAL_CHECKS["flow"])
    scale = (loc.patience + 1) / (TYPICAL_PATIENCE + 1)
    mean_steps = min(loc.max_steps, mean_checks * scale * check_every)
    slowest_steps = min(loc.max_steps, max(slowest_checks * scale * check_every, mean_steps))
    final = per_sample * loc.num_final_samples
    estimate = sum(local_batch_seconds(cost, m, mean_steps, slowest_steps) + final for m in todo)
    upper = sum(cost(m) * loc.max_steps + final for m in todo)
    name = {"ffg": "FFG"}.get(family, family)
    notes.append(f"local {name} fits: estimated at {mean_steps:,.0f} steps per point and {slowest_steps:,.0f} for "
                 f"the slowest of a batch ({mean_checks * scale:.0f} and {slowest_checks * scale:.0f} checks of "
                 f"{check_every}: committed evaluations, fast procedure); at most {loc.max_steps:,} each"
                 + ("" if _like_committed(loc) else "; these settings differ from those evaluations "
                    "(learning rate, stopping rule or start), so the step counts are a guess"))
    work = f"{len(todo)} batch{'es' * (len(todo) != 1)} x {n} points, <= {loc.max_steps:,} steps each"
    return estimate, upper, work


def local_batch_seconds(cost: PointCost, num_points: int, mean_steps: float, slowest_steps: float) -> float:
    """Seconds of the steps of a batch's local fits, with ``cost(m)`` per step of m active points.

    All points run for L = 2 mean - slowest steps, then stop at an even pace until the slowest
    stops (their mean is then ``mean_steps``): L c(n) + (slowest - L) c(n) / (p + 1).
    """
    full = max(2 * mean_steps - slowest_steps, 0.0)
    return full * cost(num_points) + (slowest_steps - full) * cost.emptying(num_points)


def _like_committed(loc) -> bool:
    """Whether local settings are those the typical step counts were seen with (the fast procedure's)."""
    return loc.lr_decay < 1 and loc.improvement_se > 0 and loc.init == "encoder" and loc.lr >= 1e-2


def _local_start(where: str, model, x):
    """A start like the evaluation's: the prior (None), the encoder's q, or a Gaussian standing in for q*_FFG."""
    if where == "prior":
        return None
    if where == "encoder":
        with torch.no_grad():
            return model.posterior(x).detach()
    return _gaussian(model, x)


def _gaussian(model, x):
    """N(0, I) for each point of x as a DiagonalGaussian posterior: the shape of a fitted q*_FFG."""
    from gapbench.models.posterior import DiagonalGaussian

    zeros = torch.zeros(x.shape[0], model.latent_dim, device=x.device, dtype=x.dtype)
    return DiagonalGaussian(model.latent_dim).posterior({"mean": zeros, "log_var": zeros.clone()})


def _ais_cost(cfg, model, x, timer: _Timer) -> PointCost:
    """Seconds per AIS transition of all chains of m points, eager."""
    from gapbench.inference import ais

    a = cfg.ais

    def run_at(m: int):
        xs = x[:m]
        init = None if a.init == "prior" else (model.posterior(xs) if a.init == "encoder" else _gaussian(model, xs))
        return lambda k: ais(model, xs, num_steps=k, num_chains=a.num_chains, num_leapfrog=a.num_leapfrog,
                             schedule=a.schedule, init=init, seed=0)

    return timer.per_point("AIS transitions", run_at, x.shape[0], a.num_steps)


def _diagnostics(recipe, inputs, stand_in, model, dev, timer: _Timer) -> Tuple[float, str]:
    """The diagnostics stage: each diagnostic timed on a few points and scaled to the evaluated ones
    (in proportion, or for the mutual information as its timings on m and 2m points grow)."""
    from gapbench.evaluate import _diagnostics as run_diagnostics
    from gapbench.evaluate import _model_diagnostics

    cfg = recipe.evaluate
    total = cfg.num_points
    m = min(DIAGNOSTIC_POINTS, total)
    x = _images(inputs, recipe, cfg.split, min(2 * m, total), stand_in).to(dev)
    seconds = 0.0
    names = _model_diagnostics(cfg)
    for name in names:
        one = dataclasses.replace(cfg, diagnostics=(name,))
        took = timer.once(lambda: run_diagnostics(model, x[:m], one, 0))
        power = 1.0
        if name == "mutual_information" and x.shape[0] > m:
            twice = timer.once(lambda: run_diagnostics(model, x, one, 0))
            power = min(max(math.log(max(twice, 1e-9) / max(took, 1e-9)) / math.log(x.shape[0] / m), 1.0), 2.0)
        seconds += took * (total / m) ** power
    return seconds, f"{', '.join(names)} on {total} points"


# ---------------------------------------------------------------- words


def _assumptions(recipe: Recipe, dev, threads: int, stand_in: bool) -> List[str]:
    where = (f"{threads} CPU thread{'s' * (threads != 1)} ("
             + (f"num_threads: {recipe.num_threads}" if recipe.num_threads else "torch's default; num_threads: null")
             + f") of {os.cpu_count()} cores") if dev.type == "cpu" else f"the {dev.type} device {dev}"
    out = [f"assumes one process on {where}, on a machine otherwise idle: other work slows every stage"]
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        load, cores = 0.0, 1
    if dev.type == "cpu" and load > cores:
        out.append(f"this machine was busy while planning (load average {load:.1f} on {cores} cores): the timings "
                   "include some of that contention, and with more threads than free cores they swing widely "
                   "(num_threads: 1 is steadier on a busy machine)")
    if stand_in:
        out.append("the data did not load: the timings use random images of the dataset's shape "
                   "(the same cost per step)")
    out.append("under torchrun or --shard I/N the evaluation's batches are shared: divide its stages by the workers")
    out.append("report: not timed (tables and figures: seconds)")
    return out


def _summary(recipe: Recipe, inputs, data_line: str, num_params: int) -> List[Tuple[str, str]]:
    """The resolved recipe in a few lines."""
    from gapbench.methods import method_name

    d, m, t, cfg = recipe.data, recipe.model, recipe.train, recipe.evaluate
    counts = " / ".join(f"{int(inputs.split(s).shape[0]):,} {s}" for s in ("train", "valid", "test"))
    pixels = math.prod(inputs.image_shape)
    if m.architecture == "conv":
        network = f"conv, channels {'-'.join(map(str, m.conv_channels))}, latent {m.latent_dim}"
    else:
        enc = "-".join(str(h) for h in (pixels, *m.encoder_hidden)) + f"-(2x{m.latent_dim})"
        network = f"mlp {enc} / " + "-".join(str(h) for h in (m.latent_dim, *m.decoder_hidden, pixels))
    sizes = _batches(cfg)
    loc = cfg.local
    ais = (f"AIS {cfg.ais.num_steps:,} steps x {cfg.ais.num_chains} chains from the {cfg.ais.init}"
           if cfg.ais.enabled else "no AIS")
    diags = f"; diagnostics {', '.join(cfg.diagnostics)}" if cfg.diagnostics else ""
    return [
        ("recipe", f"{recipe.name}, seed {recipe.seed}, device {recipe.device}"),
        ("data", f"{d.dataset}, binarize {d.binarize}: {counts}, images {'x'.join(map(str, inputs.image_shape))}"),
        ("", data_line),
        ("model", f"{network}, {m.activation}, {m.likelihood}, encoder {m.encoder}, "
                  f"{num_params:,} parameters"),
        ("train", f"{method_name(t)}, {t.num_samples} sample{'s' * (t.num_samples != 1)}, batch {t.batch_size}, "
                  f"{t.num_epochs:,} epochs, lr {t.lr:g} ({t.lr_schedule}), warm-up {t.warmup_epochs}, "
                  f"validation every {t.eval_every}"),
        ("evaluate", f"{cfg.split}, {cfg.num_points:,} points in {len(sizes)} batches of {sizes[0]}; "
                     f"families {', '.join(cfg.families)}; L[q] {cfg.elbo_samples:,} samples, "
                     f"IWAE {cfg.iwae_samples:,}; local {loc.procedure}, at most {loc.max_steps:,} steps; "
                     f"{ais}{diags}"),
    ]
