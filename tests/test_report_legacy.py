"""Gaps files made before convergence was recorded still get their convergence rows, worked out from the CSV."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from gapbench.report import convergence_of, load_run_gaps, table_markdown, table_frame

RUN = Path(__file__).resolve().parent.parent / "results" / "cremer2018-small" / "fashion_flow"


def _older_copy(tmp_path: Path, num_at_cap: int = 7) -> Path:
    """A copy of the committed Flow-model run as gapbench wrote it before convergence was recorded: no
    ``convergence`` or ``warnings`` in the summary, and (as then) some flow fits stopped at their cap."""
    run = tmp_path / "older"
    shutil.copytree(RUN, run, ignore=shutil.ignore_patterns("report", ".partial"))
    summary = json.loads((run / "gaps" / "test.json").read_text())
    for key in ("convergence", "warnings"):
        summary.pop(key, None)
    points = pd.read_csv(run / "gaps" / "test.csv")
    cap = summary["settings"]["local"]["max_steps"]
    points.loc[: num_at_cap - 1, "converged_flow"] = 0.0
    points.loc[: num_at_cap - 1, "steps_flow"] = float(cap)
    summary["num_converged_flow"] = int((points["converged_flow"] > 0.5).sum())
    points.to_csv(run / "gaps" / "test.csv", index=False)
    (run / "gaps" / "test.json").write_text(json.dumps(summary))
    return run


@pytest.mark.skipif(not (RUN / "gaps" / "test.json").is_file(), reason="the committed Fashion-MNIST results are absent")
def test_convergence_is_derived_from_an_older_gaps_file(tmp_path):
    run = _older_copy(tmp_path)
    r = load_run_gaps(run, "test")
    assert "convergence" not in r.summary  # made before convergence was recorded
    points = pd.read_csv(run / "gaps" / "test.csv")
    cap = r.summary["settings"]["local"]["max_steps"]
    conv = convergence_of(r)
    for fam in ("ffg", "flow"):
        c = conv["local"][fam]
        converged = int((points[f"converged_{fam}"] > 0.5).sum())
        assert c["converged"] == converged == r.summary[f"num_converged_{fam}"]
        assert c["at_step_cap"] == int(((points[f"converged_{fam}"] < 0.5) & (points[f"steps_{fam}"] >= cap)).sum())
        assert c["converged"] + c["at_step_cap"] + c["failed"] == len(points)
    assert conv["local"]["flow"]["at_step_cap"] == 7  # the flow fits this run cut short
    ais = conv["ais"]
    sweep = r.summary["traces"]["ais_sweep"]
    assert ais["to_steps"] == sweep["num_steps"][-1] and ais["from_steps"] <= ais["to_steps"] // 2
    table = table_markdown([r], table_frame([r]))
    assert f"| q*_Flow converged (stopping rule) | {conv['local']['flow']['converged']} / {len(points)}" in table
