"""gapbench evaluate-gaps: the gap decomposition of a trained run, saved batch by batch.

Datapoints are chosen reproducibly (a seeded permutation of the split). Each
stage (one estimator) runs over batches of them; every finished (stage, batch)
is saved at once under ``gaps/.partial/<split>/``, so ``--resume`` recomputes
nothing that finished. Each (stage, batch) runs under its own seed, so a
resumed evaluation gives exactly the numbers of an uninterrupted one on CPU.
The outputs ``gaps/<split>.csv`` (one row per datapoint) and
``gaps/<split>.json`` (summary, settings, convergence traces) are written
atomically at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from gapbench.errors import GapbenchError
from gapbench.experiment import configure_threads, evaluation_split, load_inputs, load_trained_model, open_run, resolve_device
from gapbench.gaps import decompose, local_family_kwargs, local_init, run_ais, run_stage, stage_label, stage_names, summarize
from gapbench.io import load_torch, read_json, remove_stale_temporaries, save_torch, write_json, write_text
from gapbench.recipe import Recipe

log = logging.getLogger(__name__)

GAPS_DIR = "gaps"
# AIS at fewer intermediate distributions, on a few points, for the convergence figure.
AIS_SWEEP_FRACTIONS = (0.01, 0.03, 0.1, 0.3, 1.0)
AIS_SWEEP_POINTS = 20


@dataclass
class EvalSummary:
    path: Path
    split: str
    summary: Dict

    def summary_line(self) -> str:
        s = self.summary["stats"]

        def fmt(key):
            v = s.get(key)
            return "n/a" if v is None else f"{v['mean']:.2f} ± {v['se']:.2f}"

        flagged = self.summary["num_order_violations"]
        return (
            f"{self.summary['num_points']} {self.split} points: log p̂(x) {fmt('log_px')}, L[q] {fmt('elbo_q')}, "
            f"approximation gap {fmt('approximation_gap')}, amortization gap {fmt('amortization_gap')} nats"
            f"{f'; {flagged} points with bounds in the wrong order (flagged)' if flagged else ''} -> {self.path}"
        )


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


def _fingerprint(settings: Dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _stage_seed(seed: int, stage: str, batch: int) -> int:
    digest = hashlib.sha256(f"{seed}/{stage}/{batch}".encode()).digest()
    return int.from_bytes(digest[:6], "little")


def evaluate_run(
    run_dir,
    overrides: Sequence[str] = (),
    device: Optional[str] = None,
    resume: bool = False,
    callback: Optional[Callable[[str, int, int], None]] = None,
    settings_from: Optional[Recipe] = None,
) -> EvalSummary:
    """Decompose the gaps of a trained run; ``callback(stage_label, batches_done, num_batches)`` reports progress.

    The evaluation settings are the run's recipe.yaml with ``overrides``, or, when
    ``settings_from`` is given (``gapbench run``), that recipe's evaluate section,
    device and thread count.
    """
    _check_overrides(overrides)
    run = open_run(run_dir, overrides)
    if settings_from is not None:
        run.recipe = dataclasses.replace(
            run.recipe,
            evaluate=settings_from.evaluate,
            device=settings_from.device,
            num_threads=settings_from.num_threads,
        )
    recipe = run.recipe
    cfg = recipe.evaluate
    dev = resolve_device(device or recipe.device)
    inputs = load_inputs(recipe)
    configure_threads(recipe)
    x_all = evaluation_split(inputs, recipe, cfg.split)
    idx = select_points(x_all.shape[0], cfg.num_points, recipe.seed, cfg.split)
    model = load_trained_model(run, inputs, dev)
    encoder_family = recipe.model.encoder
    stages = stage_names(cfg, encoder_family)
    families = [s.split("_", 1)[1] for s in stages if s.startswith("local_")]

    # What every batch file depends on: the points and how they are batched. Each stage's
    # files also carry a key of that stage's own settings, so changing one stage's settings
    # (or the list of families) keeps every other stage's finished batches.
    settings = {"seed": recipe.seed, "points": idx.tolist(), "batch_size": cfg.batch_size}
    gaps_dir = run.path / GAPS_DIR
    partial = gaps_dir / ".partial" / cfg.split
    stamp = partial / "settings.json"
    fingerprint = _fingerprint(settings)
    if partial.exists() and not (resume and stamp.exists() and read_json(stamp).get("fingerprint") == fingerprint):
        if resume and stamp.exists():
            log.warning("the saved partial evaluation used other points or batches; starting over")
        shutil.rmtree(partial)
    # A kill during an atomic write leaves its temporary behind; nothing reads it, so clear it.
    remove_stale_temporaries(partial)
    if not stamp.exists():
        write_json(stamp, {"fingerprint": fingerprint, "settings": settings})
    keys = {stage: _stage_key(stage, cfg) for stage in stages + ["ais_sweep"]}

    def part(stage: str, b: int) -> Path:
        return partial / f"{stage}-{keys[stage]}-{b:04d}.pt"

    batches = [idx[i : i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
    for stage in stages + (["ais_sweep"] if cfg.ais.enabled else []):
        todo = [b for b in range(len(batches)) if not part(stage, b).exists()]
        num_batches = 1 if stage == "ais_sweep" else len(batches)
        if stage == "ais_sweep":
            todo = [0] if not part(stage, 0).exists() else []
        label = stage_label(stage) if stage != "ais_sweep" else "AIS convergence sweep"
        if callback:
            callback(label, num_batches - len(todo), num_batches)
        for b in todo:
            started = time.time()
            seed = _stage_seed(recipe.seed, stage, b)
            ffg_part = part("local_ffg", b) if "local_ffg" in keys else None
            if stage == "ais_sweep":
                xb = x_all[batches[0][:AIS_SWEEP_POINTS]].to(dev)
                init = _ais_start(cfg, model, xb, ffg_part)
                result = {"columns": {}, "traces": _ais_sweep(model, xb, cfg, seed, init)}
            else:
                xb = x_all[batches[b]].to(dev)
                fam_kwargs, init = None, None
                if stage.startswith("local_"):
                    family = stage.split("_", 1)[1]
                    fam_kwargs = local_family_kwargs(family, cfg, recipe.model)
                    init = _local_start(local_init(family, cfg), model, xb, ffg_part)
                elif stage == "ais":
                    init = _ais_start(cfg, model, xb, ffg_part)
                cols, traces = run_stage(stage, model, xb, cfg, seed, fam_kwargs, init)
                result = {
                    "columns": {k: v.detach().double().cpu() for k, v in cols.items()},
                    "traces": {k: v.detach().cpu() for k, v in traces.items()},
                }
            result["seconds"] = time.time() - started  # this batch alone; the summary adds them up
            save_torch(part(stage, b), result)
            if callback:
                callback(label, num_batches - len(todo) + todo.index(b) + 1, num_batches)

    return _finish(run.path, cfg, recipe, idx, batches, stages, families, encoder_family, part, dev)


def _stage_key(stage: str, cfg) -> str:
    """A short hash of the settings a stage's results depend on."""
    if stage == "amortized":
        relevant = {"elbo_samples": cfg.elbo_samples}
    elif stage == "iwae":
        relevant = {"iwae_samples": cfg.iwae_samples}
    elif stage in ("ais", "ais_sweep"):
        relevant = dataclasses.asdict(cfg.ais)
        del relevant["compile"]  # speed only: compiled and eager AIS give the same estimates
        if cfg.ais.init == "ffg":  # AIS then starts at q*_FFG, which depends on the local settings
            relevant["local"] = dataclasses.asdict(cfg.local)
    else:  # local fits; a flow started at q*_FFG depends on the FFG fit's settings too
        relevant = dataclasses.asdict(cfg.local)
    return _fingerprint({"stage": stage, **relevant})[:8]


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

    traces = _load_part(ffg_part)["traces"]
    params = {
        "mean": traces["ffg_mean"][:num_points].to(device),
        "log_var": traces["ffg_log_var"][:num_points].to(device),
    }
    return DiagonalGaussian(model.latent_dim).posterior(params)


def _load_part(path: Path) -> Dict:
    """A finished (stage, batch) file; a damaged one is named with how to recompute it."""
    return load_torch(path, what="evaluation batch file",
                      remedy="delete it and run evaluate-gaps again with --resume, which recomputes that batch only")


def _ais_sweep(model, x, cfg, seed, init=None) -> Dict[str, torch.Tensor]:
    """AIS log p̂(x) at a grid of num_steps on a few points: [len(grid)] steps and [len(grid), n] estimates."""
    grid = sorted({max(2, int(round(cfg.ais.num_steps * f))) for f in AIS_SWEEP_FRACTIONS})
    values = [run_ais(model, x, cfg, seed, num_steps=steps, init=init).log_px.detach().double().cpu() for steps in grid]
    return {"steps": torch.tensor(grid), "log_px": torch.stack(values)}


def _finish(run_path, cfg, recipe, idx, batches, stages, families, encoder_family, part, dev) -> EvalSummary:
    columns: Dict[str, List[np.ndarray]] = {}
    traces: Dict[str, Dict] = {}
    stage_seconds: Dict[str, float] = {}
    for stage in stages:
        local_curves = []
        for b in range(len(batches)):
            saved = _load_part(part(stage, b))
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + float(saved.get("seconds", 0.0))
            for k, v in saved["columns"].items():
                columns.setdefault(k, []).append(v.numpy())
            if stage.startswith("local_") and saved["traces"]:
                local_curves.append((saved["traces"]["steps"], saved["traces"]["elbo"]))
        if local_curves:
            traces[stage] = _local_trace(local_curves)
    if cfg.ais.enabled:
        sweep = _load_part(part("ais_sweep", 0))["traces"]
        traces["ais_sweep"] = {"num_steps": sweep["steps"].tolist(), "log_px": sweep["log_px"].T.tolist()}
    cols = {k: np.concatenate(v) for k, v in columns.items()}
    df = decompose(cols, encoder_family, families)
    df.insert(0, "index", idx.numpy())
    df.insert(1, "split", cfg.split)
    summary = summarize(df, encoder_family, families)
    out = run_path / GAPS_DIR
    summary.update(
        {
            "run": recipe.name,
            "dataset": recipe.data.dataset,
            "split": cfg.split,
            "device": str(dev),
            "stage_seconds": stage_seconds,
            "settings": dataclasses.asdict(cfg),
            "traces": traces,
        }
    )
    write_text(out / f"{cfg.split}.csv", df.to_csv(index=False, float_format="%.6f"))
    write_json(out / f"{cfg.split}.json", _jsonable(summary))
    return EvalSummary(path=out / f"{cfg.split}.csv", split=cfg.split, summary=summary)


def _local_trace(curves) -> Dict:
    """Per-check ELBO of the local fits: the mean over points still running, and a few single points."""
    max_k = max(elbo.shape[0] for _, elbo in curves)
    steps = max(curves, key=lambda c: c[0].shape[0])[0]
    padded = [torch.nn.functional.pad(e, (0, 0, 0, max_k - e.shape[0]), value=float("nan")) for _, e in curves]
    elbo = torch.cat(padded, dim=1).numpy()  # [K, N], NaN after a point stopped
    # Carry each point's last value forward so the mean is over all points at every step.
    filled = elbo.copy()
    for k in range(1, filled.shape[0]):
        gap = np.isnan(filled[k])
        filled[k, gap] = filled[k - 1, gap]
    keep = ~np.all(np.isnan(elbo), axis=1)
    return {
        "steps": steps.numpy()[: max_k][keep].tolist(),
        "elbo_mean": np.nanmean(filled, axis=1)[keep].tolist(),
        "elbo_points": elbo[keep][:, : min(8, elbo.shape[1])].T.tolist(),
    }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    return obj
