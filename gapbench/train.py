"""gapbench train: fit a VAE with its training method (train.method), with checkpoints and exact resume.

Every epoch ends with an atomic checkpoint holding the weights, the optimizer,
the random-number state and the log so far, so ``--resume`` continues exactly
where the last checkpoint left off: on CPU, an interrupted-and-resumed run ends
with the same tensors as an uninterrupted one. The data order of epoch e comes
from a generator seeded by (seed, e), so it does not depend on what ran before.
The epochs listed in ``train.keep_checkpoints`` also leave their weights in
``checkpoints/epoch_<e>.pt`` (weights only), which ``evaluate-gaps --checkpoint E``
evaluates; saving them draws no random numbers, so the training is unchanged.

Under torchrun, vae and iwae train data-parallel: each rank takes a contiguous
share of every global batch, draws the batch's binarization and noise whole (as
one process would) and keeps its rows, and the ranks sum their gradients of
sum(share) / batch size; the loss curve is one process's up to the order of
float sums. Rank 0 alone writes the run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from gapbench.errors import GapbenchError
from gapbench.experiment import (
    CHECKPOINT_FILE,
    META_FILE,
    RECIPE_FILE,
    TRAIN_LOG_FILE,
    Inputs,
    KEPT_DIR,
    kept_checkpoint_path,
    build_model,
    configure_threads,
    load_inputs,
    resolve_device,
    training_batch,
)
from gapbench.methods import NonFiniteLoss, build_method, get_method, method_name
from gapbench.methods.base import BatchShare, elbo_terms
from gapbench.scale import Workers
from gapbench.io import (
    load_torch,
    output_dir,
    remove_stale_temporaries,
    save_torch,
    write_json,
    write_text,
)
from gapbench.recipe import Recipe, load_recipe
from gapbench.schedules import kl_weight, learning_rate

log = logging.getLogger(__name__)

METHOD_LOG_FILE = "method_log.csv"
LOG_COLUMNS = ["epoch", "lr", "kl_weight", "train_objective", "train_elbo", "valid_elbo", "seconds", "images_per_s"]


class TrainingDiverged(GapbenchError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    num_epochs: int
    best_epoch: int
    best_valid_elbo: float
    test_elbo: float
    wall_seconds: float
    stopped_early: bool

    def summary_line(self) -> str:
        early = " (early stop)" if self.stopped_early else ""
        epochs = f"{self.num_epochs} epoch{'' if self.num_epochs == 1 else 's'}"
        return (
            f"trained {epochs}{early} in {self.wall_seconds:.1f} s: "
            f"best valid ELBO {self.best_valid_elbo:.2f} nats (epoch {self.best_epoch}), "
            f"test ELBO {self.test_elbo:.2f} nats -> {self.run_dir}"
        )


@torch.no_grad()
def dataset_elbo(model, x: torch.Tensor, device, batch_size: int = 500, num_samples: int = 1) -> float:
    """Mean ELBO over the datapoints of ``x`` (a single-sample estimate per point by default)."""
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device)
        log_lik, log_ratio = elbo_terms(model, xb, model.posterior(xb), num_samples)
        total += (log_lik + log_ratio).mean(0).double().sum().item()
    return total / x.shape[0]


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7 + stream)


def _initial_state(model, method) -> Dict:
    return {
        "model": model.state_dict(),
        "optimizer": method.state_dict(),  # the method's optimizers and state (train.method)
        "epoch": 0,
        "rng": torch.get_rng_state(),
        "best_model": None,
        "best_valid_elbo": -math.inf,
        "best_epoch": 0,
        "epochs_since_best": 0,
        "log": [],
        "stopped_early": False,
    }


def _write_log(run_dir: Path, rows: List[Dict], method_rows: Optional[List[Dict]] = None) -> None:
    lines = [",".join(LOG_COLUMNS)]
    for row in rows:
        lines.append(",".join(repr(row[c]) if isinstance(row[c], float) else str(row[c]) for c in LOG_COLUMNS))
    write_text(run_dir / TRAIN_LOG_FILE, "\n".join(lines) + "\n")
    if method_rows:  # what the training method reports per epoch (aggressive: I(x; z), ...)
        columns = list(dict.fromkeys(k for row in method_rows for k in row))
        lines = [",".join(columns)] + [",".join(repr(r[c]) if isinstance(r.get(c), float) else str(r.get(c, ""))
                                               for c in columns) for r in method_rows]
        write_text(run_dir / METHOD_LOG_FILE, "\n".join(lines) + "\n")


def training_changes(recipe: Recipe, saved: Recipe) -> List[str]:
    """The keys, as 'section.key old -> new', that make ``recipe`` train another model than ``saved``.

    Evaluation settings, the device, the thread count and the name may differ,
    train.num_epochs may grow (train an existing run for longer) and train.keep_checkpoints
    may change (it only saves weights; epochs already trained cannot be kept afterwards); anything else
    (data, model, seed, the rest of train) cannot continue from the checkpoint.
    """
    mine = dataclasses.replace(
        recipe,
        device=saved.device,
        evaluate=saved.evaluate,
        name=saved.name,
        num_threads=saved.num_threads,
        train=dataclasses.replace(recipe.train, num_epochs=saved.train.num_epochs,
                                  keep_checkpoints=saved.train.keep_checkpoints),
    )
    if mine == saved:
        return []
    a, b = saved.to_dict(), mine.to_dict()
    diff = [f"{s}.{k} {a[s][k]!r} -> {b[s].get(k)!r}" for s in a if isinstance(a[s], dict) for k in a[s]
            if a[s][k] != b[s].get(k)]
    diff += [f"{k} {a[k]!r} -> {b[k]!r}" for k in a if not isinstance(a[k], dict) and a[k] != b[k]]
    return diff


def _check_resume(recipe: Recipe, run_dir: Path, how: str = "--resume") -> None:
    """Refuse to continue ``run_dir`` with a recipe that trains another model; ``how`` names what asked."""
    diff = training_changes(recipe, load_recipe(run_dir / RECIPE_FILE))
    if diff:
        raise GapbenchError(
            f"{how}: {run_dir} was trained with other settings ({'; '.join(diff)}), which cannot continue from its "
            f"checkpoint: train into a new --out, or set them back"
        )


def training_workers() -> Workers:
    """This process's place among torchrun's ranks (one process unless torchrun started several).

    A job array's variables are ignored: training is never split into shards.
    """
    import os

    from gapbench.scale import detect

    return detect(env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")})


def train_run(
    recipe: Recipe,
    run_dir,
    device: Optional[str] = None,
    resume: bool = False,
    callback: Optional[Callable[[Dict], None]] = None,
    how: str = "--resume",
) -> TrainResult:
    """Train the recipe's VAE into ``run_dir``; ``callback(row)`` is called after every epoch.

    ``resume``: continue the run's checkpoint up to ``train.num_epochs`` (which may have grown);
    ``how`` names what asked for it in error messages ("--resume", "gapbench run").
    The run folder is locked (one writer at a time) for the whole call.

    Under torchrun (WORLD_SIZE > 1), methods with ``data_parallel`` (vae, iwae) train on every
    rank, each on a contiguous share of every global batch, with the gradients summed over the
    ranks: the same steps as one process up to the order of float sums. Other methods train on
    rank 0 alone while the others wait. Either way only rank 0 writes the run folder (and holds
    its lock, and calls ``callback``); every rank returns the result.
    """
    from gapbench.scale import RankFailed, rank_device, team

    run_dir = Path(run_dir)
    dev = resolve_device(device or recipe.device)
    workers = training_workers()
    if not workers.distributed:
        return _train_alone(recipe, run_dir, dev, resume, callback, how)

    dev = rank_device(workers, dev)
    group = team(workers, dev.type)
    done = group.phase("train")
    name = method_name(recipe.train)
    try:
        if get_method(name).data_parallel:
            result = _train_parallel(recipe, run_dir, dev, resume, callback, how, group)
        elif workers.is_main:
            log.warning("train.method %s does not train data-parallel: rank 0 trains alone and the other %d "
                        "rank(s) wait for it", name, workers.world_size - 1)
            result = _train_alone(recipe, run_dir, dev, resume, callback, how)
        else:
            result = None
        if workers.is_main:
            group.post(done, json.dumps({k: v for k, v in dataclasses.asdict(result).items() if k != "run_dir"}))
        else:  # what rank 0 wrote, once it has
            posted = group.gather(done, ranks=[0], what="rank 0 trains")[0]
            result = TrainResult(run_dir=run_dir, **json.loads(posted))
    except RankFailed:
        raise
    except BaseException as exc:
        group.fail(str(exc) if isinstance(exc, GapbenchError) else f"{type(exc).__name__}: {exc}")
        raise
    return result


def _train_alone(recipe: Recipe, run_dir: Path, dev, resume: bool, callback, how: str) -> TrainResult:
    """One process training (or rank 0 for a method that does not train data-parallel)."""
    with contextlib.ExitStack() as held:
        inputs, model, method, state, prior_meta = _open_run(recipe, run_dir, dev, resume, how, held)
        return _train_and_record(recipe, run_dir, inputs, model, method, state, dev, callback, resume, prior_meta)


def _open_run(recipe: Recipe, run_dir: Path, dev, resume: bool, how: str, held: contextlib.ExitStack):
    """Lock ``run_dir`` (held until ``held`` closes), check it, build the model and method and load or
    write the checkpoint; returns (inputs, model, method, state, prior_meta)."""
    from gapbench.lock import command_line, folder_lock
    from gapbench.preflight import check_before_training

    ckpt_path = run_dir / CHECKPOINT_FILE
    t = recipe.train
    # Until the first checkpoint is written, a failure removes the folder this call created.
    with output_dir(run_dir, keep_if=lambda p: (p / CHECKPOINT_FILE).is_file()):
        held.enter_context(folder_lock(run_dir, command_line()))
        if resume:
            if not ckpt_path.is_file():
                raise GapbenchError(
                    f"--resume: {run_dir} holds no {CHECKPOINT_FILE} to resume from; drop --resume to start"
                )
            _check_resume(recipe, run_dir, how)
        elif ckpt_path.exists():
            raise GapbenchError(
                f"{run_dir} already holds a trained run; pass --resume to continue it or choose another --out"
            )
        # A killed write leaves its temporary beside the target; this run's files are rewritten below.
        remove_stale_temporaries(run_dir, [RECIPE_FILE, CHECKPOINT_FILE, TRAIN_LOG_FILE, META_FILE])
        remove_stale_temporaries(run_dir / KEPT_DIR)

        problem = get_method(method_name(t)).check(recipe)
        if problem:
            raise GapbenchError(f"train.method {method_name(t)}: {problem}")
        inputs = load_inputs(recipe)
        check_before_training(recipe, inputs, dev)
        model, method = _build(recipe, inputs, dev)

        if resume:
            state = _resume_state(recipe, run_dir, model, method, how)
            lost = [e for e in t.keep_checkpoints
                    if e <= state["epoch"] and not kept_checkpoint_path(run_dir, e).is_file()]
            if lost:
                log.warning("train.keep_checkpoints: epoch(s) %s were trained before they were asked to be kept; "
                            "their weights are not kept (train into a new --out to keep them)",
                            ", ".join(map(str, lost)))
            if state["log"]:
                # The checkpoint is written before the log, so a kill between the two leaves the log an
                # epoch behind; rewrite it from the checkpoint, or a run killed there would lack its last row.
                _write_log(run_dir, state["log"], state.get("method_log"))
            # The resolved recipe says what the run is trained to now (num_epochs may have grown).
            saved_name = load_recipe(run_dir / RECIPE_FILE).name
            write_text(run_dir / RECIPE_FILE, dataclasses.replace(recipe, name=saved_name).to_yaml())
            # meta.json marks a finished training; until this one finishes, the run is not.
            prior_meta = _read_meta(run_dir)
            (run_dir / META_FILE).unlink(missing_ok=True)
        else:
            write_text(run_dir / RECIPE_FILE, recipe.to_yaml())
            state = _initial_state(model, method)
            save_torch(ckpt_path, state)
            prior_meta = {}
    return inputs, model, method, state, prior_meta


def _build(recipe: Recipe, inputs: Inputs, dev):
    """The recipe's model (weights from the recipe's seed) on ``dev`` and its training method."""
    configure_threads(recipe)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe, inputs).to(dev)
    return model, build_method(model, recipe.train)


def _resume_state(recipe: Recipe, run_dir: Path, model, method, how: str) -> Dict:
    """The checkpoint's state, loaded into ``model``, ``method`` and torch's random-number generator."""
    ckpt_path = run_dir / CHECKPOINT_FILE
    state = load_torch(ckpt_path)
    try:
        model.load_state_dict(state["model"])
        method.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise GapbenchError(
            f"{ckpt_path} does not fit this recipe's model ({type(exc).__name__}); train into a new --out"
        ) from None
    if state["epoch"] > recipe.train.num_epochs:
        raise GapbenchError(
            f"{how}: {run_dir} has already trained {state['epoch']} epochs, more than "
            f"train.num_epochs={recipe.train.num_epochs} asks for; ask for at least {state['epoch']} "
            f"(--set train.num_epochs={state['epoch']}), or train into a new --out"
        )
    torch.set_rng_state(state["rng"])
    return state


class _Ranks:
    """The collectives of data-parallel training over torchrun's ranks (torch.distributed, on ``dev``)."""

    def __init__(self, workers: Workers, dev):
        self.workers, self.dev = workers, dev

    @property
    def is_main(self) -> bool:
        return self.workers.is_main

    def rows(self, total: int):
        """This rank's contiguous rows [start, stop) of a global batch of ``total`` (none when total is below
        the number of ranks; start < total all the same)."""
        r, w = self.workers.rank, self.workers.world_size
        return total * r // w, total * (r + 1) // w

    def reduce(self, params: List[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' gradients of ``params`` (in place) and their ``loss``es, in one all-reduce.

        A parameter without a gradient counts as zero; it gets one if any rank's has one
        (one process would have given it one), and stays without where no rank's has.
        """
        import torch.distributed as dist

        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=parts[0].dtype, device=self.dev)
        flat = torch.cat(parts + [has_grad, loss.reshape(1).to(parts[0].dtype)])
        dist.all_reduce(flat)
        offset, has_grad = 0, flat[-1 - len(params) : -1].tolist()
        for p, has in zip(params, has_grad):
            p.grad = flat[offset : offset + p.numel()].view_as(p) if has else None
            offset += p.numel()
        return flat[-1]

    def sum(self, values: List[float]) -> List[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.dev)
        dist.all_reduce(t)
        return t.tolist()

    def main_value(self, value: float) -> float:
        """Rank 0's ``value`` on every rank, so that decisions made from it are the same everywhere."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.dev)
        dist.broadcast(t, src=0)
        return t.item()


def _train_parallel(recipe: Recipe, run_dir: Path, dev, resume: bool, callback, how: str, group):
    """Data-parallel training (``group``: the ranks' :class:`gapbench.scale.Team`): rank 0 opens the run
    (lock, checks, checkpoint), then every rank builds the same model, loads the same checkpoint and
    trains on its share of every batch. Returns rank 0's result on rank 0, None elsewhere."""
    ranks = _Ranks(group.workers, dev)
    ready = group.phase("train-ready")
    with contextlib.ExitStack() as held:
        if ranks.is_main:
            inputs, model, method, state, prior_meta = _open_run(recipe, run_dir, dev, resume, how, held)
            group.post(ready)
        else:
            group.gather(ready, ranks=[0], what="rank 0 opens the run")
            inputs = load_inputs(recipe)
            model, method = _build(recipe, inputs, dev)
            state = _resume_state(recipe, run_dir, model, method, how) if resume else _initial_state(model, method)
            group.post(ready)
        group.gather(ready, what="the ranks build the model")
        if ranks.is_main:
            return _train_and_record(recipe, run_dir, inputs, model, method, state, dev, callback, resume,
                                     prior_meta, ranks)
        _train_epochs(recipe, inputs, model, method, state, run_dir, dev, None, ranks)
        return None  # the result is rank 0's (train_run waits for it)


def _read_meta(run_dir: Path) -> Dict:
    from gapbench.io import read_json_or_none

    return read_json_or_none(run_dir / META_FILE) or {}


def _train_and_record(recipe, run_dir, inputs, model, method, state, dev, callback, resume, prior_meta,
                      ranks=None) -> TrainResult:
    """The epochs, then the test ELBO and meta.json (with the final checkpoint's hash)."""
    from gapbench.provenance import code_versions, device_name, now, sha256_bytes

    ckpt_path = run_dir / CHECKPOINT_FILE
    started = time.time()
    state = _train_epochs(recipe, inputs, model, method, state, run_dir, dev, callback, ranks)
    best = state["best_model"]
    if best is not None:
        model.load_state_dict(best)
    test_elbo = dataset_elbo(model.eval(), inputs.test, dev, num_samples=10)
    meta = {
        "seed": recipe.seed,
        **code_versions(),
        "python_version": platform.python_version(),
        "device": str(dev),
        "device_name": device_name(dev),
        "date": now(),
        "checkpoint_sha256": sha256_bytes(ckpt_path.read_bytes()),
        "num_threads": torch.get_num_threads(),
        "data_source": inputs.source,
        "data_description": inputs.description,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "stopped_early": state["stopped_early"],
        "best_valid_elbo": state["best_valid_elbo"],
        "test_elbo": test_elbo,
        "train_seconds": sum(r["seconds"] for r in state["log"]),
        "wall_seconds": prior_meta.get("wall_seconds", 0.0) + (time.time() - started),
        "resumed": bool(resume) or prior_meta.get("resumed", False),
    }
    if ranks is not None:  # trained data-parallel under torchrun
        meta["num_ranks"] = ranks.workers.world_size
    write_json(run_dir / META_FILE, meta)
    return TrainResult(
        run_dir=run_dir,
        num_epochs=state["epoch"],
        best_epoch=state["best_epoch"],
        best_valid_elbo=state["best_valid_elbo"],
        test_elbo=test_elbo,
        wall_seconds=meta["train_seconds"],
        stopped_early=state["stopped_early"],
    )


def _train_epochs(recipe: Recipe, inputs: Inputs, model, method, state, run_dir: Path, dev, callback, ranks=None):
    """Train from ``state`` to ``train.num_epochs`` (or an early stop); ``ranks``: data-parallel over
    torchrun's ranks, where each takes its rows of every batch and only rank 0 writes."""
    t = recipe.train
    x_train = inputs.train
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / t.batch_size)
    ckpt_path = run_dir / CHECKPOINT_FILE
    saved_epoch = state["epoch"]
    writes = ranks is None or ranks.is_main
    while state["epoch"] < t.num_epochs and not state["stopped_early"]:
        epoch = state["epoch"]
        lr = learning_rate(epoch, t.lr, t.lr_schedule)
        method.set_lr(lr)
        method.begin_epoch(epoch + 1, inputs, dev)
        order = torch.randperm(n, generator=_epoch_generator(recipe.seed, epoch, 0))
        binarize_gen = _epoch_generator(recipe.seed, epoch, 1)
        model.train()
        tic = time.time()
        sum_obj = sum_elbo = 0.0
        beta = 1.0
        for step in range(steps_per_epoch):
            idx = order[step * t.batch_size : (step + 1) * t.batch_size]
            if ranks is None:
                xb = training_batch(inputs, x_train[idx], binarize_gen).to(dev)
            else:  # this rank's rows; the batch's binarization and noise are drawn whole, as one process would
                start, stop = ranks.rows(idx.numel())
                counted = stop > start
                stop = stop if counted else start + 1  # no rows: a stand-in row that adds nothing (BatchShare)
                xb = training_batch(inputs, x_train[idx[start:stop]], binarize_gen, (idx.numel(), start)).to(dev)
                method.share = BatchShare(total=idx.numel(), start=start, reduce=ranks.reduce, counted=counted)
            beta = kl_weight(epoch, step, steps_per_epoch, t.warmup_epochs) if method.name != "iwae" else 1.0
            try:
                result = method.step(xb, beta)
            except NonFiniteLoss as exc:
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch + 1}, step {step + 1}: the loss is {exc.value}; "
                    f"the last good checkpoint (epoch {saved_epoch}) is kept in {ckpt_path}; "
                    "lower train.lr or set train.max_grad_norm, then train into a new --out"
                ) from None
            if method.share is None or method.share.counted:
                sum_obj += result.objective.double().sum().item()
                sum_elbo += result.elbo.double().sum().item()
        if ranks is not None:
            sum_obj, sum_elbo = ranks.sum([sum_obj, sum_elbo])
        seconds = time.time() - tic
        model.eval()
        state["epoch"] = epoch + 1
        stats = method.end_epoch(epoch + 1, inputs, dev)
        if stats:
            state.setdefault("method_log", []).append({"epoch": epoch + 1, **stats})
        if state["epoch"] % t.eval_every == 0 or state["epoch"] == t.num_epochs:
            # Every rank validates alike (so their generators stay in step); rank 0's value decides.
            valid_elbo = dataset_elbo(model, inputs.valid, dev)
            if ranks is not None:
                valid_elbo = ranks.main_value(valid_elbo)
            if not math.isfinite(valid_elbo):
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch + 1}: the validation ELBO is {valid_elbo}; "
                    f"the last good checkpoint (epoch {saved_epoch}) is kept in {ckpt_path}; lower train.lr"
                )
            if valid_elbo > state["best_valid_elbo"]:
                state.update(best_valid_elbo=valid_elbo, best_epoch=epoch + 1, epochs_since_best=0)
                if writes:
                    state["best_model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                state["epochs_since_best"] += t.eval_every
            if t.early_stopping_patience is not None and state["epochs_since_best"] >= t.early_stopping_patience:
                state["stopped_early"] = True
        else:
            valid_elbo = float("nan")
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "kl_weight": beta,
            "train_objective": sum_obj / n,
            "train_elbo": sum_elbo / n,
            "valid_elbo": valid_elbo,
            "seconds": seconds,
            "images_per_s": n / max(seconds, 1e-9),
        }
        state["log"].append(row)
        if writes:
            state["model"] = model.state_dict()
            state["optimizer"] = method.state_dict()
            state["rng"] = torch.get_rng_state()
        if writes and state["epoch"] in t.keep_checkpoints:
            # Before the checkpoint: a kill between the two retrains this epoch and writes it again.
            save_torch(kept_checkpoint_path(run_dir, state["epoch"]), {"model": model.state_dict(),
                                                                       "epoch": state["epoch"]})
        if state["epoch"] % t.checkpoint_every == 0 or state["epoch"] == t.num_epochs or state["stopped_early"]:
            if writes:
                save_torch(ckpt_path, state)
                _write_log(run_dir, state["log"], state.get("method_log"))
            saved_epoch = state["epoch"]
        if callback is not None and writes:
            callback(row)
    method.share = None
    return state
