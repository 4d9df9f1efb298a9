"""gapbench.convergence: counts of local fits, the AIS last-doubling change, and the warnings, on hand-made inputs."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from gapbench.convergence import ais_convergence, local_convergence, summary_text, warnings_for
from tests.tolerance import float_tol

F64 = torch.float64


def _fits() -> pd.DataFrame:
    """Six FFG fits (max_steps 100) of every kind, and four Flow fits that all converged."""
    return pd.DataFrame(
        {
            # converged early, converged by the rule exactly at the cap, cut off at the cap (twice),
            # failed early (NaN), failed at the cap (-inf): a non-finite fit is a failure wherever it stopped
            "converged_ffg": [1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            "elbo_ffg": [-90.0, -91.0, -92.0, -93.0, math.nan, -math.inf],
            "steps_ffg": [40, 100, 100, 100, 30, 100],
            "converged_flow": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            "elbo_flow": [-89.0, -90.0, -91.0, -92.0, -93.0, -94.0],
            "steps_flow": [20, 30, 40, 50, 60, 70],
        }
    )


def test_local_convergence_counts_converged_capped_and_failed_fits():
    got = local_convergence(_fits(), ["ffg", "flow", "realnvp"], max_steps=100)
    assert list(got) == ["ffg", "flow"]  # a family that was not fitted is left out, not reported as 0/N
    assert got["ffg"] == {
        "num_points": 6,
        "converged": 2,
        "at_step_cap": 2,
        "collapsed": 0,
        "failed": 2,
        "max_steps": 100,
        "mean_steps": pytest.approx((40 + 100 + 100 + 100 + 30 + 100) / 6, rel=4 * torch.finfo(F64).eps),
    }
    assert got["flow"]["converged"] == 6 and got["flow"]["at_step_cap"] == 0 and got["flow"]["failed"] == 0
    # every fit is counted exactly once
    for c in got.values():
        assert c["converged"] + c["at_step_cap"] + c["collapsed"] + c["failed"] == c["num_points"]


def test_collapsed_fits_are_their_own_count_and_warning():
    """A collapsed fit (column collapsed_<family>, written since collapses are detected) is neither
    converged, nor at the cap, nor failed, wherever it stopped; its warning names the rate to lower."""
    fits = _fits()
    fits["collapsed_flow"] = [0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    fits["converged_flow"] = 1.0 - fits["collapsed_flow"]
    fits.loc[4, "steps_flow"] = 100  # a collapse at the cap is still a collapse
    fits["collapsed_ffg"] = 0.0
    got = local_convergence(fits, ["ffg", "flow"], max_steps=100)
    assert got["flow"]["collapsed"] == 2 and got["flow"]["converged"] == 4
    assert got["flow"]["at_step_cap"] == 0 and got["flow"]["failed"] == 0
    assert got["ffg"]["collapsed"] == 0 and got["ffg"]["failed"] == 2  # unchanged by an all-zero column
    lines = [line for line in warnings_for({"local": got}) if "collapsed" in line]
    assert len(lines) == 1 and "q*_Flow: 2 of 6 local fits collapsed" in lines[0]
    assert lines[0].endswith("lower evaluate.local.flow_lr")
    fits["collapsed_ffg"] = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # -inf and collapsed: counted once, as collapsed
    got = local_convergence(fits, ["ffg"], max_steps=100)["ffg"]
    assert got["collapsed"] == 1 and got["failed"] == 1 and got["at_step_cap"] == 2
    assert [line for line in warnings_for({"local": {"ffg": got}}) if "collapsed" in line][0].endswith(
        "lower evaluate.local.lr")


def test_local_convergence_cap_is_the_recipes_max_steps():
    """The same fits under a higher cap were not cut off by it: they count as failed, never as at the cap."""
    got = local_convergence(_fits(), ["ffg"], max_steps=200)["ffg"]
    assert got["at_step_cap"] == 0 and got["converged"] == 2 and got["max_steps"] == 200


STEPS = [2, 6, 20, 50, 100]


def _sweep(seed=0, n=9):
    """[len(STEPS), n] AIS estimates near -100 nats that rise with the steps, with NaNs at 50 and 100 steps."""
    rng = np.random.default_rng(seed)
    base = -100.0 + rng.normal(0.0, 3.0, size=n)
    rise = np.array([-8.0, -3.0, -1.0, -0.4, 0.0])[:, None]
    log_px = base[None, :] + rise + rng.normal(0.0, 0.2, size=(len(STEPS), n))
    log_px[3, 1] = math.nan  # a failed point at 50 steps
    log_px[4, 4] = -math.inf  # and another at 100
    log_px[1, 6] = math.nan  # a failure at 6 steps is no concern of the last doubling
    return log_px


def _expected(log_px, i, j):
    """Change from row i to row j over the points finite at both, and its standard error, by plain numpy."""
    ok = np.isfinite(log_px[i]) & np.isfinite(log_px[j])
    d = log_px[j][ok] - log_px[i][ok]
    return d.mean(), np.std(d, ddof=1) / np.sqrt(d.size), int(ok.sum())


def test_ais_change_over_the_last_doubling_is_the_mean_difference_and_its_standard_error():
    log_px = _sweep()
    change, se, n = _expected(log_px, 3, 4)  # 50 -> 100 steps
    got = ais_convergence(STEPS, log_px, tolerance=0.1)
    assert got["from_steps"] == 50 and got["to_steps"] == 100
    assert got["num_points"] == n == 7
    # a difference of values near 100 carries their rounding; the mean and std add a few terms more
    tol = float_tol(F64, 100.0, num_terms=n)
    assert abs(got["change"] - change) <= tol
    assert abs(got["se"] - se) <= tol
    assert got["tolerance"] == 0.1
    assert change > 0.1 and got["converged"] is False


def test_ais_converged_is_whether_the_size_of_the_change_is_within_the_tolerance():
    log_px = _sweep(seed=1)
    change, _, _ = _expected(log_px, 3, 4)
    assert ais_convergence(STEPS, log_px, tolerance=abs(change) * 1.01)["converged"] is True
    assert ais_convergence(STEPS, log_px, tolerance=abs(change) * 0.99)["converged"] is False
    # a fall as large as the rise is no more converged: the size counts, not the sign
    falling = log_px.copy()
    falling[[3, 4]] = falling[[4, 3]]
    got = ais_convergence(STEPS, falling, tolerance=abs(change) * 0.99)
    assert got["change"] < 0 and got["converged"] is False
    assert ais_convergence(STEPS, falling, tolerance=abs(change) * 1.01)["converged"] is True


def test_ais_compares_the_largest_step_count_at_or_below_half_the_last():
    log_px = _sweep(seed=2)
    steps = [2, 6, 20, 51, 100]  # 51 is more than half of 100: the change is taken from 20 steps
    change, se, n = _expected(log_px, 2, 4)
    got = ais_convergence(steps, log_px, tolerance=0.1)
    assert (got["from_steps"], got["to_steps"], got["num_points"]) == (20, 100, n)
    assert abs(got["change"] - change) <= float_tol(F64, 100.0, num_terms=n)
    assert abs(got["se"] - se) <= float_tol(F64, 100.0, num_terms=n)


def test_ais_without_a_doubling_or_finite_points_says_so():
    log_px = _sweep()
    assert ais_convergence([60, 100], log_px[3:], tolerance=0.1) is None  # nothing at or below 50
    assert ais_convergence([100], log_px[4:], tolerance=0.1) is None
    nan = np.full((2, 4), math.nan)
    got = ais_convergence([50, 100], nan, tolerance=0.1)
    assert got["num_points"] == 0 and math.isnan(got["change"]) and not got["converged"]
    one = np.array([[-100.0, math.nan], [-99.0, -98.0]])  # one finite pair: a change, no standard error
    got = ais_convergence([50, 100], one, tolerance=0.1)
    assert got["num_points"] == 1 and got["change"] == 1.0 and math.isnan(got["se"])


def test_warnings_name_the_key_that_fixes_each_shortfall():
    fits = _fits()
    fits["converged_realnvp"] = fits["converged_ffg"]
    fits["elbo_realnvp"] = fits["elbo_ffg"]
    fits["steps_realnvp"] = fits["steps_ffg"]
    convergence = {
        "local": local_convergence(fits, ["ffg", "flow", "realnvp"], max_steps=100),
        "ais": ais_convergence(STEPS, _sweep(), tolerance=0.1),
    }
    lines = warnings_for(convergence)
    assert len(lines) == 3  # FFG and RealNVP stopped at the cap, Flow did not; AIS moved too much
    ffg, realnvp, ais = lines
    for line, label in ((ffg, "q*_FFG"), (realnvp, "q*_RealNVP")):
        assert label in line and "2 of 6" in line
        assert "evaluate.local.max_steps=100" in line and line.endswith("raise evaluate.local.max_steps")
    assert "evaluate.ais.num_steps" in ais and "evaluate.ais.convergence_tolerance=0.1" in ais
    assert "from 50 to 100 steps" in ais and "over 7 points" in ais
    assert not any("Flow" in line for line in lines)
    assert "q*_FFG converged 2/6" in summary_text(convergence)


def test_no_warnings_when_everything_converged():
    fits = _fits()[["converged_flow", "elbo_flow", "steps_flow"]]
    log_px = _sweep()
    convergence = {
        "local": local_convergence(fits, ["flow"], max_steps=100),
        "ais": ais_convergence(STEPS, log_px, tolerance=10.0),
    }
    assert warnings_for(convergence) == []
    assert warnings_for({"local": {}}) == [] and warnings_for({}) == []
    # a failed (non-finite) fit is counted, but raising max_steps would not help it: no warning
    failed = {"local": {"ffg": {"num_points": 3, "converged": 2, "at_step_cap": 0, "failed": 1,
                                "max_steps": 100, "mean_steps": 50.0}}}
    assert warnings_for(failed) == []
