"""Progress reports from an estimator's loop, throttled so they cost nothing measurable.

An estimator that takes ``progress_fn`` calls it as ``progress_fn(done, total)``
(numbers in the estimator's own unit of work, documented where it is taken) at
most once per :data:`INTERVAL_S` seconds of wall time, and once more when it
has finished, with ``done == total``. The callback only observes: it touches
no tensor and no random generator, so results are the same with or without it.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

ProgressFn = Callable[[int, int], None]

INTERVAL_S = 0.2  # seconds of wall time between two reports, at least


class Throttled:
    """``progress_fn`` called at most once per ``interval_s`` seconds (time.monotonic;
    None: :data:`INTERVAL_S`), plus once at :meth:`finish`."""

    def __init__(self, progress_fn: ProgressFn, interval_s: Optional[float] = None):
        self.progress_fn = progress_fn
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self.progress_fn(done, total)

    def finish(self, done: int, total: int) -> None:
        """The last report, whatever the time since the previous one."""
        self.progress_fn(done, total)


def throttled(progress_fn: Optional[ProgressFn], interval_s: Optional[float] = None) -> Optional[Throttled]:
    """A :class:`Throttled` ``progress_fn``, or None when there is none (the loop then skips reporting)."""
    return None if progress_fn is None else Throttled(progress_fn, interval_s)
