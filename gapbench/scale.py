"""Where this process stands among the processes sharing one piece of work.

Three layouts, read from the command line and the environment:

* one process (the default);
* a torchrun rank: ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set by torchrun
  (or by any launcher that sets them with ``MASTER_ADDR`` / ``MASTER_PORT``);
* one shard of a job array: ``--shard I/N`` (shards numbered 0 to N-1), or a
  scheduler's ``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT`` when no
  ``--shard`` is given.

Evaluation's unit of work is a batch (all of its stages); worker ``r`` of ``n``
takes batches ``r, r + n, r + 2n, ...``, so each batch is done exactly once at
any scale, and the numbers do not depend on the layout because each (stage,
batch) carries its own seed.

torchrun ranks coordinate through the key-value store that torch.distributed
already runs for them (:class:`Team`): each rank posts its status and a
heartbeat; a rank waiting on the others stops, non-zero and naming the rank,
as soon as one posts a failure or its heartbeat stops for
``GAPBENCH_RANK_TIMEOUT`` seconds (default 300), instead of hanging at a barrier.
Job-array shards never wait on one another: they share the run folder (which
must be on a file system every shard sees) and the last to finish assembles.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

from gapbench.errors import GapbenchError

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0
POLL_SECONDS = 0.2
DEFAULT_RANK_TIMEOUT = 300.0


@dataclass(frozen=True)
class Workers:
    """This process's place: ``rank`` of ``world_size`` (``kind``: single, torchrun or shard)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    kind: str = "single"

    def owns(self, batch: int) -> bool:
        return batch % self.world_size == self.rank

    def share(self, num_batches: int) -> List[int]:
        """The batches this worker takes, in order."""
        return list(range(self.rank, num_batches, self.world_size))

    def owner(self, batch: int) -> int:
        return batch % self.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.kind == "torchrun" and self.world_size > 1

    @property
    def sharded(self) -> bool:
        return self.kind == "shard"

    def label(self, rank: Optional[int] = None) -> str:
        rank = self.rank if rank is None else rank
        if self.kind == "torchrun":
            return f"rank {rank} of {self.world_size}"
        if self.kind == "shard":
            return f"shard {rank}/{self.world_size}"
        return "the only process"


SINGLE = Workers()


def parse_shard(text: str) -> Workers:
    """``"I/N"`` -> shard I of N (0 <= I < N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise GapbenchError(f"--shard {text}: give I/N, shard I of N counted from 0 (e.g. --shard 0/4)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise GapbenchError(f"--shard {text}: shards of {n} are numbered 0 to {max(n - 1, 0)}; "
                            f"give I/N with 0 <= I < N")
    return Workers(rank=i, world_size=n, kind="shard")


def _env_int(env, name: str) -> Optional[int]:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise GapbenchError(f"${name}={value!r} is not a whole number; unset it or fix the launcher") from None


def _slurm_array(env) -> Optional[Workers]:
    task = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    first = _env_int(env, "SLURM_ARRAY_TASK_MIN") or 0
    if count is None:
        raise GapbenchError("$SLURM_ARRAY_TASK_ID is set but $SLURM_ARRAY_TASK_COUNT is not; "
                            "pass --shard I/N to say which shard this task is")
    i = task - first
    if not 0 <= i < count:
        raise GapbenchError(
            f"array task {task} (first {first}, {count} tasks) is not one of tasks {first}..{first + count - 1}: "
            "give the array a contiguous range (--array=0-N) or pass --shard I/N")
    return Workers(rank=i, world_size=count, kind="shard")


def detect(shard: Optional[str] = None, env=None) -> Workers:
    """This process's layout from ``--shard`` (when given), torchrun's variables and a job array's."""
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE")
    torchrun = world is not None and _env_int(env, "RANK") is not None
    array = parse_shard(shard) if shard else _slurm_array(env)
    if torchrun and world > 1:
        if array is not None:
            source = f"--shard {shard}" if shard else "a job array ($SLURM_ARRAY_TASK_ID)"
            raise GapbenchError(
                f"started by torchrun (WORLD_SIZE={world}) and as {source}: use one or the other "
                "(under torchrun the ranks share the batches; unset SLURM_ARRAY_TASK_ID or drop --shard)")
        rank = _env_int(env, "RANK")
        if not 0 <= rank < world:
            raise GapbenchError(f"RANK={rank} is not below WORLD_SIZE={world}; check the launcher")
        local = _env_int(env, "LOCAL_RANK")
        return Workers(rank=rank, world_size=world, local_rank=rank if local is None else local, kind="torchrun")
    return array or SINGLE


def rank_timeout() -> float:
    value = os.environ.get("GAPBENCH_RANK_TIMEOUT")
    if not value:
        return DEFAULT_RANK_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise GapbenchError(f"$GAPBENCH_RANK_TIMEOUT={value!r}: give seconds, e.g. 300") from None
    if seconds <= 0:
        raise GapbenchError(f"$GAPBENCH_RANK_TIMEOUT={value!r}: give a positive number of seconds")
    return seconds


class RankFailed(GapbenchError):
    """Another rank failed or stopped answering; this one stops too."""


class Team:
    """torchrun ranks: the process group, and status keys with heartbeats in its store.

    ``post(phase, value)`` publishes this rank's value for a phase; ``gather(phase)``
    waits until every rank (or ``ranks``) posted it and returns their values, raising
    :class:`RankFailed` (naming the rank) if one fails or goes silent meanwhile.
    """

    def __init__(self, workers: Workers, backend: str):
        import torch.distributed as dist

        self.workers = workers
        self.timeout = rank_timeout()
        if not dist.is_initialized():
            # Collectives (DDP's gradient reduction) wait at most this long; the status
            # keys below notice a failed rank much sooner.
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=max(self.timeout, 60)))
        self.backend = dist.get_backend()
        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"gapbench/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{restart}/"
        # Our own connections to the store that init_process_group started (torchrun's agent or
        # rank 0 hosts it): one for this thread, one for the heartbeat thread.
        wait = datetime.timedelta(seconds=max(self.timeout, 60))
        self.store = dist.TCPStore(host, port, is_master=False, timeout=wait)
        self._beat_store = dist.TCPStore(host, port, is_master=False, timeout=wait)
        self._stop = threading.Event()
        self._seen: Dict[int, tuple] = {}
        self._phase_count: Dict[str, int] = {}
        self._beat = threading.Thread(target=self._heartbeat, name="gapbench-heartbeat", daemon=True)
        self._beat.start()

    def _key(self, *parts) -> str:
        return self.prefix + "/".join(str(p) for p in parts)

    def _heartbeat(self) -> None:
        key = self._key("heartbeat", self.workers.rank)
        while not self._stop.is_set():
            try:
                self._beat_store.add(key, 1)
            except Exception:  # the store went away: the job is ending
                return
            self._stop.wait(HEARTBEAT_SECONDS)

    def phase(self, name: str) -> str:
        """A fresh name for the n-th use of ``name`` in this process (every rank counts alike)."""
        n = self._phase_count.get(name, 0)
        self._phase_count[name] = n + 1
        return f"{name}.{n}"

    def claim(self, phase: str) -> bool:
        """True for exactly one rank: the first to ask (a unit of work that any rank may take)."""
        return int(self.store.add(self._key("claim", phase), 1)) == 1

    def post(self, phase: str, value: str = "ok") -> None:
        self.store.set(self._key("phase", phase, self.workers.rank), value)

    def fail(self, message: str) -> None:
        """Tell the other ranks this one failed (they stop with ``message``)."""
        try:
            self.store.set(self._key("failed", self.workers.rank), message[:1000])
        except Exception:  # nothing to tell them through
            pass

    def _failure(self, ranks: Iterable[int]) -> Optional[str]:
        for r in ranks:
            key = self._key("failed", r)
            if self.store.check([key]):
                return f"{self.workers.label(r)} failed: {self.store.get(key).decode(errors='replace')}"
        return None

    def _silent(self, ranks: Iterable[int]) -> Optional[int]:
        now = time.monotonic()
        for r in ranks:
            key = self._key("heartbeat", r)
            beats = int(self.store.add(key, 0))
            last = self._seen.get(r)
            if last is None or last[0] != beats:
                self._seen[r] = (beats, now)
            elif now - last[1] > self.timeout:
                return r
        return None

    def check(self, waiting_on: Optional[Iterable[int]] = None, what: str = "") -> None:
        """Raise :class:`RankFailed` if another rank has failed, or one of ``waiting_on`` (default: every
        other rank) has gone silent; ``what`` says what this rank was waiting for."""
        others = [r for r in range(self.workers.world_size) if r != self.workers.rank]
        failure = self._failure(others)
        if failure:
            raise RankFailed(f"{self.workers.label()} stops: {failure}")
        silent = self._silent(others if waiting_on is None else waiting_on)
        if silent is not None:
            raise RankFailed(
                f"{self.workers.label()} stops: {self.workers.label(silent)} has not answered for "
                f"{self.timeout:.0f} s{' while ' + what if what else ''} (killed, or its node lost); "
                "rerun the same command with --resume to compute only what is missing")

    def gather(self, phase: str, ranks: Optional[Iterable[int]] = None, what: str = "") -> Dict[int, str]:
        """Every rank's value for ``phase`` once all have posted it."""
        ranks = list(range(self.workers.world_size)) if ranks is None else list(ranks)
        keys = {r: self._key("phase", phase, r) for r in ranks}
        while not self.store.check(list(keys.values())):
            self.check(waiting_on=[r for r in ranks if r != self.workers.rank], what=what)
            time.sleep(POLL_SECONDS)
        return {r: self.store.get(k).decode() for r, k in keys.items()}

    def close(self) -> None:
        import torch.distributed as dist

        self._stop.set()
        self._beat.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()


_TEAM: Optional[Team] = None


def team(workers: Workers, device_type: str = "cpu") -> Team:
    """The process's :class:`Team` (started on first use, closed at exit)."""
    global _TEAM
    if _TEAM is None:
        _TEAM = Team(workers, "nccl" if device_type == "cuda" else "gloo")
        atexit.register(close_team)
    return _TEAM


def close_team() -> None:
    global _TEAM
    if _TEAM is not None:
        _TEAM.close()
        _TEAM = None


def rank_device(workers: Workers, dev):
    """``cuda:LOCAL_RANK`` for a torchrun rank on a GPU machine; the device unchanged otherwise."""
    import torch

    if workers.distributed and dev.type == "cuda":
        if workers.local_rank >= torch.cuda.device_count():
            raise GapbenchError(
                f"LOCAL_RANK={workers.local_rank} but torch sees {torch.cuda.device_count()} GPU(s) on this node: "
                "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(workers.local_rank)
        return torch.device("cuda", workers.local_rank)
    return dev
