"""gapbench on a GPU in one run of under 8 minutes: speed, compiled AIS, and AIS at the paper's settings.

    make gpu-check                                   # python benchmarks/gpu_check.py: one GPU, under 8 minutes
    make gpu-check GPU_CHECK_ARGS="--data-dir DIR"   # Fashion-MNIST under DIR/fashion-mnist/ (or $GAPBENCH_DATA)
    python benchmarks/gpu_check.py --quick --device cpu   # the same parts at tiny sizes: a CPU smoke run

What it runs, in this order, each part timed and kept inside ``--budget-s``:

1. the environment: torch, CUDA, the device's name and memory;
2. a Fashion-MNIST model at the CPU budget, trained here with
   ``recipes/cremer2018-small/fashion_ffg.yaml`` (50 epochs, or as many as fit
   its share of the budget after timing the first two);
3. compiled AIS (``ais(compile=True)``: torch.compile, on a GPU replayed as a
   CUDA graph) against eager AIS at the same settings and seed, on the
   pretrained MNIST VAE (``--fixture``; where it is absent, on the model of 2):
   time per transition, compile time, and how far the estimates agree;
4. on N test points of that model, AIS at the paper's settings (recipes/cremer2018/
   fashion_ffg.yaml: 10,000 steps x 100 chains from the prior, 10 leapfrog steps)
   beside the CPU budget's AIS (1,000 steps x 16 chains from each point's fitted
   q*_FFG, after that fit); N is as many points as fit the time left, chosen
   after timing a short run at the paper's settings; per point and the mean
   difference, and the time of each;
5. ``benchmarks/speed.py --device cuda --compile`` at its GPU sizes (``make
   bench``) as a subprocess with the time that is left; a run cut short leaves
   the time of each phase it finished, from its progress log.

It writes ``<out>/<device>/`` (default ``results/gpu/nvidia-h200/`` on an
H200; ``cpu-quick`` for ``--quick --device cpu``): README.md (what ran, the
settings, the tables, the total time), results.json (every number),
points.csv (part 4 per point), speed_table.md and speed_log.txt (speed.py's
output and progress log). Nothing is written elsewhere: the trained model and
speed.py's temporary files live in ``<out>/<device>/.work/``, removed at the end.

``--quick`` shrinks every part (a 1,000-image training subset, 2 epochs, 100
instead of 10,000 steps at the paper's setting, 4 points, speed.py --quick on
the digits VAE) and says so in README.md; without Fashion-MNIST it trains on
scikit-learn's digits instead, and says that too. Without ``--quick`` a missing
Fashion-MNIST is an error before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # gapbench from this checkout, installed or not

import torch  # noqa: E402

from gapbench.errors import GapbenchError  # noqa: E402
from gapbench.gaps_files import jsonable  # noqa: E402

FIXTURE = REPO.parent / "shared" / "fixtures" / "mnist_vae_bdmc.npz"
SMALL_RECIPE = REPO / "recipes" / "cremer2018-small" / "fashion_ffg.yaml"
PAPER_RECIPE = REPO / "recipes" / "cremer2018" / "fashion_ffg.yaml"
SPEED = REPO / "benchmarks" / "speed.py"
DEFAULT_BUDGET_S = 420.0


@dataclass(frozen=True)
class Sizes:
    """How large each part is; None: the recipe's own value."""

    num_train: Optional[int]  # data.num_train (a training subset)
    max_epochs: Optional[int]  # at most this many epochs (None: the recipe's 50)
    train_share: float  # training gets at most this fraction of the budget
    graph_widths: Tuple[Tuple[int, int], ...]  # part 3: (points, chains) of each row
    graph_steps: int  # part 3: transitions of each timed run
    graph_repeats: int  # part 3: each side's fastest of this many runs
    chunk: int  # part 4: points annealed at once at the paper's settings (one compiled shape)
    probe_steps: int  # part 4: transitions of the timing run that chooses N
    paper_steps: Optional[int]  # part 4: the paper's 10,000 unless reduced
    small_steps: Optional[int]  # part 4: the CPU budget's 1,000 unless reduced
    local_max_steps: Optional[int]  # part 4: the local FFG fit's 10,000 unless reduced
    max_points: Optional[int]  # part 4: the paper's 1,000 test points at most
    speed_args: Tuple[str, ...]  # speed.py's arguments besides --device and --fixture
    speed_reserve_s: float  # part 5's share, kept free while part 4 chooses N


# speed.py at its GPU sizes runs longer than this whole check (its one-point-at-a-time references), so it
# gets what is left, at least 60 s: part 4's N comes first.
GPU = Sizes(None, None, 0.3, ((100, 100), (16, 16)), 500, 2, 100, 200, None, None, None, None, ("--compile",), 60.0)
# A CPU without --quick: the same settings, one point per chunk (one point at the paper's
# settings takes minutes on a CPU, so part 4 runs only where one fits the time left).
CPU = dataclasses.replace(GPU, graph_widths=((16, 16),), graph_steps=100, chunk=1, probe_steps=20)
QUICK = Sizes(1000, 2, 0.3, ((4, 8),), 30, 1, 2, 5, 100, 50, 300, 4, ("--quick", "--models", "digits"), 30.0)


# --------------------------------------------------------------------------- small helpers


class Clock:
    """Seconds since the start, and since/until the budget's deadline."""

    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def log(clock: Clock, msg: str) -> None:
    print(f"[{clock.elapsed():6.1f} s] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device):
    """(fn(), wall seconds), on a CUDA device between two synchronizations."""
    sync(device)
    t0 = time.perf_counter()
    value = fn()
    sync(device)
    return value, time.perf_counter() - t0


class WarningLog(logging.Handler):
    """Collects gapbench's warnings (a compile that fell back to eager, non-finite AIS estimates)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def take(self) -> List[str]:
        out, self.messages = self.messages, []
        return out


def slug(name: str) -> str:
    """A device's name as a folder name: lowercase, [a-z0-9-] only ("NVIDIA H200" -> "nvidia-h200")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def compile_failed() -> bool:
    """Whether a torch.compile of gapbench's AIS transition failed in this process (it then runs eagerly)."""
    from gapbench.inference.compiled import _CACHE

    return any(c.failed for c in _CACHE.values())


def cudagraph_skips() -> Optional[int]:
    """How often torch.compile has run a compiled graph without a CUDA graph so far (None: not known)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])
    except Exception:
        return None


def compiled_how(device: torch.device, fell_back: List[str], skips: Optional[int]) -> str:
    """What a compiled run was: "yes", "yes, without CUDA graphs (N skips)", or "no: fell back to eager"."""
    if fell_back or compile_failed():
        return "no: fell back to eager"
    if device.type == "cuda" and skips:
        return f"yes, without CUDA graphs ({skips} skip{'s' if skips > 1 else ''})"
    return "yes"


def folder_name(device: torch.device, quick: bool) -> str:
    """The results folder of this device: the GPU's name, or "cpu"; "-quick" added for --quick."""
    name = (slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "") or device.type
    return f"{name}-quick" if quick else name


def shown(path) -> str:
    """A path as the results show it: relative to the checkout (or the folder holding it) where it lies there."""
    path = Path(path).expanduser().resolve()
    for base, prefix in ((REPO, ""), (REPO.parent, "../")):
        try:
            return prefix + str(path.relative_to(base))
        except ValueError:
            continue
    return str(path)


def finite_mean(t: torch.Tensor) -> float:
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else math.nan


def stderr_of_mean(t: torch.Tensor) -> float:
    t = t[torch.isfinite(t)].double()
    return float(t.std() / math.sqrt(t.numel())) if t.numel() > 1 else math.nan


def md_table(head: List[str], rows: List[List[object]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plain(obj):
    """JSON-ready: tensors to lists, non-finite floats to None."""
    return jsonable(obj)


# --------------------------------------------------------------------------- 1. environment


def environment(device: torch.device) -> Dict:
    from gapbench import __version__
    from gapbench.io import git_state

    env = {
        "device": str(device),
        "device_name": None,
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gapbench": __version__,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    try:
        git = git_state(REPO)
        env.update(git_commit=git.get("commit"), git_dirty=git.get("dirty"))
    except Exception:  # a copy without .git
        env.update(git_commit=None, git_dirty=None)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
        env["driver"] = _nvidia_smi_driver()
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def _nvidia_smi_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# --------------------------------------------------------------------------- 2. the Fashion-MNIST model


def fashion_available(data_dir: Optional[str]) -> Tuple[bool, str]:
    """(found, where or why not) for Fashion-MNIST under --data-dir, $GAPBENCH_DATA or the usual folders."""
    from gapbench.data import available_datasets

    row = next(r for r in available_datasets(data_dir) if r.name == "fashion-mnist")
    return row.status == "available", (row.location if row.status == "available" else row.how_to_get)


def choose_dataset(data_dir: Optional[str], quick: bool) -> Dict:
    """Fashion-MNIST where found; else digits for --quick (said in the notes), else a GapbenchError."""
    found, where = fashion_available(data_dir)
    overrides = [f"data.data_dir={Path(data_dir).expanduser().resolve()}"] if data_dir else []
    if found:
        return {"dataset": "fashion-mnist", "where": shown(where), "overrides": overrides, "note": ""}
    if quick:
        return {"dataset": "digits", "where": "scikit-learn (bundled)", "overrides": ["data.dataset=digits"],
                "note": "Fashion-MNIST was not found; this quick run trained on scikit-learn's digits instead."}
    raise GapbenchError("Fashion-MNIST not found; pass --data-dir DIR with DIR/fashion-mnist/ holding its four IDX "
                        "files (or set GAPBENCH_DATA), or run with --quick")


def train_model(args, sizes: Sizes, clock: Clock, work: Path, dataset_note: Dict) -> Dict:
    """Train the CPU-budget model: 2 epochs, timed, then resumed up to 50 (or as many as fit its share)."""
    from gapbench.recipe import load_recipe
    from gapbench.train import train_run

    overrides = list(dataset_note["overrides"])
    if sizes.num_train is not None:
        overrides.append(f"data.num_train={sizes.num_train}")
    target = load_recipe(SMALL_RECIPE, overrides).train.num_epochs
    if sizes.max_epochs is not None:
        target = min(target, sizes.max_epochs)
    cap = min(sizes.train_share * clock.budget_s, max(clock.left() - sizes.speed_reserve_s, 0.0))
    run_dir = work / "fashion_ffg_small"
    epoch_seconds: List[float] = []

    def on_epoch(row):
        epoch_seconds.append(float(row["seconds"]))

    first = min(2, target)
    t0 = time.perf_counter()
    result = train_run(load_recipe(SMALL_RECIPE, overrides + [f"train.num_epochs={first}"]), run_dir,
                       device=args.device, callback=on_epoch)
    spent = time.perf_counter() - t0
    # The second epoch is the steady one (the first pays for CUDA's and the allocator's start);
    # each later epoch costs about it, plus its share of the validation passes.
    per_epoch = (epoch_seconds[-1] if len(epoch_seconds) > 1 else spent / first) * 1.1
    epochs = first + max(0, min(target - first, int((cap - spent) / per_epoch)))
    if epochs > first:
        log(clock, f"training: {spent:.1f} s for {first} epochs; resuming to {epochs} of {target}")
        result = train_run(load_recipe(SMALL_RECIPE, overrides + [f"train.num_epochs={epochs}"]), run_dir,
                           device=args.device, resume=True, callback=on_epoch)
    seconds = time.perf_counter() - t0
    return {
        "run_dir": run_dir,
        "recipe": str(SMALL_RECIPE.relative_to(REPO)),
        "overrides": [o if not o.startswith("data.data_dir=") else f"data.data_dir={shown(o.split('=', 1)[1])}"
                            for o in overrides],
        "dataset": dataset_note["dataset"],
        "epochs": result.num_epochs,
        "target_epochs": target,
        "recipe_epochs": load_recipe(SMALL_RECIPE, overrides).train.num_epochs,
        "seconds": seconds,
        "seconds_per_epoch": sum(epoch_seconds[1:]) / max(len(epoch_seconds) - 1, 1),
        "test_elbo": result.test_elbo,
        "best_valid_elbo": result.best_valid_elbo,
        "best_epoch": result.best_epoch,
        "cap_s": cap,
    }


def load_model(run_dir: Path, device: torch.device):
    """(model without gradients, the test split as the evaluation sees it) of the trained run."""
    from gapbench.experiment import evaluation_split, load_inputs, load_trained_model, open_run

    run = open_run(run_dir)
    inputs = load_inputs(run.recipe)
    model = load_trained_model(run, inputs, device).requires_grad_(False)
    return model, evaluation_split(inputs, run.recipe, "test")


# --------------------------------------------------------------------------- 3. compiled AIS against eager


def compiled_vs_eager(model, x_all: torch.Tensor, model_name: str, sizes: Sizes, device: torch.device,
                      clock: Clock, warnings: WarningLog, seed: int) -> Dict:
    """For each (points, chains): eager and compiled AIS from the prior, same settings and seed."""
    from gapbench.inference import ais
    from gapbench.inference.compiled import compile_mode

    rows, skipped = [], []
    for k, (points, chains) in enumerate(sizes.graph_widths):
        if k and clock.left() < 0.5 * clock.budget_s:  # part 4 comes first: each width costs a compile
            skipped.append(f"{points} x {chains}")
            continue
        x = x_all[:points].to(device)
        kw = dict(num_chains=chains, num_leapfrog=10, seed=seed)
        # Warm-ups: the eager kernels and allocator, then the compile of this chunk shape (timed).
        log(clock, f"compiled vs eager: {points} points x {chains} chains, warm-up and compile")
        timed(lambda: ais(model, x, num_steps=2, **kw), device)
        warnings.take()
        skips0 = cudagraph_skips()
        _, compile_s = timed(lambda: ais(model, x, num_steps=2, compile=True, **kw), device)
        fell_back = [m for m in warnings.take() if "compile" in m]
        t = sizes.graph_steps
        best = {False: None, True: None}
        for _ in range(sizes.graph_repeats):
            for flag in (False, True):
                res, seconds = timed(lambda: ais(model, x, num_steps=t, compile=flag, **kw), device)
                if best[flag] is None or seconds < best[flag][1]:
                    best[flag] = (res, seconds)
        fell_back += [m for m in warnings.take() if "compile" in m]
        skips = None if skips0 is None else cudagraph_skips() - skips0
        eager, comp = best[False], best[True]
        diff = (comp[0].log_px - eager[0].log_px).abs()
        rows.append({
            "model": model_name, "points": points, "chains": chains, "rows": points * chains, "steps": t,
            "eager_s": eager[1], "compiled_s": comp[1],
            "eager_ms_per_transition": 1000 * eager[1] / t, "compiled_ms_per_transition": 1000 * comp[1] / t,
            "speedup": eager[1] / comp[1], "compile_s": compile_s,
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "mean_log_px_eager": finite_mean(eager[0].log_px), "mean_log_px_compiled": finite_mean(comp[0].log_px),
            "acceptance": float(eager[0].acceptance.mean()),
            "fell_back": fell_back, "cudagraph_skips": skips, "compiled": compiled_how(device, fell_back, skips),
        })
        log(clock, f"compiled vs eager: {1000 * eager[1] / t:.2f} vs {1000 * comp[1] / t:.2f} ms per transition, "
                   f"max |diff| {float(diff.max()):.2e}")
    return {"mode": compile_mode(device), "repeats": sizes.graph_repeats, "rows": rows, "skipped": skipped}


def graphs_table(part: Dict) -> str:
    head = ["model", "points x chains", "steps T", "eager ms/transition", "compiled ms/transition", "speedup",
            "compile s (first call)", "max abs diff of log p^ (nats)", "mean abs diff", "mean log p^ (eager)",
            "compiled ran"]
    rows = []
    for r in part["rows"]:
        rows.append([
            r["model"], f"{r['points']} x {r['chains']}", r["steps"], f"{r['eager_ms_per_transition']:.3f}",
            f"{r['compiled_ms_per_transition']:.3f}", f"**{r['speedup']:.2f}x**", f"{r['compile_s']:.1f}",
            f"{r['max_abs_diff']:.2e}", f"{r['mean_abs_diff']:.2e}", f"{r['mean_log_px_eager']:.3f}",
            r["compiled"],
        ])
    return md_table(head, rows)


# --------------------------------------------------------------------------- 4. paper settings against the CPU budget's


def paper_vs_small(model, x_test: torch.Tensor, sizes: Sizes, device: torch.device, clock: Clock,
                   warnings: WarningLog, seed: int) -> Dict:
    """AIS at the paper's settings and the CPU budget's (after the local FFG fit) on the same N test points."""
    from gapbench.evaluate import select_points
    from gapbench.gaps import run_stage
    from gapbench.inference import ais
    from gapbench.models.posterior import DiagonalGaussian
    from gapbench.recipe import load_recipe

    paper = load_recipe(PAPER_RECIPE, require_data=False).evaluate
    small = load_recipe(SMALL_RECIPE, require_data=False).evaluate
    if sizes.local_max_steps is not None:
        small = dataclasses.replace(small, local=dataclasses.replace(small.local, max_steps=sizes.local_max_steps))
    if sizes.small_steps is not None:
        small = dataclasses.replace(small, ais=dataclasses.replace(small.ais, num_steps=sizes.small_steps))
    a = paper.ais
    if a.init != "prior":
        raise GapbenchError(f"{PAPER_RECIPE.name}: the paper's AIS starts at the prior, the recipe says {a.init}")
    paper_steps = sizes.paper_steps or a.num_steps
    compile_paper = device.type == "cuda"  # speed only: the same draws, estimates equal up to rounding
    max_points = min(sizes.max_points or paper.num_points, x_test.shape[0])
    chunk = min(sizes.chunk, max_points)
    ais_kw = dict(num_chains=a.num_chains, num_leapfrog=a.num_leapfrog, schedule=a.schedule,
                  compile=compile_paper, chunk_size=chunk)

    # Time the paper's settings on one chunk (its compile first), then take as many chunks as fit.
    probe_x = x_test[select_points(x_test.shape[0], chunk, seed, "test")].to(device)
    log(clock, f"paper settings: warm-up{' and compile' if compile_paper else ''} on {chunk} points")
    warnings.take()
    skips0 = cudagraph_skips()  # a compile that leaves out CUDA graphs says so when it compiles (here or in part 3)
    _, warm_s = timed(lambda: ais(model, probe_x, num_steps=2, seed=seed, **ais_kw), device)
    _, probe_s = timed(lambda: ais(model, probe_x, num_steps=sizes.probe_steps, seed=seed, **ais_kw), device)
    per_chunk = paper_steps * probe_s / sizes.probe_steps
    available = clock.left() - sizes.speed_reserve_s
    # The CPU budget's fit and AIS take a few percent of the paper's time on the same points; keep 15% for them.
    num_chunks = min(max_points // chunk, int(0.85 * available / per_chunk)) if per_chunk > 0 else 0
    if num_chunks == 0 and per_chunk < 0.85 * (clock.left() - 10):
        num_chunks = 1  # one chunk still fits the whole budget: it comes before speed.py's share
    log(clock, f"paper settings: {1000 * probe_s / sizes.probe_steps:.2f} ms per transition on {chunk} points, "
               f"{per_chunk:.0f} s per chunk; {available:.0f} s left -> {num_chunks} chunk(s)")
    out = {
        "paper_recipe": str(PAPER_RECIPE.relative_to(REPO)), "small_recipe": str(SMALL_RECIPE.relative_to(REPO)),
        "paper": {"num_steps": paper_steps, "recipe_num_steps": a.num_steps, "num_chains": a.num_chains,
                  "num_leapfrog": a.num_leapfrog, "schedule": a.schedule, "init": a.init, "compile": compile_paper,
                  "chunk_points": chunk, "warmup_s": warm_s, "probe_steps": sizes.probe_steps, "probe_s": probe_s,
                  "predicted_s_per_chunk": per_chunk},
        "small": {"num_steps": small.ais.num_steps, "num_chains": small.ais.num_chains,
                  "num_leapfrog": small.ais.num_leapfrog, "schedule": small.ais.schedule, "init": small.ais.init,
                  "compile": small.ais.compile, "local": dataclasses.asdict(small.local)},
        "time_left_s": available, "num_points": 0,
    }
    if num_chunks == 0:
        out["skipped"] = (f"one chunk of {chunk} point(s) at the paper's settings would take about {per_chunk:.0f} s; "
                          f"{max(available, 0):.0f} s were left")
        return out
    num_points = num_chunks * chunk
    idx = select_points(x_test.shape[0], num_points, seed, "test")
    x = x_test[idx].to(device)
    out["num_points"], out["points"] = num_points, idx.tolist()

    # The CPU budget's settings: the local FFG fit from the encoder's q, then AIS from each point's q*_FFG.
    log(clock, f"small settings: local FFG fit on {num_points} points")
    start = None if small.local.init == "prior" else model.posterior(x).detach()
    (cols, traces), fit_s = timed(lambda: run_stage("local_ffg", model, x, small, seed + 1, init=start), device)
    q_ffg = DiagonalGaussian(model.latent_dim).posterior(
        {"mean": traces["ffg_mean"].to(device), "log_var": traces["ffg_log_var"].to(device)})
    log(clock, f"small settings: AIS {small.ais.num_steps} x {small.ais.num_chains} from q*_FFG")
    (small_cols, _), small_ais_s = timed(lambda: run_stage("ais", model, x, small, seed + 2, init=q_ffg), device)

    log(clock, f"paper settings: AIS {paper_steps} x {a.num_chains} from the prior on {num_points} points "
               f"(about {num_chunks * per_chunk:.0f} s)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    paper_res, paper_s = timed(lambda: ais(model, x, num_steps=paper_steps, seed=seed + 3, **ais_kw), device)
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    fell_back = [m for m in warnings.take() if "compile" in m]
    skips = None if skips0 is None else cudagraph_skips() - skips0
    compiled = compiled_how(device, fell_back, skips) if compile_paper else "no (eager on a CPU)"

    paper_px = paper_res.log_px.detach().double().cpu()
    small_px = small_cols["ais"].detach().double().cpu()
    diff = paper_px - small_px
    out["paper"].update(seconds=paper_s, mean_log_px=finite_mean(paper_px), acceptance=float(paper_res.acceptance.mean()),
                        mean_ess=float(paper_res.ess.mean()), num_nonfinite=paper_res.num_nonfinite, fell_back=fell_back,
                        compiled=compiled, peak_mib=peak_mib)
    out["small"].update(seconds=fit_s + small_ais_s, fit_s=fit_s, ais_s=small_ais_s, mean_log_px=finite_mean(small_px),
                        mean_elbo_ffg=finite_mean(cols["elbo_ffg"].double().cpu()),
                        fit_converged=float(cols["converged_ffg"].double().mean()),
                        mean_fit_steps=float(cols["steps_ffg"].double().mean()),
                        mean_ess=float(small_cols["ais_ess"].double().mean()),
                        acceptance=float(small_cols["ais_acceptance"].double().mean()))
    out.update(mean_diff=finite_mean(diff), se_diff=stderr_of_mean(diff), max_abs_diff=float(diff.abs().max()))
    out["per_point"] = [
        {"index": int(i), "paper_log_px": float(p), "small_log_px": float(s), "diff": float(d),
         "elbo_ffg": float(e), "paper_ess": float(pe), "small_ess": float(se)}
        for i, p, s, d, e, pe, se in zip(idx.tolist(), paper_px, small_px, diff, cols["elbo_ffg"].double().cpu(),
                                         paper_res.ess.double().cpu(), small_cols["ais_ess"].double().cpu())
    ]
    log(clock, f"paper vs small: mean difference {out['mean_diff']:+.3f} nats on {num_points} points")
    return out


def paper_tables(part: Dict, max_rows: int = 50) -> str:
    p, s = part["paper"], part["small"]
    n = part["num_points"]
    summary = md_table(
        ["AIS", "settings", "points", "mean log p^ (nats)", "seconds", "seconds per point"],
        [[
            "paper", f"{p['num_steps']:,} steps x {p['num_chains']} chains from the prior, {p['num_leapfrog']} leapfrog"
                     + ("" if not p["compile"] else ", compiled" if p["compiled"] == "yes"
                        else f", compiled: {p['compiled']}"),
            n, f"{p['mean_log_px']:.3f}", f"{p['seconds']:.1f}"
            + (f" (peak GPU memory {p['peak_mib']:.0f} MiB)" if p.get("peak_mib") is not None else ""),
            f"{p['seconds'] / n:.2f}",
        ], [
            "CPU budget", f"local FFG fit ({s['mean_fit_steps']:.0f} steps on average), then {s['num_steps']:,} steps "
                          f"x {s['num_chains']} chains from q*_FFG",
            n, f"{s['mean_log_px']:.3f}", f"{s['seconds']:.1f} ({s['fit_s']:.1f} fit + {s['ais_s']:.1f} AIS)",
            f"{s['seconds'] / n:.2f}",
        ]],
    )
    diff = (f"Mean difference paper - CPU budget: **{part['mean_diff']:+.3f} ± {part['se_diff']:.3f} nats** "
            f"(± one standard error over the {n} points); largest |difference| {part['max_abs_diff']:.3f} nats. "
            "Both are stochastic lower bounds on log p(x): the larger one is the tighter.")
    rows = [[r["index"], f"{r['paper_log_px']:.3f}", f"{r['small_log_px']:.3f}", f"{r['diff']:+.3f}",
             f"{r['elbo_ffg']:.3f}", f"{r['paper_ess']:.1f}", f"{r['small_ess']:.1f}"] for r in part["per_point"][:max_rows]]
    per_point = md_table(["test index", "paper log p^", "CPU-budget log p^", "difference", "L[q*_FFG]",
                          "paper ESS", "CPU-budget ESS"], rows)
    more = f"\n\nThe first {max_rows} of {n} points; all of them are in points.csv." if n > max_rows else ""
    return f"{summary}\n\n{diff}\n\n{per_point}{more}"


# --------------------------------------------------------------------------- 5. speed.py


_PROGRESS = re.compile(r"^\[\s*([0-9.]+) s\] (.*)$")


def run_speed(args, sizes: Sizes, clock: Clock, folder: Path, work: Path, cap_s: float) -> Dict:
    """speed.py as a subprocess in its own process group, stopped (with its children) after ``cap_s``."""
    cmd = [sys.executable, str(SPEED), "--device", args.device, "--fixture", shown(args.fixture)]  # run in the checkout
    cmd += list(args.speed_args.split() if args.speed_args is not None else sizes.speed_args)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               TMPDIR=str(work / "tmp"), PYTHONUNBUFFERED="1")
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    table_path, log_path = folder / "speed_table.md", folder / "speed_log.txt"
    log(clock, f"speed.py: {' '.join(cmd[2:])} (at most {cap_s:.0f} s)")
    t0 = time.perf_counter()
    with open(table_path, "w") as out, open(log_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=str(REPO), start_new_session=True)
        try:
            rc = proc.wait(timeout=cap_s)
            finished = rc == 0
        except subprocess.TimeoutExpired:
            rc, finished = None, False
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
    seconds = time.perf_counter() - t0
    phases = _phases(log_path.read_text(errors="replace"), seconds, finished)
    return {"command": ["python", "benchmarks/speed.py"] + cmd[2:], "cap_s": cap_s, "seconds": seconds,
            "returncode": rc, "finished": finished, "timed_out": rc is None, "phases": phases,
            "table": table_path.read_text(errors="replace") if finished else ""}


def _phases(text: str, total: float, finished: bool) -> List[Dict]:
    """Each progress line of speed.py with the seconds until the next one (the last: until it ended or was stopped)."""
    marks = [(float(m.group(1)), m.group(2)) for m in map(_PROGRESS.match, text.splitlines()) if m]
    out = []
    for i, (t, what) in enumerate(marks):
        end = marks[i + 1][0] if i + 1 < len(marks) else None
        out.append({"phase": what, "start_s": t, "seconds": None if end is None else end - t,
                    "finished": end is not None or finished})
    if out and out[-1]["seconds"] is None:
        out[-1]["seconds"] = max(total - out[-1]["start_s"], 0.0)
    return out


def speed_section(part: Dict) -> str:
    cmd = " ".join(part["command"])
    if part["finished"]:
        return (f"`{cmd}` finished in {part['seconds']:.0f} s; its output (also in speed_table.md):\n\n"
                + part["table"].strip())
    why = (f"was stopped after {part['cap_s']:.0f} s (the time left in the budget)" if part["timed_out"]
           else f"failed (exit status {part['returncode']}; see speed_log.txt)")
    rows = [[p["phase"], f"{p['start_s']:.1f}", f"{p['seconds']:.1f}" + ("" if p["finished"] else " (unfinished)")]
            for p in part["phases"]]
    return (f"`{cmd}` {why}, so it printed no table. The phases it reached, from its progress log "
            f"(speed_log.txt; each phase's seconds run until the next began):\n\n"
            + md_table(["phase", "started at s", "seconds"], rows))


# --------------------------------------------------------------------------- the run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run of a minute or two")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "gpu",
                        help="the results go to OUT/<device name>/ (default results/gpu)")
    parser.add_argument("--data-dir", default=None,
                        help="a folder holding fashion-mnist/ with its four IDX files (default $GAPBENCH_DATA, "
                             "then the usual places; see `gapbench datasets`)")
    parser.add_argument("--fixture", type=Path, default=FIXTURE,
                        help="the pretrained MNIST VAE (.npz) for the compiled-vs-eager part and speed.py")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for all the parts together (default 420); N of part 4 and speed.py's time follow")
    parser.add_argument("--speed-args", default=None,
                        help="speed.py's arguments besides --device and --fixture, as one string with '=' "
                             "(--speed-args='--compile --models mnist'; default --compile, with --quick "
                             "--quick --models digits)")
    parser.add_argument("--skip-speed", action="store_true", help="leave out speed.py (part 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device; for a CPU smoke run use --quick --device cpu")
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    sizes = QUICK if args.quick else (GPU if device.type == "cuda" else CPU)
    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        parser.error(f"--data-dir {args.data_dir}: no such folder")

    dataset = choose_dataset(args.data_dir, args.quick)  # before any work: a missing dataset costs a second

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings = WarningLog()
    logging.getLogger("gapbench").addHandler(warnings)

    clock = Clock(args.budget_s)
    folder = args.out / folder_name(device, args.quick)
    work = folder / ".work"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("README.md", "results.json", "points.csv", "speed_table.md", "speed_log.txt"):
        (folder / stale).unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()

    results: Dict = {"command": ["python", "benchmarks/gpu_check.py"] + list(sys.argv[1:] if argv is None else argv),
                     "quick": args.quick, "budget_s": args.budget_s, "seed": args.seed, "sizes": dataclasses.asdict(sizes),
                     "dataset": {k: v for k, v in dataset.items() if k != "overrides"}, "errors": {}, "tracebacks": {}}
    held: Dict = {}  # the trained model and its test split, for the parts after training

    def part(name: str, fn: Callable[[], Dict]) -> None:
        """Run one part; a failure is recorded (and its traceback printed) and the other parts go on.
        The results so far are written after each part, so a run stopped from outside keeps them."""
        try:
            results[name] = fn()
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            log(clock, f"{name} failed: {type(exc).__name__}: {first}")
            traceback.print_exc(file=sys.stderr)
            results["errors"][name] = f"{type(exc).__name__}: {first}"
            results["tracebacks"][name] = traceback.format_exc()
        results["total_s"] = clock.elapsed()
        write_outputs(results, folder, args, sizes, final=False)

    def training() -> Dict:
        info = train_model(args, sizes, clock, work, dataset)
        held["model"], held["x_test"] = load_model(info.pop("run_dir"), device)
        log(clock, f"trained {info['epochs']} epochs in {info['seconds']:.0f} s, test ELBO {info['test_elbo']:.2f}")
        return info

    def graphs() -> Dict:
        widest = max(p for p, _ in sizes.graph_widths)
        if args.fixture.is_file():
            sys.path.insert(0, str(REPO / "benchmarks"))
            from speed import mnist_model

            model, simulate = mnist_model(args.fixture, device)
            return compiled_vs_eager(model, simulate(widest, args.seed)[1], "MNIST VAE (pretrained, simulated data)",
                                     sizes, device, clock, warnings, args.seed)
        if "model" not in held:
            raise GapbenchError(f"no model to run: no --fixture at {shown(args.fixture)} and no trained model")
        return compiled_vs_eager(held["model"], held["x_test"], f"{dataset['dataset']} VAE trained here (test points)",
                                 sizes, device, clock, warnings, args.seed)

    try:
        from gapbench.provenance import now

        results["date"] = now()
        results["environment"] = env = environment(device)
        log(clock, f"{env['device_name']}, torch {env['torch']}, CUDA {env['cuda']}; results in {folder}")
        log(clock, f"training the CPU-budget model on {dataset['dataset']}")
        part("training", training)
        part("compiled_vs_eager", graphs)
        if "model" in held:
            part("paper_vs_small", lambda: paper_vs_small(held["model"], held["x_test"], sizes, device, clock, warnings,
                                                          args.seed))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # speed.py's process gets the memory back
        if not args.skip_speed:
            cap = max(clock.left(), 20.0)
            part("speed", lambda: run_speed(args, sizes, clock, folder, work, cap))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        logging.getLogger("gapbench").removeHandler(warnings)
    results["total_s"] = clock.elapsed()
    write_outputs(results, folder, args, sizes, final=True)
    return 1 if results["errors"] else 0


# --------------------------------------------------------------------------- output


def write_outputs(results: Dict, folder: Path, args, sizes: Sizes, final: bool) -> None:
    """README.md, results.json and points.csv; the README is printed too once the run is over."""
    from gapbench.io import write_json, write_text

    text = readme(results, args, sizes, final)
    write_text(folder / "README.md", text)
    saved = dict(results)
    if "speed" in saved:  # its table is in speed_table.md
        saved["speed"] = {k: v for k, v in saved["speed"].items() if k != "table"}
    write_json(folder / "results.json", plain(saved))
    pvs = results.get("paper_vs_small") or {}
    if pvs.get("per_point"):
        head = list(pvs["per_point"][0])
        lines = [",".join(head)] + [",".join(repr(r[k]) for k in head) for r in pvs["per_point"]]
        write_text(folder / "points.csv", "\n".join(lines) + "\n")
    if final:
        print(text)


def readme(results: Dict, args, sizes: Sizes, final: bool = True) -> str:
    env = results.get("environment", {})
    name = env.get("device_name") or args.device
    quick = " (--quick: tiny sizes, a smoke run, not a measurement)" if args.quick else ""
    lines = [f"# gapbench GPU check: {name}{quick}", ""]
    if not final:
        lines += [f"**Unfinished**: the run was still going after {results.get('total_s', 0):.0f} s; "
                  "these are the parts it had finished.", ""]
    lines += [f"`{' '.join(results['command'])}` on {results.get('date', '?')}: total {results.get('total_s', 0):.0f} s "
              f"(budget {results['budget_s']:.0f} s for the parts). Made by `make gpu-check` "
              "(benchmarks/gpu_check.py, whose docstring says what each part does).", ""]
    if env:
        keys = ["device_name", "memory_gib", "multiprocessors", "compute_capability", "driver", "torch", "cuda",
                "cudnn", "tf32_matmul", "float32_matmul_precision", "python", "machine", "cpu_count", "torch_threads",
                "gapbench", "git_commit", "git_dirty"]
        lines += ["## Environment", "", md_table(["", ""], [[k, env[k]] for k in keys if k in env]), ""]
    notes = []
    if args.quick:
        notes.append(f"--quick: a training subset of {sizes.num_train} images and at most {sizes.max_epochs} epochs; "
                     f"the paper's AIS at {sizes.paper_steps} steps instead of 10,000 and the CPU budget's at "
                     f"{sizes.small_steps} instead of 1,000, its local fit at most {sizes.local_max_steps} steps; "
                     f"at most {sizes.max_points} points; speed.py {' '.join(sizes.speed_args)}.")
    if results["dataset"].get("note"):
        notes.append(results["dataset"]["note"])
    for name_, msg in results["errors"].items():
        notes.append(f"**{name_} failed**: {msg}")
    if notes:
        lines += ["## Notes", ""] + [f"* {n}" for n in notes] + [""]

    t = results.get("training")
    if t:
        sets = " with " + ", ".join("--set " + o for o in t["overrides"]) if t["overrides"] else ""
        lines += ["## The CPU-budget model", "",
                  f"`{t['recipe']}`{sets} on {t['dataset']}: {t['epochs']} of the recipe's {t['recipe_epochs']} epochs "
                  f"in {t['seconds']:.0f} s ({t['seconds_per_epoch']:.2f} s per epoch after the first; training's "
                  f"share of the budget was {t['cap_s']:.0f} s); best validation ELBO {t['best_valid_elbo']:.2f} nats "
                  f"(epoch {t['best_epoch']}), test ELBO {t['test_elbo']:.2f} nats.", ""]
    g = results.get("compiled_vs_eager")
    if g:
        graph = ": a CUDA graph per transition" if g["mode"] == "reduce-overhead" else ""
        lines += ["## Compiled AIS against eager", "",
                  f"`ais(compile=True)` (torch.compile, mode \"{g['mode']}\"{graph}) "
                  f"against eager `ais`, from the prior, 10 leapfrog steps, the same seed (the same random draws), "
                  f"each side's fastest of {g['repeats']} run(s); the compile (first call at that shape) is not in the "
                  "times. The differences are rounding, grown by accept decisions that rounding can flip.", "",
                  graphs_table(g), ""]
        if g.get("skipped"):
            lines += [f"Left out for lack of time (half the budget was spent): {', '.join(g['skipped'])}.", ""]
    p = results.get("paper_vs_small")
    if p:
        lines += ["## AIS at the paper's settings beside the CPU budget's", ""]
        pp, s = p["paper"], p["small"]
        reduced = ("" if pp["num_steps"] == pp["recipe_num_steps"]
                   else f" (reduced from the recipe's {pp['recipe_num_steps']:,})")
        lines += [f"The CPU-budget model, on test points chosen as `gapbench evaluate-gaps` chooses them (seed "
                  f"{results['seed']}). Paper: `{p['paper_recipe']}`, {pp['num_steps']:,} steps"
                  f"{reduced} x {pp['num_chains']} chains from the prior, {pp['num_leapfrog']} leapfrog, {pp['schedule']} "
                  f"schedule, {pp['chunk_points']} point{'s' if pp['chunk_points'] > 1 else ''} at a time{', compiled' if pp['compile'] else ''}. "
                  f"CPU budget: `{p['small_recipe']}`, the local FFG fit from the encoder's q (Adam {s['local']['lr']:g}, "
                  f"check every {s['local']['check_every']}, patience {s['local']['patience']}, at most "
                  f"{s['local']['max_steps']:,} steps), then {s['num_steps']:,} steps x {s['num_chains']} chains from "
                  f"each point's q*_FFG. N was chosen after timing {pp['probe_steps']} transitions at the paper's "
                  f"settings ({pp['probe_s']:.2f} s, so about {pp['predicted_s_per_chunk']:.0f} s per "
                  f"{pp['chunk_points']} point{'s' if pp['chunk_points'] > 1 else ''}) against the {p['time_left_s']:.0f} s left.", ""]
        if p.get("skipped"):
            lines += [f"Not run: {p['skipped']}.", ""]
        else:
            if pp["compile"] and pp.get("compiled") != "yes":
                lines += [f"Compiled at the paper's settings: {pp.get('compiled')}"
                          + (f" ({pp['fell_back'][0]})" if pp.get("fell_back") else "") + ".", ""]
            lines += [paper_tables(p), ""]
    sp = results.get("speed")
    if sp:
        lines += ["## speed.py (`make bench-speed`) on this device", "", speed_section(sp), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GapbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
