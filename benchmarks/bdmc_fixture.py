"""BDMC sandwich on the pretrained MNIST VAE: how tight is AIS at gapbench's settings?

Simulates (z, x) from the model, runs forward AIS (lower bound) and reverse AIS
from the true z (upper bound), and prints the mean sandwich width
upper - lower over the points, for several schedule lengths, starting from
the prior, from the encoder's q(z|x) or from each point's fitted q*_FFG (fitted
from the encoder's q, Adam at 1e-2, stopped after 4 checks of 50 steps without a new
best; its time counts in the seconds),
with the seconds each run took.

    python benchmarks/bdmc_fixture.py                      # the default sweep
    python benchmarks/bdmc_fixture.py --num-points 100 --steps 1000 --starts prior

The width bounds the error of either AIS estimate on this model (Grosse et
al. 2015); a width under 1 nat at the defaults is what gapbench aims for.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gapbench.inference import bdmc, fit_local
from gapbench.inference.ais import DEFAULT_NUM_CHAINS, DEFAULT_NUM_STEPS
from gapbench.models.reference import load_npz_vae

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "mnist_vae_bdmc.npz"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    parser.add_argument("--num-points", type=int, default=10)
    parser.add_argument("--num-chains", type=int, default=DEFAULT_NUM_CHAINS)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300, 1000, 3000])
    parser.add_argument("--starts", nargs="+", default=["prior", "encoder"], choices=["prior", "encoder", "ffg"])
    parser.add_argument("--step-size", default="0.01",
                        help="starting HMC step size: a number (0.01, as published) or auto (0.1 x the start's scale)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    step_size = args.step_size if args.step_size == "auto" else float(args.step_size)
    model = load_npz_vae(args.fixture)
    print(f"MNIST VAE (latent 50), {args.num_points} simulated points, {args.num_chains} chains, "
          f"10 leapfrog steps, sigmoid schedule, starting step size {step_size}, {torch.get_num_threads()} thread(s); "
          f"defaults: num_steps={DEFAULT_NUM_STEPS}, num_chains={DEFAULT_NUM_CHAINS}")
    print(f"{'start':>8} {'steps':>6} {'lower':>9} {'upper':>9} {'width':>7} {'max w':>7} {'accept':>7} {'ESS':>6} {'seconds':>8}")
    starts = {"prior": None, "encoder": model.posterior, "ffg": lambda x: _fitted_ffg(model, x, args.seed)}
    for start in args.starts:
        for num_steps in args.steps:
            t0 = time.perf_counter()
            result = bdmc(model, args.num_points, num_steps=num_steps, num_chains=args.num_chains, seed=args.seed,
                          init_fn=starts[start], step_size=step_size)
            seconds = time.perf_counter() - t0
            width = result.width[result.finite]
            print(f"{start:>8} {num_steps:>6} {result.lower.mean():9.2f} {result.upper.mean():9.2f} "
                  f"{width.mean():7.3f} {width.max():7.3f} {result.forward.acceptance.mean():7.3f} "
                  f"{result.forward.ess.mean():6.1f} {seconds:8.1f}"
                  + ("" if result.finite.all() else f"  ({int((~result.finite).sum())} non-finite)"), flush=True)


def _fitted_ffg(model, x, seed):
    """Each point's q*_FFG, fitted from the encoder's q as gapbench's small recipes do."""
    with torch.no_grad():
        q = model.posterior(x)
    return fit_local(model, x, "ffg", init=q, lr=1e-2, check_every=50, patience=4, num_final_samples=10, seed=seed).q


if __name__ == "__main__":
    main()
