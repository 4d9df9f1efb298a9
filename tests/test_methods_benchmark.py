"""benchmarks/methods.py: seconds per epoch and peak memory of each training method, against vae."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_table_has_a_row_per_method_and_the_ratio_to_vae(capsys):
    spec = importlib.util.spec_from_file_location("methods_bench", REPO / "benchmarks" / "methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--methods", "vae,air", "--epochs", "2"])
    assert list(rows) == ["vae", "air"]
    assert all(len(r["seconds"]) == 2 and r["median_s"] > 0 and r["max_rss_mb"] > 0 for r in rows.values())
    out = capsys.readouterr().out
    assert "| vae |" in out and "| air |" in out and "| 1.0 |" in out
