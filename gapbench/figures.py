"""Figures of a gap report: matplotlib, drawn off-screen, every axis labelled in nats."""

from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

APPROX_COLOR = "#4C72B0"
AMORT_COLOR = "#DD8452"


def close(fig) -> None:
    plt.close(fig)


def gaps_stacked(runs) -> "plt.Figure":
    """Approximation and amortization gap stacked per run: their sum is the inference gap."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(runs), 4))
    x = np.arange(len(runs))
    approx = np.array([r.summary["stats"]["approximation_gap"]["mean"] for r in runs])
    amort = np.array([r.summary["stats"]["amortization_gap"]["mean"] for r in runs])
    approx_se = np.array([r.summary["stats"]["approximation_gap"]["se"] for r in runs])
    amort_se = np.array([r.summary["stats"]["amortization_gap"]["se"] for r in runs])
    ax.bar(x, approx, color=APPROX_COLOR, label="approximation gap  log p̂(x) − L[q*]", yerr=approx_se, capsize=3)
    ax.bar(x, amort, bottom=approx, color=AMORT_COLOR, label="amortization gap  L[q*] − L[q]", yerr=amort_se, capsize=3)
    for xi, total in zip(x, approx + amort):
        ax.annotate(f"{total:.2f}", (xi, total), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([r.label for r in runs], rotation=20, ha="right")
    ax.set_ylabel("gap (nats)")
    ax.set_title("Inference gap = approximation + amortization")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def gap_distributions(runs) -> "plt.Figure":
    """Per-datapoint histograms of the two gaps, one panel per run; negative values are real estimates."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.4), squeeze=False)
    for ax, r in zip(axes[0], runs):
        df = r.points[r.points["finite"].astype(bool)]
        both = np.concatenate([df["approximation_gap"], df["amortization_gap"]])
        bins = np.histogram_bin_edges(both[np.isfinite(both)], bins=30)
        ax.hist(df["approximation_gap"], bins=bins, alpha=0.6, color=APPROX_COLOR, label="approximation")
        ax.hist(df["amortization_gap"], bins=bins, alpha=0.6, color=AMORT_COLOR, label="amortization")
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlabel("gap per datapoint (nats)")
        ax.set_ylabel("datapoints")
        ax.set_title(r.label, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Distribution of the gaps over datapoints", fontsize=10)
    fig.tight_layout()
    return fig


def local_convergence(runs) -> "plt.Figure":
    """Local optimization of q*: ELBO against Adam steps (mean over points, and single points)."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.4), squeeze=False)
    for ax, r in zip(axes[0], runs):
        traces = r.summary.get("traces", {})
        for i, (stage, tr) in enumerate(sorted((k, v) for k, v in traces.items() if k.startswith("local_"))):
            color = f"C{i}"
            fam = stage.split("_", 1)[1]
            steps = np.array(tr["steps"], dtype=float)
            for curve in tr["elbo_points"]:
                ax.plot(steps, np.array(curve, dtype=float), color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, np.array(tr["elbo_mean"], dtype=float), color=color, linewidth=2, label=f"q*_{fam} (mean)")
        elbo_q = r.summary["stats"]["elbo_q"]["mean"]
        ax.axhline(elbo_q, color="gray", linestyle="--", linewidth=1, label="L[q] amortized (mean)")
        ax.set_xlabel("Adam steps")
        ax.set_ylabel("ELBO (nats)")
        ax.set_title(r.label, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Local optimization of q* (thin lines: single datapoints)", fontsize=10)
    fig.tight_layout()
    return fig


def ais_convergence(runs) -> "plt.Figure":
    """AIS estimate of log p(x) against the number of intermediate distributions (mean over sweep points)."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for i, r in enumerate(runs):
        sweep = r.summary.get("traces", {}).get("ais_sweep")
        if not sweep:
            continue
        steps = np.array(sweep["num_steps"], dtype=float)
        values = np.array(sweep["log_px"], dtype=float)  # [points, grid]
        mean = np.nanmean(values, axis=0)
        se = np.nanstd(values, axis=0, ddof=1) / np.sqrt(values.shape[0]) if values.shape[0] > 1 else 0 * mean
        ax.errorbar(steps, mean, yerr=se, marker="o", color=f"C{i}", capsize=3, label=f"{r.label} AIS")
        ax.set_xscale("log")
    ax.set_xlabel("intermediate distributions (AIS steps)")
    ax.set_ylabel("mean AIS log p̂(x) (nats)")
    ax.set_title("AIS convergence", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def all_figures(runs: Sequence) -> Iterator[Tuple[str, "plt.Figure"]]:
    yield "gaps_stacked", gaps_stacked(runs)
    yield "gap_distributions", gap_distributions(runs)
    yield "local_convergence", local_convergence(runs)
    if any(r.summary.get("traces", {}).get("ais_sweep") for r in runs):
        yield "ais_convergence", ais_convergence(runs)
