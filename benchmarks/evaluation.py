"""The whole gap evaluation of a CPU-budget Table 2 model, stage by stage, against a converged reference.

Trains the Fashion-MNIST FFG model of ``recipes/cremer2018-small/fashion_ffg.yaml``
(or opens a run folder given with ``--run``), takes the first ``--points`` of the
datapoints its evaluation selects, and runs every stage of ``evaluate-gaps`` with the
recipe's evaluation settings (``--set evaluate.k=v`` overrides any), in the recipe's
batches (``evaluate.batch_size``) with each batch's seeds, as ``evaluate-gaps`` runs them.
Per stage it prints wall time, steps taken and fits converged;
for the local fits also their accuracy against the *reference*: the run's own
local-fit settings (without the ``--set`` overrides) with 4x the step budget and
twice the patience, from the same start. Accuracy is the
mean of L[q*]_fast - L[q*]_reference (target: within 0.05 nats) and the largest
shortfall of a single point (target: at most 0.2 nats).

    python benchmarks/evaluation.py                     # trains 50 epochs (~10 min), 16 points
    python benchmarks/evaluation.py --run runs/fashion_ffg --points 25
    python benchmarks/evaluation.py --run R --set evaluate.local.flow_lr=3e-3 --no-reference
    python benchmarks/evaluation.py --profile flow      # per-step cost of the local flow fit against step count
    python benchmarks/evaluation.py --run R --before    # also the local fits of before the fast procedure: speedups
    python benchmarks/evaluation.py --compare B.json A.json   # the speedup table of two runs made apart

The two halves of ``--before`` can run at once, one per core: the fast fits with
``--json A.json``, the fits of before with ``--no-reference --json B.json`` and the
``--set``s that ``--before`` adds (printed by it; :data:`BEFORE`); ``--compare`` joins them.

The reference fits are the slow part (4x the steps); ``--no-reference`` skips them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cremer2018-small" / "fashion_ffg.yaml"


def _run_folder(args) -> Path:
    """The run to evaluate: ``--run``, or one trained here into ``--work``."""
    from gapbench.recipe import load_recipe
    from gapbench.train import train_run

    if args.run is not None:
        return Path(args.run)
    out = Path(args.work) / f"fashion_ffg_{args.epochs}ep"
    if not (out / "meta.json").is_file():
        recipe = load_recipe(RECIPE, [f"train.num_epochs={args.epochs}", f"num_threads={args.threads}"])
        t0 = time.perf_counter()
        train_run(recipe, out, device="cpu", resume=(out / "checkpoint.pt").is_file())
        print(f"trained {args.epochs} epochs in {time.perf_counter() - t0:.0f} s -> {out}", file=sys.stderr)
    return out


def _setup(run_dir: Path, settings: Path, overrides: List[str], num_points: int):
    """The run's model and the first ``num_points`` evaluation points, with the evaluate section of
    ``settings`` (a recipe file) and ``overrides`` (as ``evaluate-gaps --recipe FILE --set ...``)."""
    from gapbench.evaluate import select_points
    from gapbench.experiment import evaluation_split, load_inputs, load_trained_model, open_run
    from gapbench.recipe import load_recipe

    run = open_run(run_dir)
    recipe = dataclasses.replace(
        run.recipe, evaluate=load_recipe(settings, overrides, require_data=False).evaluate)
    cfg = recipe.evaluate
    inputs = load_inputs(recipe)
    x_all = evaluation_split(inputs, recipe, cfg.split)
    idx = select_points(x_all.shape[0], cfg.num_points, recipe.seed, cfg.split)[:num_points]
    model = load_trained_model(run, inputs, torch.device("cpu"))
    return recipe, model, x_all[idx]


def _timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def evaluate_stages(recipe, model, x, reference: bool, reference_local=None) -> List[Dict]:
    """Every stage of the evaluation on x, batch by batch as evaluate-gaps runs it (evaluate.batch_size,
    batch b with batch b's seeds); one row per stage (and reference), over all batches."""
    size = recipe.evaluate.batch_size
    per_batch = [_batch_stages(recipe, model, x[i: i + size], b, reference, reference_local)
                 for b, i in enumerate(range(0, x.shape[0], size))]
    return [_merge_rows(rows) for rows in zip(*per_batch)]


#: How a row's entries combine over batches: summed, the largest, or averaged over datapoints.
_SUMMED = ("seconds", "points", "converged", "ref_seconds", "ref_converged")
_LARGEST = ("max_steps_taken", "worst_shortfall")


def _merge_rows(rows) -> Dict:
    """One stage's rows of every batch as one row over all their datapoints."""
    total = sum(r["points"] for r in rows)
    merged = {"stage": rows[0]["stage"]}
    for key in rows[0]:
        if key == "stage":
            continue
        values = [r[key] for r in rows]
        if key in _SUMMED:
            merged[key] = sum(values)
        elif key in _LARGEST:
            merged[key] = max(values)
        else:  # a mean over the batch's datapoints
            merged[key] = sum(v * r["points"] for v, r in zip(values, rows)) / total
    return merged


def _batch_stages(recipe, model, x, batch: int, reference: bool, reference_local=None) -> List[Dict]:
    """Every stage of the evaluation on one batch x, with batch ``batch``'s seeds; one row per stage.

    The reference of a local fit is ``reference_local`` (the recipe's own local settings, before any
    --set) with 4x max_steps and twice the patience, from the same start.
    """
    from gapbench.evaluate import _stage_seed
    from gapbench.gaps import local_family_kwargs, local_init, run_stage, stage_names
    from gapbench.models.posterior import DiagonalGaussian

    cfg = recipe.evaluate
    rows, ffg = [], {}

    def start(family, fit_cfg):
        where = local_init(family, fit_cfg)
        if where == "prior":
            return None
        if where == "encoder":
            with torch.no_grad():
                return model.posterior(x).detach()
        p = ffg["params"]
        return DiagonalGaussian(model.latent_dim).posterior({"mean": p[0], "log_var": p[1]})

    for stage in stage_names(cfg, recipe.model.encoder):
        seed = _stage_seed(recipe.seed, stage, batch)
        family = stage.split("_", 1)[1] if stage.startswith("local_") else None
        kwargs = local_family_kwargs(family, cfg, recipe.model) if family else None
        if family:
            init = start(family, cfg)
        elif stage == "ais" and cfg.ais.init == "ffg":  # AIS from each point's fitted q*_FFG
            p = ffg["params"]
            init = DiagonalGaussian(model.latent_dim).posterior({"mean": p[0], "log_var": p[1]})
        else:
            init = None
        (cols, traces), seconds = _timed(lambda: run_stage(stage, model, x, cfg, seed, kwargs, init))
        row = {"stage": stage, "seconds": seconds, "points": int(x.shape[0])}
        if family:
            row.update(_fit_stats(cols, family))
            if family == "ffg":
                ffg["params"] = (traces["ffg_mean"], traces["ffg_log_var"])
                ffg["cols"] = cols
            if reference:
                base = reference_local or cfg.local
                ref_cfg = dataclasses.replace(cfg, local=dataclasses.replace(
                    base, max_steps=4 * base.max_steps, patience=2 * base.patience))
                ref_init = start(family, ref_cfg)  # the flow's reference starts at the same (fast) q*_FFG
                (ref_cols, _), ref_seconds = _timed(lambda: run_stage(stage, model, x, ref_cfg, seed, kwargs, ref_init))
                diff = (cols[f"elbo_{family}"] - ref_cols[f"elbo_{family}"]).double()
                row.update({"ref_seconds": ref_seconds, "ref_elbo": float(ref_cols[f"elbo_{family}"].double().mean()),
                            "ref_mean_steps": float(ref_cols[f"steps_{family}"].double().mean()),
                            "ref_converged": int(ref_cols[f"converged_{family}"].sum()),
                            "diff_mean": float(diff.mean()), "worst_shortfall": float((-diff).max())})
        elif stage == "ais":
            row["estimate"] = float(cols["ais"].double().mean())
        elif stage == "iwae":
            row["estimate"] = float(cols["iwae"].double().mean())
        else:
            row["estimate"] = float(cols["elbo_q"].double().mean())
        rows.append(row)
    return rows


def _fit_stats(cols, family: str) -> Dict:
    steps = cols[f"steps_{family}"].double()
    return {"estimate": float(cols[f"elbo_{family}"].double().mean()), "mean_steps": float(steps.mean()),
            "max_steps_taken": int(steps.max()), "converged": int(cols[f"converged_{family}"].sum())}


def table(rows: List[Dict]) -> str:
    head = ("| stage | points | seconds | mean steps | converged | estimate | reference s | reference steps "
            "| L[q*] - reference (mean) | worst point |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        def f(key, fmt):
            return format(r[key], fmt) if key in r else ""

        converged = f"{r['converged']}/{r['points']}" if "converged" in r else ""
        lines.append(
            f"| {r['stage']} | {r['points']} | {r['seconds']:.1f} | {f('mean_steps', '.0f')} | {converged} | "
            f"{f('estimate', '.3f')} | {f('ref_seconds', '.1f')} | {f('ref_mean_steps', '.0f')} | "
            f"{f('diff_mean', '+.3f')} | {f('worst_shortfall', '.3f')} |"
        )
    total = sum(r["seconds"] for r in rows)
    lines.append(f"| **all stages** | | **{total:.1f}** | | | | | | | |")
    return "\n".join(lines)


def profile_fit(recipe, model, x, family: str, window: int = 100) -> str:
    """Seconds per optimization step of a local fit against the step count (as points converge and leave)."""
    from gapbench.evaluate import _stage_seed
    from gapbench.gaps import local_family_kwargs, run_stage

    cfg = recipe.evaluate
    marks: List[tuple] = []
    t0 = time.perf_counter()

    def progress(done, total):
        marks.append((time.perf_counter() - t0, done, total))

    init = None
    if family == "flow" and cfg.local.flow_init == "ffg":
        from gapbench.models.posterior import DiagonalGaussian

        _, tr = run_stage("local_ffg", model, x, cfg, _stage_seed(recipe.seed, "local_ffg", 0))
        init = DiagonalGaussian(model.latent_dim).posterior({"mean": tr["ffg_mean"], "log_var": tr["ffg_log_var"]})
        t0 = time.perf_counter()
    elif cfg.local.init == "encoder":
        init = model.posterior(x).detach()
    run_stage(f"local_{family}", model, x, cfg, _stage_seed(recipe.seed, f"local_{family}", 0),
              local_family_kwargs(family, cfg, recipe.model), init, progress_fn=progress)
    lines = ["| elapsed s | point-steps done | point-steps/s since last mark |", "|---|---|---|"]
    last = (0.0, 0)
    for t, done, _ in marks[:: max(1, len(marks) // 20)]:
        rate = (done - last[1]) / max(t - last[0], 1e-9)
        lines.append(f"| {t:.1f} | {done} | {rate:.0f} |")
        last = (t, done)
    return "\n".join(lines)


#: The CPU-budget recipe's local fits before the fast procedure became the default: the paper's
#: procedure (Adam 1e-3, 50-sample total gradients, checks every 100 steps, patience 10), started at
#: the encoder's q (FFG) and at q*_FFG (flow).
BEFORE = ["evaluate.local.procedure=paper", "evaluate.local.init=encoder", "evaluate.local.flow_init=ffg"]


def compare_table(before: List[Dict], after: List[Dict]) -> str:
    """Per stage: seconds, steps, fits converged and the estimate, before and after, and the speedup."""
    lines = ["| stage | seconds before | seconds after | speedup | mean steps before | after | converged before "
             "| after | estimate before | after |", "|" + "---|" * 10]
    old = {r["stage"]: r for r in before}
    for r in after:
        b = old.get(r["stage"])
        if b is None:
            continue

        def f(row, key, fmt):
            return format(row[key], fmt) if key in row else ""

        conv = {k: f"{row['converged']}/{row['points']}" if "converged" in row else "" for k, row in (("b", b), ("a", r))}
        lines.append(f"| {r['stage']} | {b['seconds']:.1f} | {r['seconds']:.1f} | {b['seconds'] / r['seconds']:.1f}x | "
                     f"{f(b, 'mean_steps', '.0f')} | {f(r, 'mean_steps', '.0f')} | {conv['b']} | {conv['a']} | "
                     f"{f(b, 'estimate', '.3f')} | {f(r, 'estimate', '.3f')} |")
    tb, ta = sum(r["seconds"] for r in before), sum(r["seconds"] for r in after)
    lines.append(f"| **all stages** | **{tb:.1f}** | **{ta:.1f}** | **{tb / ta:.1f}x** | | | | | | |")
    return "\n".join(lines)


def _rows(path: Path, key: str) -> List[Dict]:
    """The rows of a --json output: the list itself, or its ``key`` part (a --before run's)."""
    data = json.loads(path.read_text())
    return data[key] if isinstance(data, dict) else data


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a trained run folder (default: train one into --work)")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench"), help="where the benchmark trains its model")
    parser.add_argument("--epochs", type=int, default=50, help="epochs of the model trained here (the recipe: 50)")
    parser.add_argument("--recipe", default=str(RECIPE), help="the recipe whose evaluate section is timed")
    parser.add_argument("--points", type=int, default=16, help="datapoints (the first of the evaluation's selection)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="evaluate.KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-reference", action="store_true", help="skip the 4x-budget reference fits")
    parser.add_argument("--before", action="store_true",
                        help="also time every stage with the local fits of before the fast procedure and compare")
    parser.add_argument("--profile", choices=["ffg", "flow"], default=None, help="per-step cost of one local fit")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE.json", "AFTER.json"), default=None,
                        help="print the speedup table of two --json outputs (the fits of before, the fast ones)")
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (_rows(Path(p), key) for p, key in zip(args.compare, ("before", "after")))
        print(compare_table(before, after))
        return after
    torch.set_num_threads(args.threads)
    run_dir = _run_folder(args)
    recipe, model, x = _setup(run_dir, Path(args.recipe), args.overrides, args.points)
    model.requires_grad_(False)
    print(f"{run_dir}: {args.points} test points, torch {torch.__version__}, {args.threads} thread(s); "
          f"evaluate.local = {dataclasses.asdict(recipe.evaluate.local)}")
    if args.profile:
        print(profile_fit(recipe, model, x, args.profile))
        return []
    own = _setup(run_dir, Path(args.recipe), [], 1)[0].evaluate.local  # the reference: the recipe's own, 4x/2x
    rows = evaluate_stages(recipe, model, x, reference=not args.no_reference, reference_local=own)
    print(table(rows))
    result = {"after": rows}
    if args.before:
        old = _setup(run_dir, Path(args.recipe), args.overrides + BEFORE, args.points)[0]
        print(f"\nbefore: {' '.join('--set ' + b for b in BEFORE)}")
        before = evaluate_stages(old, model, x, reference=False)
        print(table(before))
        print()
        print(compare_table(before, rows))
        result["before"] = before
    if args.json:
        Path(args.json).write_text(json.dumps(result if args.before else rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
