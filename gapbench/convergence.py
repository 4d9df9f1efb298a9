"""How far the estimators converged, stated beside every number they produced.

* Local fits (q*): how many datapoints stopped by the stopping rule (no new best
  in ``patience`` checks), how many were cut off at ``max_steps`` and how many
  collapsed. A fit cut off at its cap is still rising, so its L[q*] is too low
  and the amortization gap too small. A collapsed fit ended far below its best
  check (its step size too large); its q* is its best check's, which may be short
  of the optimum.
* AIS: the change of the mean estimate over the last doubling of intermediate
  distributions, from the convergence sweep (the same points annealed with T/2
  and T steps), with its standard error over those points. AIS is a stochastic
  lower bound that rises towards log p(x) as T grows; a change of more than
  ``evaluate.ais.convergence_tolerance`` nats says it has not got there.

Each shortfall becomes one warning naming the recipe key that fixes it.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

FAMILY_LABEL = {"ffg": "FFG", "flow": "Flow", "realnvp": "RealNVP"}


def local_convergence(df: pd.DataFrame, families: Sequence[str], max_steps: int) -> Dict[str, Dict]:
    """Per family: fits converged by the stopping rule, stopped at the step cap, failed (non-finite)."""
    out = {}
    for fam in families:
        if f"converged_{fam}" not in df:
            continue
        converged = df[f"converged_{fam}"].to_numpy() > 0.5
        finite = np.isfinite(df[f"elbo_{fam}"].to_numpy())
        steps = df[f"steps_{fam}"].to_numpy() if f"steps_{fam}" in df else np.full(len(df), np.nan)
        # Results written before collapses were detected have no such column: none was flagged.
        collapsed = (df[f"collapsed_{fam}"].to_numpy() > 0.5) if f"collapsed_{fam}" in df else np.zeros(len(df), bool)
        at_cap = ~converged & ~collapsed & finite & (steps >= max_steps)
        out[fam] = {
            "num_points": int(len(df)),
            "converged": int(converged.sum()),
            "at_step_cap": int(at_cap.sum()),
            "collapsed": int(collapsed.sum()),
            "failed": int((~converged & ~at_cap & ~collapsed).sum()),
            "max_steps": int(max_steps),
            "mean_steps": float(np.nanmean(steps)) if len(df) and np.isfinite(steps).any() else math.nan,
        }
    return out


def ais_convergence(steps: Sequence[int], log_px: np.ndarray, tolerance: float) -> Optional[Dict]:
    """Change of the mean AIS estimate over the sweep's last doubling of steps.

    ``steps`` [G] increasing, ``log_px`` [G, n] (the same n points at every T).
    Returns None when the sweep has no step count at or below half the last.
    """
    steps = list(int(s) for s in steps)
    if len(steps) < 2:
        return None
    last = steps[-1]
    below = [i for i, s in enumerate(steps[:-1]) if s <= last // 2 + (last % 2)]
    if not below:
        return None
    i = below[-1]
    diff = np.asarray(log_px[-1], dtype=np.float64) - np.asarray(log_px[i], dtype=np.float64)
    diff = diff[np.isfinite(diff)]
    n = int(diff.size)
    change = float(diff.mean()) if n else math.nan
    se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {
        "from_steps": steps[i],
        "to_steps": last,
        "change": change,
        "se": se,
        "num_points": n,
        "tolerance": float(tolerance),
        "converged": bool(n and abs(change) <= tolerance),
    }


def warnings_for(convergence: Dict) -> List[str]:
    """One line per shortfall, each with the key that fixes it."""
    lines = []
    for fam, c in convergence.get("local", {}).items():
        label = FAMILY_LABEL.get(fam, fam)
        if c["at_step_cap"]:
            lines.append(
                f"q*_{label}: {c['at_step_cap']} of {c['num_points']} local fits stopped at the step cap "
                f"(evaluate.local.max_steps={c['max_steps']}) before converging, so their L[q*] is too low; "
                "raise evaluate.local.max_steps"
            )
        if c.get("collapsed"):
            key = "evaluate.local.lr" if fam == "ffg" else "evaluate.local.flow_lr"
            lines.append(
                f"q*_{label}: {c['collapsed']} of {c['num_points']} local fits collapsed (their loss ended far "
                "above its best, a step size too large for them); their L[q*] is their best check's and may be "
                f"too low; lower {key}"
            )
    a = convergence.get("ais")
    if a is not None and not a["converged"]:
        lines.append(
            f"AIS moved {a['change']:+.3f} ± {_se(a['se'], 3)} nats from {a['from_steps']} to {a['to_steps']} steps "
            f"(mean over {a['num_points']} points), more than evaluate.ais.convergence_tolerance={a['tolerance']:g}: "
            "log p̂(x) has not converged; raise evaluate.ais.num_steps"
        )
    return lines


def summary_text(convergence: Dict) -> str:
    """'q*_FFG converged 100/100, q*_Flow 78/100; AIS +0.01 ± 0.01 nats over the last doubling of steps'."""
    parts = []
    for fam, c in convergence.get("local", {}).items():
        parts.append(f"q*_{FAMILY_LABEL.get(fam, fam)} converged {c['converged']}/{c['num_points']}")
    text = ", ".join(parts)
    a = convergence.get("ais")
    if a is not None:
        ais = f"AIS {a['change']:+.2f} ± {_se(a['se'])} nats over the last doubling of steps ({a['from_steps']} -> {a['to_steps']})"
        text = f"{text}; {ais}" if text else ais
    return text


def _se(se, digits: int = 2) -> str:
    return "n/a" if se is None or (isinstance(se, float) and not math.isfinite(se)) else f"{se:.{digits}f}"
