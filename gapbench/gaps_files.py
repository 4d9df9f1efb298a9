"""The gaps files of an evaluation: the per-datapoint table and its summary, made from the saved batches.

``gaps/<split>.csv`` has one row per datapoint (its index into the split, its class
label when the dataset has labels, every estimate, gap, convergence and order flag);
``gaps/<split>.json`` the means and standard errors, violations, convergence
(:mod:`gapbench.convergence`) and its warnings, the diagnostics the recipe asked for
(:mod:`gapbench.diagnostics`), the settings, the provenance (:mod:`gapbench.provenance`)
and convergence traces. Both are written atomically, and only from batches whose
provenance matches the evaluation's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from gapbench.errors import GapbenchError
from gapbench.gaps import decompose, summarize
from gapbench.io import load_torch, write_json, write_text

log = logging.getLogger("gapbench.evaluate")  # its warnings read as the evaluation's

GAPS_DIR = "gaps"


@dataclass
class EvalSummary:
    path: Path
    split: str
    summary: Dict
    reused: bool = False  # True: an up-to-date evaluation was found and nothing was computed
    waiting: str = ""  # an array shard that finished its share before the others: what is still missing

    def summary_line(self) -> str:
        from gapbench.convergence import summary_text

        if self.waiting:
            return (f"this shard's batches are done; {self.waiting}. The last shard to finish writes {self.path} "
                    "(or, once all have run: the same command with --merge in place of --shard)")
        s = self.summary["stats"]

        def fmt(key):
            v = s.get(key)
            return "n/a" if v is None else f"{v['mean']:.2f} ± {v['se']:.2f}"

        flagged = self.summary["num_order_violations"]
        conv = summary_text(self.summary.get("convergence", {}))
        refined = (f" ({fmt('refinement_gain')} closed by refinement, {fmt('remaining_amortization_gap')} remaining)"
                   if "refinement_gain" in s else "")
        return (
            f"{self.summary['num_points']} {self.split} points: log p̂(x) {fmt('log_px')}, L[q] {fmt('elbo_q')}, "
            f"approximation gap {fmt('approximation_gap')}, amortization gap {fmt('amortization_gap')}{refined} nats"
            f"{f'; {flagged} points with bounds in the wrong order (flagged)' if flagged else ''}"
            f"{f'; {conv}' if conv else ''} -> {self.path}"
        )


def load_batch(path: Path) -> Dict:
    """A finished (stage, batch) file; a damaged one is named with how to recompute it."""
    return load_torch(path, what="evaluation batch file",
                      remedy="delete it and run evaluate-gaps again with --resume, which recomputes that batch only")


def write_gaps_files(run, cfg, recipe, idx, batches, stages, families, encoder_family, part, dev, provenance,
                     labels: Optional[np.ndarray] = None) -> EvalSummary:
    """Assemble gaps/<split>.csv and .json from the saved batches (``part(stage, b)`` names each file).

    Every batch must carry the evaluation's provenance fingerprint; one that does not is an error,
    so results of two checkpoints, datasets or code versions are never mixed. A "refined" stage
    (a method's test-time refinement) adds L[q_refined] and the split of the amortization gap.
    ``labels`` [len(idx)]: the class labels of the points, a column of the CSV (None: no labels).
    The summary's "diagnostics" holds what ``cfg.diagnostics`` asks for: the model diagnostics of
    the stage "diagnostics" and, with labels, the gaps per class.
    """
    from gapbench.convergence import ais_convergence, local_convergence, warnings_for

    columns: Dict[str, List[np.ndarray]] = {}
    traces: Dict[str, Dict] = {}
    stage_seconds: Dict[str, float] = {}
    refined_families = set()  # of q_refined, per batch of the refined stage

    def load(path: Path) -> Dict:
        saved = load_batch(path)
        made = (saved.get("provenance") or {}).get("fingerprint")
        if made != provenance["fingerprint"]:  # never mix results of two checkpoints, datasets or code versions
            raise GapbenchError(
                f"{path} was made with other inputs than the rest of this evaluation; "
                "delete it and run evaluate-gaps again with --resume, which recomputes that batch only"
            )
        return saved

    for stage in stages:
        local_curves = []
        for b in range(len(batches)):
            saved = load(part(stage, b))
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + float(saved.get("seconds", 0.0))
            for k, v in saved["columns"].items():
                columns.setdefault(k, []).append(v.numpy())
            if stage == "refined":
                refined_families.add(saved.get("refined_family"))
            if stage.startswith("local_") and saved["traces"]:
                local_curves.append((saved["traces"]["steps"], saved["traces"]["elbo"]))
        if local_curves:
            traces[stage] = _local_trace(local_curves)
    convergence: Dict = {}
    if cfg.ais.enabled:
        sweep = load(part("ais_sweep", 0))["traces"]
        traces["ais_sweep"] = {"num_steps": sweep["steps"].tolist(), "log_px": sweep["log_px"].T.tolist()}
        convergence["ais"] = ais_convergence(sweep["steps"].tolist(), sweep["log_px"].numpy(),
                                             cfg.ais.convergence_tolerance)
    cols = {k: np.concatenate(v) for k, v in columns.items()}
    # The family of q_refined decides which bound orders it must keep; batches that disagree leave it unknown.
    refined_family = refined_families.pop() if len(refined_families) == 1 else None
    df = decompose(cols, encoder_family, families, refined_family)
    df.insert(0, "index", idx.numpy())
    df.insert(1, "split", cfg.split)
    if labels is not None:
        df.insert(2, "label", np.asarray(labels, dtype=np.int64))
    summary = summarize(df, encoder_family, families, refined_family)
    if "refined" in stages:
        from gapbench.methods import method_name

        summary["refinement"] = {"method": method_name(recipe.train), "family": refined_family}
    convergence["local"] = local_convergence(df, families, cfg.local.max_steps)
    if convergence.get("ais") is None:
        convergence.pop("ais", None)
    diagnostics = _diagnostics(cfg, df, labels, load, part, stage_seconds)
    warnings = warnings_for(convergence)
    for line in warnings:
        log.warning("%s", line)
    out = run.gaps_dir  # gaps/, or gaps/epoch_<E>/ for weights kept at epoch E
    summary.update(
        {
            "run": recipe.name,
            "dataset": recipe.data.dataset,
            "split": cfg.split,
            "seed": recipe.seed,
            "device": str(dev),
            "stage_seconds": stage_seconds,
            "convergence": convergence,
            "warnings": warnings,
            **({"diagnostics": diagnostics} if cfg.diagnostics else {}),
            "settings": dataclasses.asdict(cfg),
            "provenance": provenance,
            "traces": traces,
        }
    )
    write_text(out / f"{cfg.split}.csv", df.to_csv(index=False, float_format="%.6f"))
    write_json(out / f"{cfg.split}.json", jsonable(summary))
    return EvalSummary(path=out / f"{cfg.split}.csv", split=cfg.split, summary=summary)


def _diagnostics(cfg, df, labels, load, part, stage_seconds) -> Dict:
    """The diagnostics ``cfg.diagnostics`` asks for, as plain numbers: those of the stage "diagnostics"
    (its one saved unit) and the gaps per class (with labels). Generalization needs two splits: report."""
    from gapbench.diagnostics import gaps_by_class
    from gapbench.recipe import MODEL_DIAGNOSTICS

    out: Dict = {}
    if any(name in MODEL_DIAGNOSTICS for name in cfg.diagnostics):
        saved = load(part("diagnostics", 0))
        stage_seconds["diagnostics"] = float(saved.get("seconds", 0.0))
        out.update(saved["diagnostics"])
    if "per_class" in cfg.diagnostics:
        if labels is None:
            log.warning("evaluate.diagnostics: per_class needs class labels, which this dataset does not have; "
                        "left out")
        else:
            table = gaps_by_class(df, labels)
            out["per_class"] = {str(label): {key: (int(v) if key == "count" else float(v)) for key, v in row.items()}
                                for label, row in table.iterrows()}
    return out


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


def jsonable(obj):
    """JSON-ready: tensors and NumPy scalars to Python values, non-finite floats to None (JSON has no NaN)."""
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return jsonable(obj.item())
    return obj
