"""Checks made before any work starts, so that a recipe that cannot finish fails in a second, not after training.

* The evaluation's datapoints exist: ``evaluate.num_points`` is at most the size
  of the chosen split (known once the data are loaded, before training).
* Memory: a rough estimate of the largest working set of training and of each
  evaluation stage (parameters, Adam moments, and the [samples x points x width]
  activations of one pass) against the memory available on the device. It is a
  lower estimate on purpose: it refuses only settings that cannot fit (a latent
  of 100,000 dimensions with per-datapoint flows, millions of samples per pass),
  never a recipe that would have run.
"""

from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Tuple

import torch

from gapbench.errors import GapbenchError

log = logging.getLogger(__name__)

_FLOAT = 4  # bytes of a float32
# One pass keeps about this many activations per width for backward (inputs and outputs of each layer).
_GRAD_FACTOR = 2


def check_before_training(recipe, inputs, dev: torch.device) -> None:
    """Everything about the recipe that can fail later but can be checked now."""
    check_split_sizes(recipe, inputs)
    check_memory(recipe, inputs, dev)


def check_split_sizes(recipe, inputs) -> None:
    cfg = recipe.evaluate
    available = int(inputs.split(cfg.split).shape[0])
    if cfg.num_points > available:
        raise GapbenchError(
            f"evaluate.num_points: the {cfg.split} split of {recipe.data.dataset} has {available} datapoints, "
            f"fewer than the {cfg.num_points} asked for; ask for at most {available} "
            f"(--set evaluate.num_points={available})"
        )
    if inputs.train.shape[0] == 0:
        raise GapbenchError(f"data: the training split of {recipe.data.dataset} is empty; check data.num_train")


def available_memory(dev: torch.device) -> Optional[int]:
    """Bytes free on the device now (None when unknown)."""
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(recipe, inputs, dev: torch.device) -> List[Tuple[str, int, str]]:
    """(what, bytes, the keys that shrink it) for training and each evaluation stage; a lower estimate."""
    from gapbench.experiment import build_model
    from gapbench.inference._common import DEFAULT_PAIRS_PER_PASS

    m, t, cfg = recipe.model, recipe.train, recipe.evaluate
    with torch.device("meta"):  # shapes only: no memory, no time
        model = build_model(recipe, inputs)
    num_params = sum(p.numel() for p in model.parameters())
    num_pixels = math.prod(inputs.image_shape)
    d = m.latent_dim
    # Widths of one pass through encoder and decoder, per (sample, datapoint) pair.
    width = num_pixels + sum(m.encoder_hidden) + 3 * d + sum(m.decoder_hidden) + num_pixels * (inputs.num_levels or 1)
    out = [(
        "training",
        _FLOAT * (4 * num_params + _GRAD_FACTOR * t.batch_size * t.num_samples * width),
        "model.latent_dim, the hidden sizes or train.batch_size",
    )]
    n = min(cfg.batch_size, cfg.num_points)
    pairs = DEFAULT_PAIRS_PER_PASS.get(dev.type, DEFAULT_PAIRS_PER_PASS["cuda"])
    rows = max(1, pairs // n) * n
    out.append(("L[q] and IWAE", _FLOAT * (num_params + rows * width), "model.latent_dim or evaluate.batch_size"))
    from gapbench.gaps import local_family_kwargs, stage_names

    for stage in stage_names(cfg, m.encoder):
        if not stage.startswith("local_"):
            continue
        fam = stage.split("_", 1)[1]
        per_point = _family_params(fam, d, local_family_kwargs(fam, cfg, m))
        fits = _FLOAT * 4 * n * per_point  # parameters, gradients, two Adam moments
        passes = _FLOAT * _GRAD_FACTOR * cfg.local.num_samples * n * width
        out.append((f"the local {fam} fit of {n} points at once", _FLOAT * num_params + fits + passes,
                    "evaluate.batch_size, evaluate.local.num_samples or model.latent_dim"))
    if cfg.ais.enabled:
        out.append((f"AIS with {cfg.ais.num_chains} chains for {n} points",
                    _FLOAT * (num_params + _GRAD_FACTOR * cfg.ais.num_chains * n * width),
                    "evaluate.ais.num_chains, evaluate.batch_size or model.latent_dim"))
    return out


def _family_params(family: str, latent_dim: int, kwargs) -> int:
    """Parameters of one datapoint's member of ``family``.

    Counted exactly on the meta device at three small latent sizes and extended by the
    quadratic through them (every family's count is a polynomial of degree <= 2 in the
    latent size at fixed hidden sizes), so a huge latent is never built, even on meta.
    """
    from gapbench.models import get_family as family_of  # importing gapbench.models registers the flows

    def count(d: int) -> int:
        params = family_of(family, d, **kwargs).init_params(1, device=torch.device("meta"))
        return int(sum(v[:1].numel() for v in params.values()))

    try:
        if latent_dim <= 16:
            return count(latent_dim)
        c4, c8, c16 = count(4), count(8), count(16)
    except Exception:  # an estimate only: a family that cannot be counted counts its mean and variance
        return 2 * latent_dim
    # Newton's form of the quadratic through (4, c4), (8, c8), (16, c16).
    d1 = (c8 - c4) / 4
    d2 = ((c16 - c8) / 8 - d1) / 12
    return int(round(c4 + d1 * (latent_dim - 4) + d2 * (latent_dim - 4) * (latent_dim - 8)))


def check_memory(recipe, inputs, dev: torch.device) -> None:
    """Refuse settings whose estimated working set exceeds the device's free memory."""
    free = available_memory(dev)
    if free is None:
        return
    for what, need, keys in estimate_memory(recipe, inputs, dev):
        if need > free:
            raise GapbenchError(
                f"{what} needs at least {_gib(need)} of memory (model.latent_dim={recipe.model.latent_dim}), more "
                f"than the {_gib(free)} free on {dev.type}; lower {keys}"
            )
        log.debug("memory estimate: %s %s of %s free", what, _gib(need), _gib(free))


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"
