"""Gaps files made before convergence was recorded still get their convergence rows, worked out from the CSV."""

from pathlib import Path

import pandas as pd
import pytest

from gapbench.report import convergence_of, load_run_gaps, table_markdown, table_frame

RUN = Path(__file__).resolve().parent.parent / "results" / "cremer2018-small" / "fashion_flow"


@pytest.mark.skipif(not (RUN / "gaps" / "test.json").is_file(), reason="the committed Fashion-MNIST results are absent")
def test_convergence_is_derived_from_an_older_gaps_file():
    r = load_run_gaps(RUN, "test")
    assert "convergence" not in r.summary  # made before convergence was recorded
    points = pd.read_csv(RUN / "gaps" / "test.csv")
    cap = r.summary["settings"]["local"]["max_steps"]
    conv = convergence_of(r)
    for fam in ("ffg", "flow"):
        c = conv["local"][fam]
        converged = int((points[f"converged_{fam}"] > 0.5).sum())
        assert c["converged"] == converged == r.summary[f"num_converged_{fam}"]
        assert c["at_step_cap"] == int(((points[f"converged_{fam}"] < 0.5) & (points[f"steps_{fam}"] >= cap)).sum())
        assert c["converged"] + c["at_step_cap"] + c["failed"] == len(points)
    assert conv["local"]["flow"]["at_step_cap"] > 0  # the flow fits this run cut short
    ais = conv["ais"]
    sweep = r.summary["traces"]["ais_sweep"]
    assert ais["to_steps"] == sweep["num_steps"][-1] and ais["from_steps"] <= ais["to_steps"] // 2
    table = table_markdown([r], table_frame([r]))
    assert f"| q*_Flow converged (stopping rule) | {conv['local']['flow']['converged']} / {len(points)}" in table
