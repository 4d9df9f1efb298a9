"""Speed and accuracy of gapbench's estimators against straightforward reference implementations.

For each estimator (local FFG, local flow, AIS, IWAE-5000), on the pretrained
MNIST VAE (latent 50; data simulated from it, z ~ p(z), x ~ p(x|z)) and on a
quickstart-sized VAE (latent 8, trained here for a few seconds on
scikit-learn's digits with recipes/quickstart.yaml), runs gapbench's estimator
and the reference of ``benchmarks/reference_impl.py`` side by side in one
process, and prints one markdown table: wall time, throughput (datapoints/s),
peak memory and accuracy of each, and the speedup.

    python benchmarks/speed.py              # the full table, about 10 minutes on 2 CPU cores
    python benchmarks/speed.py --quick      # a smoke run with tiny sizes, about a minute
    python benchmarks/speed.py --threads 2  # torch intra-op threads (default 1)
    python benchmarks/speed.py --compile    # also gapbench's AIS through torch.compile
    python benchmarks/speed.py --device cuda --compile   # on a GPU (larger sizes, 100x local-fit target)

Comparisons:

* local fits "equal settings": both start at the same q (the encoder's q for FFG,
  gapbench's fitted q*_FFG for the flow) with the same Adam, samples and
  stopping rule; the ratio is what batching the datapoints buys.
* local FFG "equal final ELBO": gapbench from the encoder's q at the quickstart's
  settings against the reference at the published settings (from the prior,
  Adam 1e-3, check every 100 steps, patience 10); the mean final ELBOs must
  agree within 0.05 nats.
* AIS "equal settings": forward and reverse AIS (BDMC) from the prior, same
  schedule, chains, leapfrog steps and seed (the same random draws: the
  estimates agree up to rounding); "equal BDMC width": gapbench from the
  encoder's q (starting step size 0.1 x q's scale, ``step_size="auto"``) with the
  fewest steps (of a short ladder) whose sandwich is no wider than the
  reference's from the prior.
* IWAE-5000: the encoder's q as proposal; accuracy is the distance below the
  tightest BDMC upper bound measured on the same points.

AIS at equal settings is timed ``repeats`` times (3 in the full run), gapbench
and reference alternating, and each side's fastest run is reported: the two
CPU cores are shared, and the minimum is the run least disturbed by other load.
With ``--compile`` one more row times gapbench's AIS through ``torch.compile``
(``ais(compile=True)``), its one-off compilation excluded and reported below
the table.

A second table sets gapbench's AIS inner loop against the machine's measured
matrix-multiply throughput: the multiply-add FLOPs of a transition's L
gradients (forward and backward through the decoder's layers, 4 M sum d_in
d_out each for M = chains x points) per second of the equal-settings run,
against (a) a large square matmul and (b) the same matmuls of the inner loop
run back to back with nothing else, whose time over the AIS time is the
fraction of the inner loop spent in matmuls.

Peak memory is the rise of the process's peak resident set size (Linux VmHWM,
reset before each case through /proc/self/clear_refs) above its resident size
at the case's start; where that reset is not possible, the rise of
getrusage's ru_maxrss (0 unless the case sets a new peak for the process).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_impl import ais_no_reuse, fit_local_one_at_a_time, iwae_one_at_a_time  # noqa: E402

from gapbench.inference import ais, ais_reverse, fit_local, iwae  # noqa: E402
from gapbench.models.reference import load_npz_vae  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "mnist_vae_bdmc.npz"

# Local-fit settings of recipes/quickstart.yaml (evaluate.local), used by both implementations.
LOCAL = dict(num_samples=50, check_every=50, patience=4, max_steps=5000, num_final_samples=1000)
FFG_LR, FLOW_LR = 1e-2, 1e-3
# The published local fit (Cremer et al. 2018): from the prior, Adam at 1e-3, 50 samples,
# every 100 steps average the loss, stop after 10 checks without a new best.
PUBLISHED = dict(lr=1e-3, num_samples=50, check_every=100, patience=10, num_final_samples=1000)
FLOW_KWARGS = dict(num_flow_steps=2, flow_hidden=32)


# --------------------------------------------------------------------------- measuring


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


MEMORY_METHOD = "VmHWM" if _reset_peak() else "ru_maxrss"


@dataclass
class Measured:
    value: object
    seconds: float
    peak_mb: float


def _timed(fn: Callable[[], object], device: torch.device):
    """(fn(), its wall seconds); on a CUDA device, between two synchronizations."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - t0


def _measure(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> Measured:
    """Run fn once: its result, wall seconds and peak memory rise in MB (see the module docstring).

    On a CUDA device: the time between two synchronizations, and the rise of the
    device's peak allocated memory.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
        value, seconds = _timed(fn, device)
        peak = torch.cuda.max_memory_allocated(device) - start_bytes
        return Measured(value, seconds, max(peak, 0) / 2**20)
    if MEMORY_METHOD == "VmHWM":
        _reset_peak()
        start_kb = _status_kb("VmRSS")
    else:
        start_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    value, seconds = _timed(fn, device)
    if MEMORY_METHOD == "VmHWM":
        peak_kb = _status_kb("VmHWM") - start_kb
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_kb
    return Measured(value, seconds, max(peak_kb, 0) / 1024)


def measure_best(fns: List[Callable[[], object]], repeats: int, device: torch.device) -> List[Measured]:
    """Each fn run ``repeats`` times, the fns alternating; for each, its fastest run (with that run's value)."""
    best: List[Optional[Measured]] = [None] * len(fns)
    for _ in range(max(repeats, 1)):
        for i, fn in enumerate(fns):
            m = _measure(fn, device)
            if best[i] is None or m.seconds < best[i].seconds:
                best[i] = m
    return best


@dataclass
class Row:
    model: str
    estimator: str
    compared_at: str
    num_points: int
    ours: Measured
    ref: Measured
    ours_settings: str
    ref_settings: str
    ours_accuracy: str
    ref_accuracy: str
    target: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.ref.seconds / self.ours.seconds

    def verdict(self) -> str:
        if self.target is None:
            return ""
        ok = self.speedup >= self.target and self.extra.get("accuracy_ok", True)
        return f"{'met' if ok else 'MISSED'} (>= {self.target:g}x)"


def _mean(t: torch.Tensor) -> float:
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else math.nan


# --------------------------------------------------------------------------- models


def mnist_model(fixture: Path, device: torch.device = torch.device("cpu")):
    cpu_model = load_npz_vae(fixture).requires_grad_(False)  # simulates, so that every device sees the same data
    model = cpu_model if device.type == "cpu" else load_npz_vae(fixture).requires_grad_(False).to(device)

    def simulate(num_points: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(num_points, cpu_model.latent_dim, generator=gen)
        return z.to(device), cpu_model.sample_x(z, generator=gen).to(device)

    return model, simulate


def digits_model(num_epochs: int, threads: int, device: torch.device = torch.device("cpu")):
    """The quickstart VAE, trained for ``num_epochs`` epochs into a temporary folder."""
    import logging

    from gapbench.experiment import load_inputs, load_trained_model, open_run
    from gapbench.recipe import load_recipe
    from gapbench.train import train_run

    logging.getLogger("gapbench").setLevel(logging.WARNING)
    overrides = [f"train.num_epochs={num_epochs}", f"num_threads={threads}"]
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train_run(recipe, Path(tmp) / "run")
        seconds = time.perf_counter() - t0
        run = open_run(Path(tmp) / "run")
        model = load_trained_model(run, load_inputs(run.recipe), torch.device("cpu")).requires_grad_(False)

    def simulate(num_points: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(num_points, model.latent_dim, generator=gen)
        with torch.no_grad():
            logits = model.decode(z.unsqueeze(0)).reshape(num_points, -1)
        x = torch.bernoulli(torch.sigmoid(logits), generator=gen)
        return z.to(device), x.reshape(num_points, *model.input_shape).to(device)

    note = f"trained {result.num_epochs} epochs in {seconds:.0f} s, test ELBO {result.test_elbo:.2f}"
    on_device = model if device.type == "cpu" else copy.deepcopy(model).to(device)  # model simulates, on the CPU
    return on_device, simulate, note


# --------------------------------------------------------------------------- the comparisons


def bench_model(name: str, model, simulate, num_points: int, ais_points: int, cfg, seed: int, log,
                device: torch.device = torch.device("cpu"), compile: bool = False, notes: Optional[list] = None,
                utilization: Optional[list] = None) -> List[Row]:
    rows: List[Row] = []
    notes = [] if notes is None else notes

    def measure(fn):
        return _measure(fn, device)

    _, x = simulate(num_points, seed)
    encoder_q = model.posterior(x).detach()
    local = dict(LOCAL, max_steps=cfg.max_steps)
    # The one-at-a-time references run on the first k points; their time is scaled to all of them.
    k = num_points if cfg.reference_points is None else min(cfg.reference_points, num_points)
    x_ref, q_ref = x[:k], model.posterior(x[:k]).detach()
    sub = f" (timed on {k} of {num_points} points, scaled; accuracy on those {k})" if k < num_points else ""

    def measure_ref(fn):
        m = _measure(fn, device)
        return Measured(m.value, m.seconds * num_points / k, m.peak_mb)

    def mean_k(t):
        return _mean(t[:k])
    desc = f"lr {FFG_LR:g}, {local['num_samples']} samples, check every {local['check_every']}, patience {local['patience']}"

    # Local FFG, equal settings: both from the encoder's q.
    log(f"{name}: local FFG, gapbench")
    ours = measure(lambda: fit_local(model, x, "ffg", init=encoder_q, lr=FFG_LR, seed=seed, **local))
    log(f"{name}: local FFG, reference from the encoder's q")
    ref = measure_ref(lambda: fit_local_one_at_a_time(model, x_ref, "ffg", init=q_ref, lr=FFG_LR, seed=seed + 1, **local))
    fit = ours.value
    diff = mean_k(fit.elbo) - _mean(ref.value.elbo)
    rows.append(Row(
        name, "local FFG", "equal settings", num_points, ours, ref,
        f"batched, from q(z|x), {desc}", f"one at a time, from q(z|x), {desc}{sub}",
        f"L[q*] {_mean(fit.elbo):.2f}, {fit.num_steps.double().mean():.0f} steps",
        f"L[q*] {_mean(ref.value.elbo):.2f} ({diff:+.3f}), {ref.value.num_steps.double().mean():.0f} steps",
    ))
    # Local FFG, equal final ELBO: the reference as published (from the prior, lr 1e-3, patience 10).
    log(f"{name}: local FFG, reference from the prior at the published settings")
    published = dict(PUBLISHED, max_steps=cfg.published_max_steps)
    ref_prior = measure_ref(lambda: fit_local_one_at_a_time(model, x_ref, "ffg", init=None, seed=seed + 2, **published))
    diff = mean_k(fit.elbo) - _mean(ref_prior.value.elbo)
    rows.append(Row(
        name, "local FFG", "equal final ELBO", num_points, ours, ref_prior,
        f"batched, from q(z|x), {desc}",
        f"one at a time, from the prior, lr {published['lr']:g}, check every {published['check_every']}, "
        f"patience {published['patience']} (published){sub}",
        f"L[q*] {_mean(fit.elbo):.2f}, {fit.num_steps.double().mean():.0f} steps",
        f"L[q*] {_mean(ref_prior.value.elbo):.2f} ({diff:+.3f}), {ref_prior.value.num_steps.double().mean():.0f} steps",
        target=cfg.local_target, extra={"accuracy_ok": abs(diff) <= 0.05, "elbo_diff": diff},
    ))

    # Local flow, equal settings: both from gapbench's q*_FFG (identity flow).
    ffg_q = fit.q
    ffg_q_ref = ffg_q.family.posterior({n: v[:k] for n, v in fit.params.items()}, k) if k < num_points else ffg_q
    flow_desc = f"lr {FLOW_LR:g}, {FLOW_KWARGS['num_flow_steps']} steps x {FLOW_KWARGS['flow_hidden']} hidden"
    log(f"{name}: local flow, gapbench")
    ours = measure(lambda: fit_local(model, x, "flow", init=ffg_q, lr=FLOW_LR, seed=seed, family_kwargs=FLOW_KWARGS, **local))
    log(f"{name}: local flow, reference")
    ref = measure_ref(lambda: fit_local_one_at_a_time(model, x_ref, "flow", init=ffg_q_ref, lr=FLOW_LR, seed=seed,
                                                      family_kwargs=FLOW_KWARGS, **local))
    diff = mean_k(ours.value.elbo) - _mean(ref.value.elbo)
    rows.append(Row(
        name, "local flow", "equal settings", num_points, ours, ref,
        f"batched, from q*_FFG, {flow_desc}", f"one at a time, same{sub}",
        f"L[q*] {_mean(ours.value.elbo):.2f}, {ours.value.num_steps.double().mean():.0f} steps",
        f"L[q*] {_mean(ref.value.elbo):.2f} ({diff:+.3f}), {ref.value.num_steps.double().mean():.0f} steps",
        extra={"elbo_diff": diff},  # batching alone; the 5x target is the FFG's, at equal final ELBO
    ))

    # AIS: forward + reverse (BDMC) on simulated data.
    z_true, x_ais = simulate(ais_points, seed + 100)
    q_ais = model.posterior(x_ais).detach()
    chains, leap, t_eq = cfg.ais_chains, 10, cfg.ais_steps

    def bdmc_ours(num_steps, init, step_size=0.01, compile=False):
        kw = dict(num_steps=num_steps, num_chains=chains, num_leapfrog=leap, init=init, seed=seed, step_size=step_size,
                  compile=compile)
        lower = ais(model, x_ais, **kw)
        upper = ais_reverse(model, x_ais, z_true, **kw)
        return lower.log_px, upper.log_px

    def bdmc_ref(num_steps):
        kw = dict(num_steps=num_steps, num_chains=chains, num_leapfrog=leap)
        # gapbench's seed: the same random draws in the same order, so both give the same estimates
        lower = ais_no_reuse(model, x_ais, seed=seed, **kw)
        upper = ais_no_reuse(model, x_ais, z_start=z_true, seed=seed, **kw)
        return lower.log_px, upper.log_px

    def width(m):
        return _mean(m.value[1] - m.value[0])

    fns = [lambda: bdmc_ours(t_eq, None), lambda: bdmc_ref(t_eq)]
    if compile:
        log(f"{name}: compiling gapbench's AIS transition")
        warm = measure(lambda: bdmc_ours(2, None, compile=True))
        notes.append(f"{name}: compiling the AIS transition (forward and reverse, first call) took {warm.seconds:.1f} s, "
                     "paid once per process and chunk shape; not in the compiled row's time")
        fns.append(lambda: bdmc_ours(t_eq, None, compile=True))
    log(f"{name}: AIS from the prior, T = {t_eq}, gapbench and reference, best of {cfg.repeats}")
    best = measure_best(fns, cfg.repeats, device)
    ours, ref = best[0], best[1]
    ais_desc = f"forward + reverse, T = {t_eq}, {chains} chains, {leap} leapfrog"
    best_of = f", best of {cfg.repeats}" if cfg.repeats > 1 else ""
    rows.append(Row(
        name, "AIS (BDMC)", "equal settings", ais_points, ours, ref,
        f"from the prior, {ais_desc}{best_of}", f"from the prior, {ais_desc}{best_of}",
        f"width {width(ours):.2f} nats", f"width {width(ref):.2f} nats", target=2.0,
    ))
    if compile:
        rows.append(Row(
            name, "AIS (BDMC)", "equal settings, compiled", ais_points, best[2], ref,
            f"as above, ais(compile=True){best_of}", f"from the prior, {ais_desc}{best_of}",
            f"width {width(best[2]):.2f} nats", f"width {width(ref):.2f} nats", target=2.0,
        ))
    if utilization is not None:
        util = inner_loop_utilization(model, ais_points * chains, leap, 2 * t_eq, ours.seconds, device)
        if util is not None:
            utilization.append((name, util))
    uppers = [ours.value[1], ref.value[1]]
    ladder = []
    for t in cfg.ais_ladder:
        log(f"{name}: AIS from q(z|x), T = {t}, gapbench")
        m = measure(lambda: bdmc_ours(t, q_ais, step_size="auto"))
        ladder.append((t, m))
        uppers.append(m.value[1])
        if width(m) <= width(ref):
            break
    t_enc, enc = ladder[-1]
    ok = width(enc) <= width(ref)
    rows.append(Row(
        name, "AIS (BDMC)", "equal BDMC width", ais_points, enc, ref,
        f"from q(z|x), T = {t_enc}, starting step size 0.1 x q's scale", f"from the prior, T = {t_eq}",
        f"width {width(enc):.2f} nats" + ("" if ok else " (wider)"), f"width {width(ref):.2f} nats",
        target=10.0, extra={"accuracy_ok": ok, "ladder": [(t, width(m), m.seconds) for t, m in ladder]},
    ))

    # IWAE-5000 with the encoder's q, on the AIS points (their BDMC upper bounds say how tight it is).
    best_upper = torch.stack(uppers).min(0).values
    log(f"{name}: IWAE-5000")
    ours = measure(lambda: iwae(model, x_ais, q_ais, num_samples=cfg.iwae_samples, seed=seed))
    ref = measure(lambda: iwae_one_at_a_time(model, x_ais, q_ais, num_samples=cfg.iwae_samples))
    rows.append(Row(
        name, f"IWAE-{cfg.iwae_samples}", "equal settings", ais_points, ours, ref,
        "all points at once, chunked", "one point at a time, 1,000 samples a pass",
        f"{_mean(best_upper - ours.value):.2f} below BDMC upper", f"{_mean(best_upper - ref.value):.2f} below BDMC upper",
    ))
    return rows


# --------------------------------------------------------------------------- matmul throughput


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    return min(_timed(fn, device)[1] for _ in range(repeats))


def peak_matmul_flops(device: torch.device, dtype=torch.float32) -> tuple:
    """(FLOP/s, n) of the fastest n x n by n x n matmul: the machine's measured matmul throughput."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _best_seconds(lambda: a @ b, device, 5), n


def inner_loop_utilization(model, num_rows: int, num_leapfrog: int, num_transitions: int, seconds: float,
                           device: torch.device) -> Optional[dict]:
    """gapbench's AIS inner loop against the machine's matmul throughput (None for non-MLP decoders).

    One gradient of log p(x, z) for M = chains x points rows costs 2 M sum d_in d_out
    FLOPs forward and as many backward (the input gradient of every layer, the first
    included); a transition takes ``num_leapfrog`` of them. ``seconds`` is the
    measured time of ``num_transitions`` transitions.
    """
    from gapbench.inference.gradients import mlp_decoder

    spec = mlp_decoder(model)
    if spec is None:
        return None
    layers, _ = spec
    dtype = layers[0][0].dtype
    flops_per_gradient = 4 * num_rows * sum(w.shape[0] * w.shape[1] for w, _ in layers)
    flops = flops_per_gradient * num_leapfrog * num_transitions
    ais_rate = flops / seconds
    peak, n = peak_matmul_flops(device, dtype)
    # The same matmuls, back to back, with nothing in between: the inner loop's matmul-only time.
    h0 = torch.randn(num_rows, layers[0][0].shape[1], device=device, dtype=dtype)
    grads = [torch.randn(num_rows, w.shape[0], device=device, dtype=dtype) for w, _ in layers]

    def matmuls():
        h = h0
        for w, b in layers:
            h = torch.nn.functional.linear(h, w, b)
        for (w, _), g in zip(layers, grads):
            g @ w

    matmul_seconds = _best_seconds(matmuls, device, 20) * num_leapfrog * num_transitions
    return {
        "rows": num_rows, "layers": " -> ".join([str(layers[0][0].shape[1])] + [str(w.shape[0]) for w, _ in layers]),
        "ais_gflops": ais_rate / 1e9, "peak_gflops": peak / 1e9, "peak_n": n,
        "matmul_only_gflops": flops / matmul_seconds / 1e9, "fraction_of_peak": ais_rate / peak,
        "matmul_fraction": matmul_seconds / seconds,
    }


def utilization_table(entries: list) -> str:
    head = ("| model | rows M (chains x points) | decoder | AIS inner loop GFLOP/s | peak matmul GFLOP/s (n) "
            "| fraction of peak | its matmuls alone GFLOP/s | time in matmuls |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for name, u in entries:
        lines.append(
            f"| {name} | {u['rows']} | {u['layers']} | {u['ais_gflops']:.1f} | {u['peak_gflops']:.1f} ({u['peak_n']}) "
            f"| **{100 * u['fraction_of_peak']:.0f}%** | {u['matmul_only_gflops']:.1f} | {100 * u['matmul_fraction']:.0f}% |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- output


def table(rows: List[Row]) -> str:
    head = ("| model | estimator | compared at | points | gapbench s | reference s | speedup | gapbench pts/s "
            "| reference pts/s | gapbench peak MB | reference peak MB | gapbench accuracy | reference accuracy | target |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.estimator} | {r.compared_at} | {r.num_points} | {r.ours.seconds:.2f} | {r.ref.seconds:.2f} "
            f"| **{r.speedup:.1f}x** | {r.num_points / r.ours.seconds:.2f} | {r.num_points / r.ref.seconds:.2f} "
            f"| {r.ours.peak_mb:.0f} | {r.ref.peak_mb:.0f} | {r.ours_accuracy} | {r.ref_accuracy} | {r.verdict()} |"
        )
    return "\n".join(lines)


def settings_lines(rows: List[Row]) -> str:
    out = []
    for r in rows:
        out.append(f"* {r.model} / {r.estimator} / {r.compared_at}: gapbench {r.ours_settings}; reference {r.ref_settings}")
        if "ladder" in r.extra:
            steps = ", ".join(f"T={t}: width {w:.2f} in {s:.1f} s" for t, w, s in r.extra["ladder"])
            out.append(f"  gapbench from q(z|x): {steps}")
    return "\n".join(out)


@dataclass
class Config:
    mnist_points: int
    mnist_ais_points: int
    digits_points: int
    digits_ais_points: int
    ais_steps: int
    ais_chains: int
    ais_ladder: tuple
    iwae_samples: int
    max_steps: int
    published_max_steps: int
    digits_epochs: int
    repeats: int = 1  # AIS at equal settings: best of this many alternating runs
    local_target: float = 5.0  # local FFG at equal final ELBO: the speedup to meet
    # Local fits' one-at-a-time references on only this many of the points, their time scaled to all
    # (it is linear in the points: each is fitted alone) and accuracy compared on those points; None: all.
    reference_points: Optional[int] = None


FULL = Config(8, 16, 25, 16, 200, 16, (10, 20, 40, 80), 5000, 3000, 20000, 20, repeats=3)
QUICK = Config(3, 2, 6, 4, 20, 4, (5, 10, 20), 1000, 300, 300, 3)
# On a GPU: more datapoints and chains per batch (a GPU wants wide batches), the 100x local-fit target.
# The references' one-point fits run at a GPU's per-step latency (~1 ms), so they are timed on 4 points.
GPU = Config(16, 100, 50, 100, 200, 100, (10, 20, 40, 80), 5000, 3000, 20000, 20, repeats=3, local_target=100.0,
             reference_points=4)


def main(argv=None) -> List[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of about a minute")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where both implementations run (cuda: larger sizes and the 100x local-fit target)")
    parser.add_argument("--compile", action="store_true", help="also time gapbench's AIS with compile=True")
    parser.add_argument("--fixture", type=Path, default=FIXTURE, help="the pretrained MNIST VAE (.npz)")
    parser.add_argument("--models", nargs="+", default=["mnist", "digits"], choices=["mnist", "digits"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device; run without --device")
    cfg = QUICK if args.quick else (GPU if device.type == "cuda" else FULL)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    rows, notes, utilization = [], [], []
    common = dict(device=device, compile=args.compile, notes=notes, utilization=utilization)
    if "mnist" in args.models:
        if args.fixture.is_file():
            model, simulate = mnist_model(args.fixture, device)
            rows += bench_model("MNIST VAE", model, simulate, cfg.mnist_points, cfg.mnist_ais_points, cfg, args.seed,
                                log, **common)
        else:
            notes.append(f"MNIST VAE skipped: no weights at {args.fixture}")
    if "digits" in args.models:
        log("digits: training the quickstart VAE")
        model, simulate, note = digits_model(cfg.digits_epochs, args.threads, device)
        torch.set_num_threads(args.threads)
        notes.append(f"digits VAE: recipes/quickstart.yaml, {note}")
        rows += bench_model("digits VAE", model, simulate, cfg.digits_points, cfg.digits_ais_points, cfg, args.seed,
                            log, **common)

    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, host {platform.machine()} CPU"
    else:
        where = (f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other processes "
                 "(timings vary with their load)")
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else MEMORY_METHOD
    print(f"gapbench speed benchmark{' (--quick)' if args.quick else ''}: {where}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"peak memory by {memory}, total {time.perf_counter() - started:.0f} s\n")
    print(table(rows))
    print()
    print(settings_lines(rows))
    for note in notes:
        print(f"* {note}")
    if utilization:
        print()
        print("gapbench's AIS inner loop (the equal-settings run) against this machine's matmul throughput:\n")
        print(utilization_table(utilization))
    return rows


if __name__ == "__main__":
    main()
