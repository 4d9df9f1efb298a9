"""``evaluate-gaps`` of an earlier commit against this checkout, on the same run and points, at once.

Checks the earlier commit out into a temporary git worktree, copies the run's
checkpoint, recipe and metadata into two fresh run folders, and runs both codes'
``evaluate-gaps`` side by side, one process per core with one thread each (the same
conditions for both: each shares the machine with the other), each with its own
commit's copy of ``--recipe`` for the evaluation settings. ``--alone`` runs them one
after the other instead, each with the whole machine as a user would run it: the
code of before in its one process at torch's default threads, this checkout in one
process too, or as ``--after-ranks R`` torchrun ranks of one thread each. This machine's speed drifts
by tens of percent within an hour, so ``--bracket`` (with ``--alone``) runs this checkout both before
and after the code of before, and sets the code of before against the mean of the two; and each
command alone is framed by a probe of the machine's speed (GFLOP/s of a fixed matrix product at the
command's threads) before and after it. Then it prints, per stage,
the seconds each recorded (``gaps/<split>.json``), the whole command's wall time, the
local fits' mean steps and how many stopped by their rule, and the per-datapoint
estimates of the two side by side (mean difference after - before, its standard
error, and the extremes), so that a speedup is read together with what it computed.

    python benchmarks/before_after.py --run results/cremer2018-small/fashion_ffg --before ec25fb7
    python benchmarks/before_after.py --run R --before COMMIT --points 100 --alone --after-ranks 2
    python benchmarks/before_after.py --run R --before COMMIT --points 100 --alone --bracket

The run folder needs its checkpoint (``checkpoint.pt``). Needs git and the
repository's history (a clone, not an exported tree).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/cremer2018-small/fashion_ffg.yaml"
RUN_FILES = ("checkpoint.pt", "recipe.yaml", "meta.json", "train_log.csv")
STAGES = [("amortized", "L[q]"), ("local_ffg", "local FFG"), ("local_flow", "local flow"),
          ("iwae", "IWAE"), ("ais", "AIS")]
COLUMNS = ["elbo_q", "elbo_ffg", "elbo_flow", "iwae", "ais", "log_px"]


def _fail(message: str) -> None:
    """One line on stderr and exit status 2, as gapbench's own commands answer bad input."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _copy_run(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for name in RUN_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _command(code: Path, run: Path, args, ranks: int = 1) -> List[str]:
    """evaluate-gaps of the code at ``code`` (one process, or ``ranks`` torchrun ranks)."""
    evaluate = ["evaluate-gaps", str(run), "--num-points", str(args.points), "--split", args.split,
                "--recipe", str(code / args.recipe)]
    if ranks > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                "-m", "gapbench.cli", *evaluate]
    main = "import sys; sys.argv[0] = 'gapbench'; from gapbench.cli import main; main()"
    return [sys.executable, "-c", main, *evaluate]


def _launch(code: Path, run: Path, args, log: Path, ranks: int = 1):
    """Start one side. Side by side each process gets one thread; alone, torch's default (all cores),
    or one thread per rank under torchrun (its own default)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(code)
    if not args.alone:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = log.open("w")
    return subprocess.Popen(_command(code, run, args, ranks), cwd=code, env=env,
                            stdout=out, stderr=subprocess.STDOUT), out


def _wait(procs, started: List[float]) -> List[float]:
    """Wait for every process; each one's wall time from its own start."""
    walls = [math.nan] * len(procs)
    while any(math.isnan(w) for w in walls):
        for i, (p, _) in enumerate(procs):
            if math.isnan(walls[i]) and p.poll() is not None:
                walls[i] = time.perf_counter() - started[i]
        time.sleep(0.2)
    return walls


def probe(threads: int = 0, seconds: float = 2.0) -> float:
    """This machine's speed now: GFLOP/s of the decoder's largest product (1,000 x 200 by 200 x 784,
    float32) repeated for about ``seconds``, at ``threads`` torch threads (0: torch's default)."""
    import torch

    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(1000, 200, generator=gen), torch.randn(200, 784, generator=gen)
        for _ in range(20):
            a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(20):
                a @ b
            count += 20
        return 2 * 1000 * 200 * 784 * count / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(saved)


def _mean_summary(summaries: List[Dict]) -> Dict:
    """The first summary, with each stage's seconds the mean over all of them (repeated runs of one code)."""
    merged = dict(summaries[0])
    merged["stage_seconds"] = {k: sum(s["stage_seconds"][k] for s in summaries) / len(summaries)
                               for k in summaries[0]["stage_seconds"]}
    return merged


def _summary(run: Path, split: str) -> Dict:
    return json.loads((run / "gaps" / f"{split}.json").read_text())


def _csv(run: Path, split: str):
    import pandas as pd

    return pd.read_csv(run / "gaps" / f"{split}.csv")


def stage_table(before: Dict, after: Dict, walls, after_ranks: int = 1) -> str:
    """Per stage and in all, with speedups; with ``after_ranks`` > 1 the after side's stage seconds add up
    its ranks' time, so only the whole command's wall times are compared."""
    lines = ["| stage | seconds, before | seconds, after | speedup | mean steps | stopped by the rule |",
             "|---|---:|---:|---:|---:|---:|"]

    def ratio(b: float, a: float) -> str:
        return f"{b / a:.1f}x" if after_ranks == 1 else ""

    conv_b = before.get("convergence", {}).get("local", {})
    conv_a = after.get("convergence", {}).get("local", {})
    for key, label in STAGES:
        b, a = before["stage_seconds"].get(key), after["stage_seconds"].get(key)
        if b is None or a is None:
            continue
        steps = conv = ""
        family = key.split("_", 1)[1] if key.startswith("local_") else None
        if family in conv_b and family in conv_a:
            fb, fa = conv_b[family], conv_a[family]
            steps = f"{fb['mean_steps']:,.0f} → {fa['mean_steps']:,.0f}"
            conv = f"{fb['converged']}/{fb['num_points']} → {fa['converged']}/{fa['num_points']}"
        lines.append(f"| {label} | {b:,.1f} | {a:,.1f} | {ratio(b, a)} | {steps} | {conv} |")
    sb, sa = sum(before["stage_seconds"].values()), sum(after["stage_seconds"].values())
    total = f"**{ratio(sb, sa)}**" if after_ranks == 1 else ""
    lines.append(f"| **all stages** | **{sb:,.1f}** | **{sa:,.1f}** | {total} | | |")
    lines.append(f"| **evaluate-gaps, wall** | **{walls[0]:,.1f}** | **{walls[1]:,.1f}** | "
                 f"**{walls[0] / walls[1]:.1f}x** | | |")
    return "\n".join(lines)


def estimate_table(before, after) -> str:
    lines = ["| per datapoint | before | after | after − before (mean ± se) | smallest | largest |",
             "|---|---:|---:|---:|---:|---:|"]
    same = list(before["index"]) == list(after["index"])
    if not same:
        return "(the two evaluations chose different datapoints: no per-datapoint comparison)"
    for col in COLUMNS:
        if col not in before or col not in after:
            continue
        d = (after[col] - before[col]).to_numpy()
        d = d[~(after[col].isna() | before[col].isna()).to_numpy()]
        se = d.std(ddof=1) / math.sqrt(d.size) if d.size > 1 else math.nan
        lines.append(f"| {col} | {before[col].mean():.3f} | {after[col].mean():.3f} | {d.mean():+.3f} ± {se:.3f} "
                     f"| {d.min():+.3f} | {d.max():+.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained run folder with its checkpoint.pt")
    parser.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--points", type=int, default=25, help="datapoints (default 25: one batch of the recipe)")
    parser.add_argument("--recipe", default=RECIPE, help="recipe file for the evaluate settings, relative to "
                        "each checkout (each code reads its own commit's copy); an absolute path serves both")
    parser.add_argument("--split", default="test")
    parser.add_argument("--alone", action="store_true", help="run the two one after the other, each with the "
                        "whole machine (before: one process at torch's default threads), instead of side by side")
    parser.add_argument("--after-ranks", type=int, default=1, help="with --alone: run this checkout as this many "
                        "torchrun ranks, one thread each (the code of before has one process only)")
    parser.add_argument("--bracket", action="store_true", help="with --alone: run this checkout before and after "
                        "the code of before, and compare with the mean of the two (the machine's speed drifts)")
    parser.add_argument("--work", default=None, help="folder for the two run copies and logs (default: a temporary one)")
    args = parser.parse_args(argv)

    if args.after_ranks < 1 or (args.after_ranks > 1 and not args.alone):
        _fail("--after-ranks takes a positive count and needs --alone (side by side, each side has one core)")
    if args.bracket and not args.alone:
        _fail("--bracket needs --alone (it runs this checkout before and after the code of before, each alone)")
    run = Path(args.run).resolve()
    if not (run / "checkpoint.pt").is_file():
        _fail(f"{run} has no checkpoint.pt; give --run a trained run folder (`make bench-evaluation` "
              "trains one into runs/bench/fashion_ffg_50ep)")
    work = Path(args.work or tempfile.mkdtemp(prefix="before_after_")).resolve()
    tree = work / "before_code"
    for sub in ("before_run", "after_run", "after2_run", "before_code"):
        if (work / sub).exists():
            _fail(f"{work / sub} exists; give an empty --work folder")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", args.before + "^{commit}"],
                            capture_output=True, text=True)
    if commit.returncode:
        _fail(f"{args.before!r} is not a commit of this repository ({' '.join(commit.stderr.split())})")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit.stdout.strip()],
                   check=True, capture_output=True)
    try:
        _copy_run(run, work / "before_run")
        _copy_run(run, work / "after_run")
        if args.bracket:
            _copy_run(run, work / "after2_run")
        how = (f"one after the other, each alone on the machine (before: one process, torch's default threads; "
               f"after: {'one process' if args.after_ranks == 1 else f'{args.after_ranks} torchrun ranks'})"
               if args.alone else "both at once, one thread each")
        if args.bracket:
            how += "; this checkout runs before and after the code of before"
        print(f"{run}: {args.points} {args.split} points; before {commit.stdout.strip()[:10]}, after this checkout; "
              f"{how}; logs in {work}", flush=True)
        names = ("before", "after", "after2")  # how the results are read, whatever order the runs took
        sides = [(tree, "before", 1), (REPO, "after", args.after_ranks)]
        if args.bracket:
            sides = [(REPO, "after", args.after_ranks), (tree, "before", 1), (REPO, "after2", args.after_ranks)]
        if args.alone:
            procs, walls = [], []
            for code, name, ranks in sides:
                threads = 1 if ranks > 1 else 0  # each rank's, or torch's default
                speed = probe(threads)
                started = [time.perf_counter()]
                procs.append(_launch(code, work / f"{name}_run", args, work / f"{name}.log", ranks))
                walls += _wait(procs[-1:], started)
                print(f"{name}: {walls[-1]:,.1f} s; the machine's speed ({'1 thread' if threads else 'default threads'})"
                      f" {speed:.0f} GFLOP/s before it, {probe(threads):.0f} after", flush=True)
            index = {name: i for i, (_, name, _) in enumerate(sides)}
            ran = [index[name] for name in names[:len(sides)]]
            procs, walls = [procs[i] for i in ran], [walls[i] for i in ran]
        else:
            started = [time.perf_counter()] * 2
            procs = [_launch(code, work / f"{name}_run", args, work / f"{name}.log", ranks)
                     for code, name, ranks in sides]
            walls = _wait(procs, started)
        for i, (p, out) in enumerate(procs):
            out.close()
            if p.returncode:
                _fail(f"the {names[i]} evaluation failed (exit {p.returncode}); see {work / (names[i] + '.log')}")
        before, after = _summary(work / "before_run", args.split), _summary(work / "after_run", args.split)
        if args.bracket:
            after = _mean_summary([after, _summary(work / "after2_run", args.split)])
            print(f"(after: the mean of this checkout's two runs, {walls[1]:,.1f} s before the code of before and "
                  f"{walls[2]:,.1f} s after it: {walls[0] / walls[1]:.1f}x and {walls[0] / walls[2]:.1f}x alone)")
            walls = [walls[0], (walls[1] + walls[2]) / 2]
            first, second = _csv(work / "after_run", args.split), _csv(work / "after2_run", args.split)
            cols = [c for c in COLUMNS if c in first]
            print(f"(its two runs' estimates differ by at most {(first[cols] - second[cols]).abs().max().max():.2g} "
                  "nats at any point)")
        print(stage_table(before, after, walls, args.after_ranks))
        if args.after_ranks > 1:
            print(f"(after: each stage's seconds add up its {args.after_ranks} ranks' time; the wall is the command's)")
        print()
        print(estimate_table(_csv(work / "before_run", args.split), _csv(work / "after_run", args.split)))
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)


if __name__ == "__main__":
    main()
