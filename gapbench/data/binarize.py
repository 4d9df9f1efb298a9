"""Turning grey levels in [0, 1] into binary pixels, four ways.

* ``none``      -- x unchanged.
* ``threshold`` -- 1[x > 0.5], deterministic (Cremer et al. 2018 did this for
  Fashion-MNIST).
* ``static``    -- one Bernoulli draw b ~ Bernoulli(x) per split with a fixed
  seed, computed once and reused every epoch.
* ``dynamic``   -- a fresh Bernoulli draw of every training batch in every
  epoch (Burda et al. 2016); the trainer takes its generator from
  :func:`epoch_generator`, so epoch e draws the same pixels on every run and
  after a resume. For *evaluation*, dynamic data is scored on one fixed-seed
  draw of each split (:func:`prepare_split`), the standard practice, so that
  reported numbers do not move between evaluations.

A Bernoulli draw is ``u < x`` with u ~ U[0, 1) drawn on the generator's
device and then moved to x's device, so a CPU generator gives the same pixels
whether x lives on the CPU or a GPU.

Trainer recipe::

    x_eval = prepare_split(x, mode, seed)             # fixed splits, any mode
    gen = epoch_generator(seed, epoch)                 # dynamic: once per epoch
    xb = binarize_batch(x_train[idx], gen)             # dynamic: each batch
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

BINARIZE_MODES = ("none", "threshold", "static", "dynamic")


def _check_mode(mode: str) -> None:
    if mode not in BINARIZE_MODES:
        import difflib

        from gapbench.data.errors import DataError

        close = difflib.get_close_matches(str(mode), BINARIZE_MODES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DataError(f"unknown binarization {mode!r}: {hint}choose one of {', '.join(BINARIZE_MODES)}")


def binarize_batch(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One Bernoulli draw b ~ Bernoulli(x), elementwise; x [...] in [0, 1] -> same shape, dtype, device."""
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(x.shape, generator=generator, device=device)
    return (u.to(x.device) < x).to(x.dtype)


def binarize(x: torch.Tensor, mode: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x in [0, 1] binarized by ``mode`` (see the module docstring).

    ``static`` and ``dynamic`` make one Bernoulli draw with ``generator``;
    they differ only in how often the caller draws.
    """
    _check_mode(mode)
    if mode == "none":
        return x
    if mode == "threshold":
        return (x > 0.5).to(x.dtype)
    return binarize_batch(x, generator)


def prepare_split(x: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    """A fixed split as training and evaluation see it: threshold, or one Bernoulli draw seeded by ``seed``.

    For ``dynamic`` this is the fixed evaluation draw; training batches are
    drawn afresh with :func:`binarize_batch` and :func:`epoch_generator`.
    """
    _check_mode(mode)
    return binarize(x, mode, torch.Generator().manual_seed(int(seed)))


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for (seed, epoch, stream): nearby inputs give unrelated streams."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """The CPU generator of epoch ``epoch``: the same draws on every run and after a resume."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, stream))
