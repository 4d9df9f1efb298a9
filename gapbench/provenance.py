"""What produced a result: recorded with every output, and compared before anything is reused.

An evaluation's *context* is everything its numbers depend on besides the
estimator settings (which each stage keys on separately): the checkpoint's
content hash, the data selection (dataset settings, your own data by its
sha256 rather than its path, split, the chosen points and a hash of their
values), the seed and batching, the model section, the package version, the
git commit with a dirty flag, the torch version and the device type. A
finished batch or a gaps file is reused only when its context equals the
current one; the date, the processor's or GPU's name and the checkpoint's
epoch are recorded beside it but do not decide reuse.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import platform
from typing import Any, Dict, List

import torch

from gapbench import __version__
from gapbench.io import git_state

# Recorded with a result, never compared: they change without changing the numbers (layout: the
# processes that computed it, gapbench.scale).
RECORDED_ONLY = ("date", "device_name", "checkpoint_epoch", "layout")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """Content hash of a tensor's values (dtype and shape included)."""
    arr = t.detach().cpu().contiguous()
    head = f"{arr.dtype}{tuple(arr.shape)}".encode()
    return sha256_bytes(head + arr.numpy().tobytes())


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_versions() -> Dict[str, Any]:
    """The package version, git commit and dirty flag of gapbench's sources, and torch's version."""
    git = git_state()
    return {
        "gapbench_version": __version__,
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "torch_version": str(torch.__version__),  # a TorchVersion, which a weights-only load refuses
    }


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def evaluation_context(run, recipe, points: torch.Tensor, values: torch.Tensor, dev: torch.device) -> Dict[str, Any]:
    """Everything an evaluation's numbers depend on besides each stage's own settings.

    ``points``: the chosen indices into the split; ``values``: those datapoints as the
    model sees them (hashed, so a changed data file or binarization is caught too).
    """
    data = dataclasses.asdict(recipe.data)
    for where in ("data_dir", "download", "path"):  # where the files were found does not change them
        data.pop(where, None)
    for key in ("sha256", "num_test"):  # your own data's keys: absent for the built-in datasets
        if data.get(key) is None:
            data.pop(key, None)
    cfg = recipe.evaluate
    return {
        "checkpoint_sha256": run.checkpoint_sha256,
        "data": {
            **data,
            "split": cfg.split,
            "num_points": int(points.numel()),
            "points_sha256": tensor_sha256(points.long()),
            "values_sha256": tensor_sha256(values),
        },
        "seed": recipe.seed,
        "batch_size": cfg.batch_size,
        "model": _plain(dataclasses.asdict(recipe.model)),
        **code_versions(),
        "device": dev.type,
    }


def with_recorded(context: Dict[str, Any], run, dev: torch.device) -> Dict[str, Any]:
    """The context plus what is recorded but not compared (date, device name, checkpoint epoch)."""
    return {
        **context,
        "checkpoint_epoch": int(run.checkpoint.get("epoch", 0) or 0),
        "device_name": device_name(dev),
        "date": now(),
    }


def compared(context: Dict[str, Any]) -> Dict[str, Any]:
    """The part of a recorded context that decides reuse."""
    return {k: v for k, v in context.items() if k not in RECORDED_ONLY}


def differences(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    """The keys whose values differ, as 'key old -> new' (hashes shortened), nested keys dotted."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(none)"), new.get(key, "(none)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {_short(a)} -> {_short(b)}")
    return out


def describe(old: Dict[str, Any], new: Dict[str, Any], limit: int = 4) -> str:
    """One line: what changed between two contexts or settings."""
    diff = differences(old, new)
    if not diff:
        return "nothing"
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return ", ".join(diff[:limit]) + more


def _short(v: Any) -> str:
    if isinstance(v, str) and len(v) >= 32 and all(c in "0123456789abcdef" for c in v):
        return v[:8]
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj

