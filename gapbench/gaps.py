"""The gap decomposition of Cremer, Li & Duvenaud (2018), per datapoint.

For each datapoint x, on the same datapoints throughout:

    L[q]        ELBO of the amortized encoder                 (many samples)
    L[q_refined] ELBO of the training method's test-time refinement of q
                (only for methods that have one, e.g. SVI from the encoder's output)
    L[q*_F]     ELBO of the best member of family F for x alone (fit_local)
    IWAE_k      importance-weighted bound with q as proposal
    AIS         annealed importance sampling with HMC
    log p̂(x)   = max(IWAE_k, AIS)

    approximation gap = log p̂(x) − L[q*]    (the family is too simple)
    amortization gap  = L[q*] − L[q]         (the encoder misses the best member)
    inference gap     = log p̂(x) − L[q]     (their sum)

where q* is of the encoder's own family. With a refinement, the amortization gap
splits into the part it closes and the part that remains:

    refinement gain            = L[q_refined] − L[q]
    remaining amortization gap = L[q*] − L[q_refined]

Every estimate is a stochastic bound;
a gap that comes out negative (bounds in the wrong order) is kept, flagged and
counted, never clipped.

The work is split into *stages* (one estimator each) that run on batches of
datapoints, so an evaluation can save and resume batch by batch.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from gapbench.recipe import EvaluateConfig

Columns = Dict[str, torch.Tensor]


def stage_names(cfg: EvaluateConfig, encoder_family: str, refines: bool = False) -> List[str]:
    """The stages an evaluation runs: amortized ELBO, the refined ELBO (``refines``: the training
    method has a test-time refinement), one local fit per family, IWAE, AIS.

    The FFG fit comes first when flows start from it (``local.flow_init: ffg``).
    """
    families = list(dict.fromkeys(list(cfg.families) + [encoder_family]))
    if cfg.local.flow_init == "ffg" and any(f != "ffg" for f in families):
        families = ["ffg"] + [f for f in families if f != "ffg"]
    names = ["amortized"] + (["refined"] if refines else []) + [f"local_{f}" for f in families] + ["iwae"]
    if cfg.ais.enabled:
        names.append("ais")
    return names


def stage_label(stage: str) -> str:
    return {
        "amortized": "L[q] (amortized)",
        "refined": "L[q_refined] (test-time refinement)",
        "iwae": "IWAE",
        "ais": "AIS",
    }.get(stage, f"L[q*_{_FAMILY_NAMES.get(stage.split('_', 1)[-1], stage.split('_', 1)[-1])}] (local)")


_FAMILY_NAMES = {"ffg": "FFG", "flow": "Flow", "realnvp": "RealNVP"}


def local_family_kwargs(family: str, cfg: EvaluateConfig, model_cfg) -> Dict:
    """Sizes of a local flow: the evaluation's own, else the model's flow settings."""
    if family not in ("flow", "realnvp"):
        return {}
    return {
        "num_flow_steps": cfg.local.num_flow_steps or model_cfg.num_flow_steps,
        "flow_hidden": cfg.local.flow_hidden or model_cfg.flow_hidden,
    }


def local_init(family: str, cfg: EvaluateConfig):
    """Where the local fit of ``family`` starts: "prior", "encoder" or "ffg"."""
    return cfg.local.init if family == "ffg" else cfg.local.flow_init


def run_stage(
    stage: str,
    model,
    x: torch.Tensor,
    cfg: EvaluateConfig,
    seed: int,
    family_kwargs: Optional[Dict] = None,
    init=None,
    progress_fn: Optional[Callable[[int, int], None]] = None,
    method=None,
) -> Tuple[Columns, Dict[str, torch.Tensor]]:
    """Run one stage on a batch x [N, ...]: per-datapoint columns [N] and small traces.

    ``init`` (local stages) is the posterior a local fit starts from; None is the prior.
    ``method`` (the refined stage) is the training method whose ``refine`` gives q_refined.
    ``progress_fn(done, total)`` reports progress within the batch: passed on to fit_local
    (point-steps) and ais (transitions); the amortized and IWAE stages call it once, (1, 1), at the end.
    Local FFG fits also return their parameters (``ffg_mean``, ``ffg_log_var``) in the traces,
    so flows can start from them.
    """
    from gapbench.inference import fit_local, iwae
    from gapbench.inference.bounds import elbo_and_stderr

    torch.manual_seed(seed)
    if stage == "amortized":
        with torch.no_grad():
            q = model.posterior(x)
            value, stderr = elbo_and_stderr(model, x, q, cfg.elbo_samples)
        if progress_fn is not None:
            progress_fn(1, 1)
        return {"elbo_q": value, "elbo_q_se": stderr}, {}
    if stage == "refined":
        cols, _ = run_refined(method, model, x, cfg)
        if progress_fn is not None:
            progress_fn(1, 1)
        return cols, {}
    if stage == "iwae":
        with torch.no_grad():
            value = iwae(model, x, model.posterior(x), num_samples=cfg.iwae_samples, seed=seed)
        if progress_fn is not None:
            progress_fn(1, 1)
        return {"iwae": value}, {}
    if stage == "ais":
        res = run_ais(model, x, cfg, seed, init=init, progress_fn=progress_fn)
        cols = {
            "ais": res.log_px,
            "ais_ess": res.ess,
            "ais_acceptance": _per_point(res.acceptance, x.shape[0]),
        }
        return cols, {}
    if stage.startswith("local_"):
        family = stage.split("_", 1)[1]
        loc = cfg.local
        fit = fit_local(
            model,
            x,
            family=family,
            init=init,
            lr=loc.lr if family == "ffg" or loc.flow_lr is None else loc.flow_lr,
            num_samples=loc.num_samples,
            check_every=loc.check_every if family == "ffg" or loc.flow_check_every is None else loc.flow_check_every,
            patience=loc.patience,
            max_steps=loc.max_steps,
            num_final_samples=loc.num_final_samples,
            lr_decay=loc.lr_decay,
            improvement_se=loc.improvement_se,
            gradient=loc.gradient,
            seed=seed,
            family_kwargs=family_kwargs,
            progress_fn=progress_fn,
        )
        cols = {
            f"elbo_{family}": fit.elbo,
            f"elbo_{family}_se": fit.elbo_stderr,
            f"steps_{family}": fit.num_steps.double(),
            f"converged_{family}": fit.converged.double(),
            f"collapsed_{family}": fit.collapsed.double(),
        }
        traces = {"steps": fit.trace.steps, "elbo": fit.trace.elbo}
        if family == "ffg":
            traces.update(ffg_mean=fit.params["mean"], ffg_log_var=fit.params["log_var"])
        return cols, traces
    raise ValueError(f"unknown stage {stage!r}")


def run_refined(method, model, x: torch.Tensor, cfg: EvaluateConfig) -> Tuple[Columns, Optional[str]]:
    """L[q_refined] [N] and its Monte Carlo standard error from ``cfg.elbo_samples`` samples, and
    the family of q_refined ("ffg", ...; None when it is no family's member).

    q_refined = ``method.refine(x)``: the encoder's q followed by the method's own refinement, which
    may take gradients. It runs under the caller's seed. A refinement must leave the model as it
    found it (every later stage evaluates the same model): one that changes it is an error.
    """
    from gapbench.errors import GapbenchError
    from gapbench.inference.bounds import elbo_and_stderr
    from gapbench.models.posterior import as_posterior

    if method is None or not getattr(method, "refines", False):
        raise ValueError("the refined stage needs a training method with a test-time refinement")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    q = as_posterior(method.refine(x)).detach()
    model.zero_grad(set_to_none=True)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        raise GapbenchError(
            f"method {method.name!r}: refine() changed the model ({', '.join(changed[:3])}"
            f"{' and more' if len(changed) > 3 else ''}); a refinement may update q only"
        )
    value, stderr = elbo_and_stderr(model, x, q, cfg.elbo_samples)
    family = getattr(getattr(q, "family", None), "name", None) or None
    return {"elbo_refined": value, "elbo_refined_se": stderr}, family


def run_ais(model, x: torch.Tensor, cfg: EvaluateConfig, seed: int, num_steps: Optional[int] = None, init=None,
            progress_fn: Optional[Callable[[int, int], None]] = None):
    """AIS with the evaluation's settings (``num_steps`` overrides the recipe's); ``progress_fn`` as in :func:`ais`.

    It starts from ``init`` when given (the fitted q*_FFG), else the encoder's q
    (``ais.init: encoder``) or the prior.
    """
    from gapbench.inference import ais

    a = cfg.ais
    if init is None and a.init == "encoder":
        init = model.posterior(x)
    return ais(
        model,
        x,
        num_steps=a.num_steps if num_steps is None else num_steps,
        num_chains=a.num_chains,
        num_leapfrog=a.num_leapfrog,
        schedule=a.schedule,
        init=init,
        seed=seed,
        compile=a.compile,
        progress_fn=progress_fn,
    )


def _per_point(value, n: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() == 0:
        return t.expand(n).clone()
    if t.dim() == 2:  # [C, N] per chain
        return t.mean(0)
    return t


def order_pairs(encoder_family: str, families: Sequence[str], refined: bool = False,
                refined_family: Optional[str] = None) -> List[Tuple[str, str, str]]:
    """The bound orders to check, as (name, lower column, higher column).

    L[q*] <= log p̂(x) for every family; L[q] <= L[q*] for the families that contain
    the encoder's (:func:`contains_encoder_family`). With a refinement (``refined``):
    L[q_refined] <= log p̂(x) always; and when q_refined is a member of ``refined_family``,
    L[q] <= L[q_refined] if that family contains the encoder's (a refinement of q is meant to
    improve it), and L[q_refined] <= L[q*] for each family that contains ``refined_family``.
    """
    pairs = []
    all_families = list(dict.fromkeys(list(families) + [encoder_family]))
    if refined and refined_family is not None and contains_encoder_family(refined_family, encoder_family):
        pairs.append(("elbo_q > elbo_refined", "elbo_q", "elbo_refined"))
    for fam in all_families:
        if contains_encoder_family(fam, encoder_family):
            pairs.append((f"elbo_q > elbo_{fam}", "elbo_q", f"elbo_{fam}"))
        if refined and refined_family is not None and contains_family(fam, refined_family):
            pairs.append((f"elbo_refined > elbo_{fam}", "elbo_refined", f"elbo_{fam}"))
        pairs.append((f"elbo_{fam} > log_px", f"elbo_{fam}", "log_px"))
    if refined:
        pairs.append(("elbo_refined > log_px", "elbo_refined", "log_px"))
    return pairs


def contains_family(family: str, member: str) -> bool:
    """Whether every member of family ``member`` is a member of ``family``: itself, and the FFG
    in every family here."""
    return family == member or member == "ffg"


def contains_encoder_family(family: str, encoder_family: str) -> bool:
    """Whether q* of ``family`` must do at least as well as the encoder's q: L[q] <= L[q*_family].

    True when the family contains the encoder's: its own family, or any family for an
    FFG encoder (every family here has the FFG as a member). The best FFG of a flow
    encoder's model may well fall below the flow q (Cremer et al.: the decoder adapts to
    its encoder's family), so that is no violation.
    """
    return contains_family(family, encoder_family)


def decompose(columns: Dict[str, np.ndarray], encoder_family: str, families: Sequence[str],
              refined_family: Optional[str] = None) -> pd.DataFrame:
    """Per-datapoint table of every estimate and gap, with flags for bounds in the wrong order.

    With an ``elbo_refined`` column (a method's test-time refinement, of ``refined_family``),
    the amortization gap splits into ``refinement_gain`` and ``remaining_amortization_gap``.
    """
    df = pd.DataFrame({k: np.asarray(v, dtype=np.float64) for k, v in columns.items()})
    bounds = [c for c in ("iwae", "ais") if c in df]
    df["log_px"] = df[bounds].max(axis=1, skipna=False)
    own = f"elbo_{encoder_family}"
    df["approximation_gap"] = df["log_px"] - df[own]
    df["amortization_gap"] = df[own] - df["elbo_q"]
    df["inference_gap"] = df["log_px"] - df["elbo_q"]
    for fam in families:
        df[f"approximation_gap_{fam}"] = df["log_px"] - df[f"elbo_{fam}"]
        df[f"amortization_gap_{fam}"] = df[f"elbo_{fam}"] - df["elbo_q"]
    refined = "elbo_refined" in df
    if refined:  # amortization gap = refinement gain + remaining amortization gap
        df["refinement_gain"] = df["elbo_refined"] - df["elbo_q"]
        df["remaining_amortization_gap"] = df[own] - df["elbo_refined"]
    estimates = ["elbo_q", own, "log_px"] + [f"elbo_{f}" for f in families] + (["elbo_refined"] if refined else [])
    df["finite"] = np.isfinite(df[list(dict.fromkeys(estimates))]).all(axis=1)
    # The order L[q] <= L[q*] <= log p̂(x), per family; violations are kept, flagged and counted.
    order_ok = np.ones(len(df), dtype=bool)
    for _, low, high in order_pairs(encoder_family, families, refined, refined_family):
        order_ok &= (df[high] >= df[low]).to_numpy() | ~df["finite"].to_numpy()
    df["order_ok"] = order_ok
    return df


SUMMARY_QUANTITIES = ["log_px", "iwae", "ais", "elbo_q", "elbo_refined", "approximation_gap", "amortization_gap",
                      "refinement_gain", "remaining_amortization_gap", "inference_gap"]


def summarize(df: pd.DataFrame, encoder_family: str, families: Sequence[str],
              refined_family: Optional[str] = None) -> Dict:
    """Mean and standard error of every quantity over the finite datapoints, and the violations.

    Gaps are differences taken per datapoint, so their standard errors are paired
    (the shared datapoint-to-datapoint variation cancels).
    """
    ok = df[df["finite"]]
    quantities = list(SUMMARY_QUANTITIES)
    for fam in families:
        quantities += [f"elbo_{fam}", f"approximation_gap_{fam}", f"amortization_gap_{fam}"]
    stats = {}
    for col in dict.fromkeys(quantities):
        if col not in ok:
            continue
        v = ok[col].to_numpy()
        n = len(v)
        stats[col] = {
            "mean": float(v.mean()) if n else math.nan,
            "se": float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
            "n": int(n),
        }
    violations = {}
    for name, low, high in order_pairs(encoder_family, families, "elbo_refined" in df, refined_family):
        diff = (ok[low] - ok[high]).to_numpy()
        bad = diff[diff > 0]
        violations[name] = {
            "count": int(bad.size),
            "mean_size": float(bad.mean()) if bad.size else 0.0,
            "max_size": float(bad.max()) if bad.size else 0.0,
        }
    out = {
        "num_points": int(len(df)),
        "num_finite": int(df["finite"].sum()),
        "num_nonfinite": int((~df["finite"]).sum()),
        "num_order_violations": int((~df["order_ok"]).sum()),
        "encoder_family": encoder_family,
        "families": list(families),
        "stats": stats,
        "order_violations": violations,
    }
    for fam in families:
        col = f"converged_{fam}"
        if col in df:
            out[f"num_converged_{fam}"] = int(df[col].sum())
    return out
