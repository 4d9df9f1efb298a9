"""Diagnostics that explain a VAE's gaps: how many latent units it uses, how much the code says about x,
how the importance-weighted bound closes the inference gap, and where (which classes, which split) the gaps are.

* :func:`active_units` -- A_d = Cov_x(E_q[z_d|x]) (Burda, Grosse & Salakhutdinov 2016)
* :func:`mutual_information` -- I(x; z) under the encoder and the aggregate posterior's KL to the prior
  (Hoffman & Johnson 2016; He et al. 2019)
* :func:`decoder_jacobian_spectrum` -- singular values of d decoder(z) / dz at posterior samples (Hoffman 2017)
* :func:`iwae_gap_curve` -- IWAE_k - L[q] against k: the inference gap that q~_k closes (Cremer, Morris &
  Duvenaud 2017)
* :func:`gaps_by_class`, :func:`encoder_generalization` -- summaries of a gaps table (``gaps/<split>.csv``)

All are pure functions of a model, a batch x [N, ...] and (optionally) an encoder q(z|x); none reads or
writes files. Where a function needs the encoder it takes ``q`` (a gapbench Posterior or a torch
Distribution with batch [N], event [D]); None means ``model.posterior(x)``, the package's VAE encoder.
Tensor results carry ``to_dict()``, their summary as plain numbers ready for JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from gapbench.errors import GapbenchError
from gapbench.inference._common import (DEFAULT_PAIRS_PER_PASS, check_batch, check_model, log_joint, sample_chunks,
                                        seeded)
from gapbench.inference.bounds import elbo_and_stderr, iwae
from gapbench.models.posterior import DistributionPosterior, FamilyPosterior, Posterior, as_posterior
from gapbench.ops import logmeanexp

#: The k of Cremer, Morris & Duvenaud's q~_k curve.
DEFAULT_KS = (1, 2, 5, 10, 50, 100, 500, 1000, 5000)
#: The gap columns of a gaps table summarized by default (those present).
GAP_COLUMNS = ("inference_gap", "approximation_gap", "amortization_gap", "refinement_gain",
               "remaining_amortization_gap")
# Numbers per pass of the aggregate posterior's density: samples x components x D (64 MiB in float32).
_MIXTURE_NUMBERS_PER_PASS = 1 << 24


def _encoder(model, x: Tensor, q) -> Posterior:
    """q, or the model's encoder q(z|x) for x (without gradients)."""
    if q is None:
        if not callable(getattr(model, "posterior", None)):
            raise GapbenchError(
                f"{type(model).__name__} has no encoder (a posterior(x) method); pass q, the posterior q(z|x) of x"
            )
        with torch.no_grad():
            q = model.posterior(x)
    q = as_posterior(q)
    if q.num_points != x.shape[0]:
        raise ValueError(f"q describes {q.num_points} datapoints but x has {x.shape[0]}")
    return q


def _mean_se(values: Tensor, dim: int = -1):
    """Mean and standard error (ddof 1; NaN for one value) of float64 values along ``dim``."""
    n = values.shape[dim]
    se = values.std(dim) / math.sqrt(n) if n > 1 else torch.full_like(values.mean(dim), math.nan)
    return values.mean(dim), se


# ---------------------------------------------------------------- active units


@dataclass
class ActiveUnits:
    """Result of :func:`active_units`: activity [D] float64, active [D] bool, num_active, threshold."""

    activity: Tensor
    active: Tensor
    num_active: int
    threshold: float

    def to_dict(self) -> Dict:
        return {"num_active": self.num_active, "threshold": self.threshold, "activity": self.activity.tolist()}


def posterior_mean(q, num_samples: int = 1000) -> Tensor:
    """E_q[z|x] [N, D]: exact for Gaussian q (an FFG family or a torch Distribution), else from num_samples samples."""
    q = as_posterior(q)
    with torch.no_grad():
        if isinstance(q, FamilyPosterior) and q.family.name == "ffg":
            return q.params["mean"].expand(q.num_points, q.latent_dim)
        if isinstance(q, DistributionPosterior):
            try:
                return q.dist.mean
            except NotImplementedError:
                pass
        z, _ = q.sample_and_log_prob(num_samples)  # [S, N, D]
        return z.double().mean(0)


def active_units(model, x: Tensor, q=None, threshold: float = 0.01, num_samples: int = 1000,
                 seed: Optional[int] = None) -> ActiveUnits:
    """Which latent dimensions the encoder uses: unit d is active when its posterior mean varies with x.

        A_d = Cov_x(E_q[z_d | x])  (the sample variance over the N datapoints, ddof 1);  active: A_d > threshold

    Args:
        model: used only for ``model.posterior(x)`` when q is None.
        x: data [N, ...], N >= 2 (a variance over datapoints).
        q: q(z|x) for x's N datapoints; None: the model's encoder.
        threshold: 0.01 as in Burda et al.
        num_samples: samples per datapoint for E_q[z|x] when q is not Gaussian; their noise adds about
            Var_q(z_d) / num_samples to A_d.

    Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders" (2016), section 5.2.
    """
    if check_batch(x) < 2:
        raise ValueError("active units need at least 2 datapoints (a variance over x)")
    with seeded(seed, x.device):
        means = posterior_mean(_encoder(model, x, q), num_samples).double()  # [N, D]
    activity = means.var(0)  # [D]
    active = activity > threshold
    return ActiveUnits(activity, active, int(active.sum()), float(threshold))


# ---------------------------------------------------------------- mutual information


@dataclass
class MutualInformation:
    """Result of :func:`mutual_information`, in nats.

    mutual_information = kl_posterior_prior - kl_aggregate_prior, each with its standard error over the N
    datapoints (``*_se``); per_point [N]: each datapoint's term of I, log q(z|x_i) - log q(z) averaged over its
    samples.
    """

    mutual_information: float
    mutual_information_se: float
    kl_posterior_prior: float
    kl_posterior_prior_se: float
    kl_aggregate_prior: float
    kl_aggregate_prior_se: float
    per_point: Tensor
    num_points: int
    num_samples: int

    def to_dict(self) -> Dict:
        return {k: v for k, v in vars(self).items() if k != "per_point"}


def mutual_information(model, x: Tensor, q=None, num_samples: int = 10, chunk_size: Optional[int] = None,
                       seed: Optional[int] = None) -> MutualInformation:
    """I(x; z) under the encoder, with x drawn from the N datapoints, and the aggregate posterior's KL.

        I(x; z) = E_x[KL(q(z|x) || p(z))] - KL(q(z) || p(z)),   q(z) = (1/N) sum_j q(z|x_j)

    Each expectation is a Monte Carlo average over ``num_samples`` z ~ q(z|x_i) per datapoint, with
    log q(z) = logmeanexp_j log q(z|x_j) over all N components (x_i's own included, as He et al. do). The
    same samples serve both KLs, so log p(z) cancels in I. The estimate is biased for finite N (it can
    never exceed log N); the bias falls as O(1/N).

    Args:
        model: ``log_prior(z)`` [S, N, D] -> [S, N]; ``posterior(x)`` when q is None.
        x: data [N, ...].
        q: q(z|x) for x's N datapoints, with a tractable ``log_prob``; None: the model's encoder.
        num_samples: S, samples per datapoint.
        chunk_size: samples per pass of the N-component density (None: 2^24 / (N D)).

    Hoffman & Johnson, "ELBO surgery" (2016); He et al., "Lagging inference networks" (2019).
    """
    num_points = check_batch(x)
    q = _encoder(model, x, q)
    if not q.exact_log_prob:
        raise GapbenchError("mutual information needs log q(z|x), which this encoder only bounds (the auxiliary "
                            "flow 'flow'); use an 'ffg' or 'realnvp' encoder")
    if chunk_size is None:
        chunk_size = max(1, _MIXTURE_NUMBERS_PER_PASS // (num_points * q.latent_dim))
    with seeded(seed, x.device), torch.no_grad():
        z, log_q_own = q.sample_and_log_prob(num_samples)  # [S, N, D], [S, N]
        log_prior = model.log_prior(z).double()  # [S, N]
        flat = z.reshape(-1, z.shape[-1])  # [S*N, D], sample s of point i at s*N + i
        log_q_agg = []
        for start in range(0, flat.shape[0], chunk_size):
            rows = flat[start:start + chunk_size]  # [M, D]
            cross = q.log_prob(rows[:, None, :].expand(-1, num_points, -1))  # [M, N]: log q(z_m | x_j)
            log_q_agg.append(logmeanexp(cross.double(), dim=1))
        log_q_agg = torch.cat(log_q_agg).reshape(num_samples, num_points)  # [S, N]
    log_q_own = log_q_own.double()
    per_point = (log_q_own - log_q_agg).mean(0)  # [N]
    values = {
        "mutual_information": per_point,
        "kl_posterior_prior": (log_q_own - log_prior).mean(0),
        "kl_aggregate_prior": (log_q_agg - log_prior).mean(0),
    }
    stats = {}
    for name, v in values.items():
        mean, se = _mean_se(v)
        stats[name], stats[f"{name}_se"] = float(mean), float(se)
    return MutualInformation(**stats, per_point=per_point, num_points=num_points, num_samples=num_samples)


# ---------------------------------------------------------------- decoder Jacobian


@dataclass
class JacobianSpectrum:
    """Result of :func:`decoder_jacobian_spectrum`.

    z [S, N, D]: the posterior samples; singular_values [S, N, D] float64, descending, at each; num_used [S, N]:
    how many exceed relative_threshold times the largest; mean_num_used (with mean_num_used_se over the N
    datapoints) and median_num_used over all samples; relative_spectrum [D]: the mean over samples of
    singular_values divided by their largest (zero where the decoder is constant).
    """

    z: Tensor
    singular_values: Tensor
    num_used: Tensor
    mean_num_used: float
    mean_num_used_se: float
    median_num_used: float
    relative_spectrum: Tensor
    relative_threshold: float

    def to_dict(self) -> Dict:
        return {
            "mean_num_used": self.mean_num_used,
            "mean_num_used_se": self.mean_num_used_se,
            "median_num_used": self.median_num_used,
            "relative_threshold": self.relative_threshold,
            "relative_spectrum": self.relative_spectrum.tolist(),
        }


def decoder_output_fn(model) -> Callable[[Tensor], Tensor]:
    """The decoder as a function of z [M, D] -> [M, ...]: a gapbench VAE's network output (all the
    likelihood's parameters: logits, or means and log-scales), else the model's ``logits(z)``."""
    decoder = getattr(model, "decoder", None)
    if isinstance(decoder, torch.nn.Module) and callable(getattr(model, "decode", None)):
        return lambda z: decoder(z[None])[0]  # the VAE's decoder maps [S, N, D] -> [S, N, K*P]
    if callable(getattr(model, "logits", None)):
        return model.logits
    raise GapbenchError(f"{type(model).__name__} exposes no decoder network (decoder or logits); "
                        "pass decoder_fn, a function of z [M, D] giving the decoder's output [M, ...]")


def decoder_jacobian_spectrum(model, x: Tensor, q=None, decoder_fn: Optional[Callable[[Tensor], Tensor]] = None,
                              num_samples: int = 1, relative_threshold: float = 1e-3,
                              chunk_size: Optional[int] = None, seed: Optional[int] = None) -> JacobianSpectrum:
    """How many latent dimensions the decoder uses near the posterior: the rank of its Jacobian.

        J(z) = d decoder(z) / dz  [P, D] at z ~ q(z|x);  num_used = #{d : s_d(J) > relative_threshold * s_1(J)}

    The Jacobians of a chunk of samples come from one vectorized forward-mode pass (torch.func.vmap of
    jacfwd: D directions, fewer than the P outputs); the singular values are taken in float64.

    Args:
        model: ``posterior(x)`` when q is None; its decoder when decoder_fn is None (:func:`decoder_output_fn`).
        x: data [N, ...].
        q: q(z|x) for x's N datapoints; None: the model's encoder.
        decoder_fn: z [M, D] -> [M, ...], the decoder's output (logits or means) for a batch of latents.
        num_samples: S, posterior samples per datapoint.
        relative_threshold: a singular value below this fraction of the point's largest counts as unused.
        chunk_size: latents per vectorized pass (None: 256).

    Hoffman, "Learning deep latent Gaussian models with Markov chain Monte Carlo" (2017).
    """
    check_batch(x)
    fn = decoder_fn if decoder_fn is not None else decoder_output_fn(model)
    with seeded(seed, x.device), torch.no_grad():
        z = _encoder(model, x, q).sample(num_samples)  # [S, N, D]
    flat = z.reshape(-1, z.shape[-1])  # [S*N, D]

    def single(point: Tensor) -> Tensor:  # [D] -> [P]
        return fn(point[None]).reshape(-1)

    jacobian_fn = torch.func.vmap(torch.func.jacfwd(single))
    chunk_size = chunk_size or 256
    values = []
    for start in range(0, flat.shape[0], chunk_size):
        with torch.no_grad():  # the transforms differentiate in z; no graph for the weights
            jac = jacobian_fn(flat[start:start + chunk_size])  # [M, P, D]
        values.append(torch.linalg.svdvals(jac.double()))  # [M, D], descending
    s = torch.cat(values).reshape(z.shape)  # [S, N, D]
    largest = s[..., :1]
    num_used = (s > relative_threshold * largest).sum(-1)  # [S, N]
    relative = torch.where(largest > 0, s / largest.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    mean, se = _mean_se(num_used.double().mean(0))  # over datapoints, each averaged over its samples
    return JacobianSpectrum(
        z=z,
        singular_values=s,
        num_used=num_used,
        mean_num_used=float(mean),
        mean_num_used_se=float(se),
        median_num_used=float(num_used.double().flatten().median()),
        relative_spectrum=relative.reshape(-1, s.shape[-1]).mean(0),
        relative_threshold=float(relative_threshold),
    )


# ---------------------------------------------------------------- the q~_k curve


@dataclass
class IWAEGapCurve:
    """Result of :func:`iwae_gap_curve` for K values of k and N datapoints.

    ks [K]; num_replicates [K]: IWAE_k draws averaged per datapoint; elbo [N]: L[q]; iwae [K, N]: IWAE_k;
    gap [K, N] = iwae - elbo; gap_mean, gap_se [K]: over the datapoints finite at every k (num_finite).
    """

    ks: List[int]
    num_replicates: List[int]
    elbo: Tensor
    iwae: Tensor
    gap: Tensor
    gap_mean: Tensor
    gap_se: Tensor
    num_finite: int

    def to_dict(self) -> Dict:
        return {"ks": self.ks, "num_replicates": self.num_replicates, "gap_mean": self.gap_mean.tolist(),
                "gap_se": self.gap_se.tolist(), "num_finite": self.num_finite}


def _iwae_draws(model, x: Tensor, q: Posterior, k: int, num_replicates: int, chunk_size: int) -> Tensor:
    """num_replicates independent IWAE_k estimates per datapoint: [R, N] float64."""
    num_points = x.shape[0]
    if k > chunk_size:  # one bound at a time, its k samples in chunks
        return torch.stack([iwae(model, x, q, k, chunk_size) for _ in range(num_replicates)])
    per_pass = max(1, chunk_size // k)  # whole replicates per pass
    draws = []
    for size in sample_chunks(num_replicates, per_pass, num_points):
        z, log_q = q.sample_and_log_prob(size * k)  # [size*k, N, D]
        log_w = (log_joint(model, x, z) - log_q).double().reshape(size, k, num_points)
        draws.append(logmeanexp(log_w, dim=1))  # [size, N]
    return torch.cat(draws)


def iwae_gap_curve(model, x: Tensor, q=None, ks: Sequence[int] = DEFAULT_KS, num_elbo_samples: int = 5000,
                   min_samples_per_k: int = 1000, chunk_size: Optional[int] = None,
                   seed: Optional[int] = None) -> IWAEGapCurve:
    """How much of the inference gap importance weighting closes: IWAE_k - L[q] against k.

        gap_k = E[IWAE_k] - L[q]:  0 at k = 1, non-decreasing in k, -> log p(x) - L[q] as k -> inf

    IWAE_k is a lower bound on the ELBO of q~_k, the distribution implicit in importance sampling with k
    draws from q, so gap_k is the part of the inference gap that q~_k closes at least. For each k, IWAE_k per datapoint is
    the mean of R = ceil(min_samples_per_k / k) independent draws (an unbiased estimate of E[IWAE_k], less
    noisy at small k); L[q] uses num_elbo_samples samples.

    Args:
        model: the model contract (``latent_dim``, ``log_prior``, ``log_likelihood``); ``posterior(x)`` when
            q is None.
        x: data [N, ...].
        q: the proposal q(z|x) for x's N datapoints; None: the model's encoder.
        ks: the k values, positive integers.
        num_elbo_samples: samples for L[q].
        min_samples_per_k: R * k reaches at least this many samples for each k.
        chunk_size: samples per forward pass (None: S_chunk * N <= 4,096 on a CPU, 50,000 on a GPU).

    Cremer, Morris & Duvenaud, "Reinterpreting importance-weighted autoencoders" (2017).
    """
    num_points = check_batch(x)
    check_model(model)
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    q = _encoder(model, x, q)
    if chunk_size is None:
        kind = "cpu" if x.device.type == "cpu" else "cuda"
        chunk_size = max(1, DEFAULT_PAIRS_PER_PASS[kind] // num_points)
    replicates = [max(1, math.ceil(min_samples_per_k / k)) for k in ks]
    with seeded(seed, x.device), torch.no_grad():
        elbo, _ = elbo_and_stderr(model, x, q, num_elbo_samples, chunk_size)  # [N]
        bounds = torch.stack([_iwae_draws(model, x, q, k, r, chunk_size).mean(0) for k, r in zip(ks, replicates)])
    gap = bounds - elbo  # [K, N]
    finite = torch.isfinite(gap).all(0)
    gap_mean, gap_se = _mean_se(gap[:, finite])
    return IWAEGapCurve(ks, replicates, elbo, bounds, gap, gap_mean, gap_se, int(finite.sum()))


# ---------------------------------------------------------------- gaps tables


def _finite_rows(gaps: pd.DataFrame) -> np.ndarray:
    """The rows a summary uses: those marked finite (as in gaps/<split>.json), all when unmarked."""
    if "finite" in gaps:
        return gaps["finite"].to_numpy(dtype=bool)
    return np.ones(len(gaps), dtype=bool)


def _check_columns(gaps: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in gaps]
    if missing:
        raise GapbenchError(f"the {what}gaps table has no column {', '.join(map(repr, missing))} "
                            f"(it has {', '.join(map(str, gaps.columns))}); evaluate-gaps writes them")


def gaps_by_class(gaps: pd.DataFrame, labels, columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Mean and standard error of each gap per class.

        mean_c = (1/n_c) sum_{i in c} gap_i,   se_c = std_{i in c}(gap_i) / sqrt(n_c)   (ddof 1; NaN for n_c = 1)

    Args:
        gaps: one row per datapoint, as gaps/<split>.csv; rows with ``finite`` False are left out, as in
            its summary.
        labels: an integer class label per row [N] (array-like).
        columns: the columns to summarize (None: those of :data:`GAP_COLUMNS` present).

    Returns:
        A frame indexed by label (ascending) with ``count`` (rows used) and ``<column>_mean``,
        ``<column>_se`` for each column.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(gaps):
        raise GapbenchError(f"gaps by class needs one label per row: the table has {len(gaps)} rows but "
                            f"{labels.size} labels were given; pass the labels of the evaluated datapoints")
    if labels.size and not (np.issubdtype(labels.dtype, np.integer)
                            or (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)))):
        raise GapbenchError(f"class labels must be integers, got values of type {labels.dtype}")
    columns = [c for c in GAP_COLUMNS if c in gaps] if columns is None else list(columns)
    _check_columns(gaps, columns, "")
    keep = _finite_rows(gaps)
    frame = gaps.loc[keep, columns].astype(np.float64).reset_index(drop=True)
    frame["label"] = labels[keep].astype(np.int64)
    grouped = frame.groupby("label", sort=True)
    out = pd.DataFrame({"count": grouped.size()})
    for col in columns:
        out[f"{col}_mean"] = grouped[col].mean()
        out[f"{col}_se"] = grouped[col].std(ddof=1) / np.sqrt(grouped[col].count())
    return out


def encoder_generalization(train_gaps: pd.DataFrame, heldout_gaps: pd.DataFrame,
                           column: str = "amortization_gap") -> Dict[str, float]:
    """How much worse the encoder does on held-out data than on its training data.

        difference = mean_heldout(gap) - mean_train(gap),   se = sqrt(se_train^2 + se_heldout^2)  (independent samples)

    Args:
        train_gaps, heldout_gaps: gaps tables (one row per datapoint) of equally many train and held-out
            points; rows with ``finite`` False are left out of the means.
        column: the gap compared (default the amortization gap, which only the encoder causes).

    Returns:
        train, train_se, heldout, heldout_se, difference, difference_se, num_train, num_heldout (rows used).
        Cremer, Li & Duvenaud (2018), section 5.3.
    """
    if len(train_gaps) != len(heldout_gaps):
        raise GapbenchError(
            f"encoder generalization compares equally many points, but the train table has {len(train_gaps)} "
            f"rows and the held-out table {len(heldout_gaps)}; evaluate both splits with the same evaluate.num_points"
        )
    out: Dict[str, float] = {}
    for name, gaps in (("train", train_gaps), ("heldout", heldout_gaps)):
        _check_columns(gaps, [column], "train " if name == "train" else "held-out ")
        values = torch.tensor(gaps.loc[_finite_rows(gaps), column].to_numpy(dtype=np.float64))
        mean, se = _mean_se(values) if values.numel() else (torch.tensor(math.nan), torch.tensor(math.nan))
        out[name], out[f"{name}_se"], out[f"num_{name}"] = float(mean), float(se), int(values.numel())
    out["difference"] = out["heldout"] - out["train"]
    out["difference_se"] = math.sqrt(out["train_se"] ** 2 + out["heldout_se"] ** 2)
    return out


__all__ = [
    "ActiveUnits",
    "DEFAULT_KS",
    "GAP_COLUMNS",
    "IWAEGapCurve",
    "JacobianSpectrum",
    "MutualInformation",
    "active_units",
    "decoder_jacobian_spectrum",
    "decoder_output_fn",
    "encoder_generalization",
    "gaps_by_class",
    "iwae_gap_curve",
    "mutual_information",
    "posterior_mean",
]
