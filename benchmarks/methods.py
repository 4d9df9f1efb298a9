"""What each training method costs: seconds per epoch and peak memory, against the plain VAE.

Trains the model of a recipe (default: the quickstart's digits VAE, ``recipes/methods/digits_<m>.yaml``)
for a few epochs with every method of ``train.method``, each in its own process (so each peak
resident memory is its own), one thread, and prints a table: median seconds per epoch, the ratio
to ``vae``, and the process's peak resident memory (which includes torch itself: compare with vae's).

    python benchmarks/methods.py                       # every method, 5 epochs each, digits
    python benchmarks/methods.py --methods vae,savae --epochs 3
    python benchmarks/methods.py --recipe-pattern recipes/methods/fashion_{method}.yaml --epochs 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch
from gapbench.recipe import load_recipe
from gapbench.train import train_run

recipe = load_recipe(sys.argv[1], [f"train.num_epochs={sys.argv[3]}", "num_threads=1", "train.eval_every=1000"])
torch.set_num_threads(1)
train_run(recipe, Path(sys.argv[2]))
rows = (Path(sys.argv[2]) / "train_log.csv").read_text().splitlines()[1:]
seconds = [float(r.split(",")[6]) for r in rows]
print(json.dumps({"seconds": seconds, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(method: str, pattern: str, epochs: int) -> Dict:
    recipe = REPO / pattern.format(method=method)
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, str(recipe), str(Path(tmp) / "run"), str(epochs)],
                             capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{method}: training failed: {out.stderr.strip().splitlines()[-1:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["median_s"] = statistics.median(result["seconds"])
    return result


def table(rows: Dict[str, Dict]) -> str:
    base = rows.get("vae", {}).get("median_s")
    lines = ["| method | seconds per epoch (median) | × vae | peak memory (MB, whole process) |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        ratio = f"{r['median_s'] / base:.1f}" if base else ""
        lines.append(f"| {name} | {r['median_s']:.3f} | {ratio} | {r['max_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> Dict[str, Dict]:
    from gapbench.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--recipe-pattern", default="recipes/methods/digits_{method}.yaml")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    args = parser.parse_args(argv)
    names: List[str] = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = {}
    for name in names:
        rows[name] = measure(name, args.recipe_pattern, args.epochs)
        print(f"{name}: {rows[name]['median_s']:.3f} s per epoch, {rows[name]['max_rss_mb']:.0f} MB", file=sys.stderr)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
