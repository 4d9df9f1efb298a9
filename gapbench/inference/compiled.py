"""Optional ``torch.compile`` of an estimator's inner loop, falling back to eager PyTorch.

An estimator asks for ``compiled(fn, device)`` and calls the result exactly as it
would call ``fn``. The first call compiles (seconds on a CPU, longer on a GPU); on
a CUDA device the compiled function also replays as a CUDA graph (torch.compile's
"reduce-overhead" mode), which removes the launch overhead of the many small
kernels of an HMC trajectory. Where compiling is not possible -- no C++ compiler,
an unsupported platform, a backend error -- the call is answered by ``fn`` itself,
one warning is logged, and the process does not try to compile ``fn`` again.

``fn`` must be a pure function of tensors (no random number generation, no
side effects), so that a failed compiled call can be repeated eagerly and a
compiled run gives the eager run's results up to floating-point rounding. An
error that the eager call raises too is the caller's, and propagates.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Tuple

import torch

logger = logging.getLogger("gapbench.inference")

_CACHE: Dict[Tuple[Callable, str], "Compiled"] = {}


def compile_mode(device: torch.device) -> str:
    """torch.compile's mode: CUDA graphs ("reduce-overhead") on CUDA devices, else "default"."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


class Compiled:
    """``fn`` compiled for one kind of device, or ``fn`` itself once compiling has failed."""

    def __init__(self, fn: Callable, device_type: str):
        self.fn = fn
        self.device_type = device_type
        self.failed = False
        self._compiled = None
        try:
            self._compiled = torch.compile(fn, mode=compile_mode(torch.device(device_type)), dynamic=False)
        except Exception as exc:  # torch.compile itself unavailable (e.g. an unsupported Python)
            self._give_up(exc)

    def _give_up(self, exc: BaseException) -> None:
        self.failed, self._compiled = True, None
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        logger.warning("torch.compile of %s failed on %s (%s: %s); running it without compiling",
                       getattr(self.fn, "__name__", "a function"), self.device_type, type(exc).__name__, first)

    def __call__(self, *args, **kwargs):
        if self._compiled is not None:
            try:
                if self.device_type == "cuda":
                    # Each call is a new step of the CUDA graph tree; its outputs are copied out
                    # of the graph's static buffers, which the next replay overwrites.
                    torch.compiler.cudagraph_mark_step_begin()
                    return _clone(self._compiled(*args, **kwargs))
                return self._compiled(*args, **kwargs)
            except Exception as exc:
                self._give_up(exc)
        return self.fn(*args, **kwargs)


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_clone(o) for o in out)
    return out


def compiled(fn: Callable, device) -> Compiled:
    """The compiled version of ``fn`` for ``device``'s kind, made once per process."""
    key = (fn, torch.device(device).type)
    if key not in _CACHE:
        _CACHE[key] = Compiled(fn, key[1])
    return _CACHE[key]
