"""benchmarks/gpu_check.py (make gpu-check) runs end to end at --quick sizes on a CPU and writes what it says.

The GPU sizes need a GPU; here the same code runs with tiny sizes, and each
file, table and number it writes is checked. Without Fashion-MNIST the quick
run trains on digits (said in its notes); a full run stops at once instead.
"""

import json
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from gapbench.errors import GapbenchError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def _finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.mark.slow
def test_quick_run_on_a_cpu_writes_every_file_with_finite_numbers(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    folder = tmp_path / "cpu-quick"
    # Everything it wrote is in the device's folder, and its work folder is gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu-quick"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "points.csv", "results.json", "speed_log.txt", "speed_table.md"]

    results = json.loads((folder / "results.json").read_text())
    assert results["errors"] == {}
    assert results["total_s"] < results["budget_s"]
    assert results["environment"]["torch"] == str(torch.__version__)

    training = results["training"]
    assert training["epochs"] == 2 and _finite(training["test_elbo"], training["seconds"])

    graphs = results["compiled_vs_eager"]["rows"]
    assert [(r["points"], r["chains"]) for r in graphs] == list(gpu_check.QUICK.graph_widths)
    for r in graphs:
        assert _finite(r["eager_ms_per_transition"], r["compiled_ms_per_transition"], r["compile_s"],
                       r["max_abs_diff"], r["mean_log_px_eager"])
        # The same draws: eager and compiled agree up to rounding over these few transitions
        # (log p^ ~ 1e2 nats; float32 rounding of a 30-transition sum, far below 1 nat).
        assert r["max_abs_diff"] < 1e-2 * max(1.0, abs(r["mean_log_px_eager"]))

    paper = results["paper_vs_small"]
    assert paper["num_points"] == gpu_check.QUICK.max_points
    assert paper["paper"]["num_steps"] == gpu_check.QUICK.paper_steps and paper["paper"]["num_chains"] == 100
    assert paper["small"]["num_steps"] == gpu_check.QUICK.small_steps and paper["small"]["num_chains"] == 16
    assert _finite(paper["mean_diff"], paper["paper"]["seconds"], paper["small"]["seconds"])
    assert len(paper["per_point"]) == paper["num_points"]
    for row in paper["per_point"]:
        assert _finite(row["paper_log_px"], row["small_log_px"], row["diff"], row["elbo_ffg"])
        assert row["diff"] == pytest.approx(row["paper_log_px"] - row["small_log_px"], abs=1e-9 * abs(row["paper_log_px"]))
    csv = (folder / "points.csv").read_text().splitlines()
    assert csv[0].startswith("index,paper_log_px,small_log_px,diff") and len(csv) == 1 + paper["num_points"]

    speed = results["speed"]
    assert speed["finished"] and speed["returncode"] == 0
    table = (folder / "speed_table.md").read_text()
    assert "| digits VAE | local FFG | equal settings |" in table

    readme = (folder / "README.md").read_text()
    for heading in ("## Environment", "## The CPU-budget model", "## Compiled AIS against eager",
                    "## AIS at the paper's settings beside the CPU budget's", "## speed.py (`make bench-speed`) on this device",
                    "| model | points x chains |", "| AIS | settings | points |", "| test index | paper log p^ |",
                    "--quick: a training subset"):
        assert heading in readme
    assert not re.search(r"\bnan\b", readme, re.IGNORECASE)
    assert readme.strip() in proc.stdout  # printed as well as written


def test_a_missing_fashion_mnist_means_digits_in_a_quick_run_and_an_error_before_any_work_otherwise(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "fashion_available", lambda data_dir: (False, "not found"))
    quick = gpu_check.choose_dataset(None, quick=True)
    assert quick["dataset"] == "digits" and quick["overrides"] == ["data.dataset=digits"]
    assert "digits instead" in quick["note"]
    with pytest.raises(GapbenchError, match="--data-dir DIR"):
        gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_data_dir_goes_to_the_recipe(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "fashion_available", lambda data_dir: (True, str(tmp_path / "fashion-mnist")))
    chosen = gpu_check.choose_dataset(str(tmp_path), quick=False)
    assert chosen["dataset"] == "fashion-mnist"
    assert chosen["overrides"] == [f"data.data_dir={tmp_path.resolve()}"]


def test_folder_names_come_from_the_device_name():
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.slug("NVIDIA GeForce RTX 4090 (24 GB)") == "nvidia-geforce-rtx-4090-24-gb"
    assert gpu_check.folder_name(torch.device("cpu"), quick=True) == "cpu-quick"
    assert gpu_check.folder_name(torch.device("cpu"), quick=False) == "cpu"


def test_speed_progress_log_becomes_phase_times():
    text = "[   0.0 s] MNIST VAE: local FFG, gapbench\nnoise\n[   1.5 s] MNIST VAE: local FFG, reference\n"
    phases = gpu_check._phases(text, total=9.0, finished=False)
    assert [p["phase"] for p in phases] == ["MNIST VAE: local FFG, gapbench", "MNIST VAE: local FFG, reference"]
    assert phases[0]["seconds"] == pytest.approx(1.5) and phases[0]["finished"]
    assert phases[1]["seconds"] == pytest.approx(7.5) and not phases[1]["finished"]


def test_a_speed_run_past_its_cap_is_stopped_and_says_so(tmp_path):
    args = types.SimpleNamespace(device="cpu", fixture=gpu_check.FIXTURE, speed_args="--quick --models digits")
    clock = gpu_check.Clock(60.0)
    work = tmp_path / ".work"
    part = gpu_check.run_speed(args, gpu_check.QUICK, clock, tmp_path, work, cap_s=1.0)
    assert part["timed_out"] and not part["finished"] and part["returncode"] is None
    assert part["seconds"] < 30  # stopped, not waited for
    text = gpu_check.speed_section(part)
    assert "was stopped after 1 s" in text and "printed no table" in text


@pytest.mark.slow
def test_a_part_that_fails_is_recorded_and_the_others_still_run(monkeypatch, tmp_path):
    def planted(*args, **kwargs):
        raise RuntimeError("planted failure\nwith a second line")

    monkeypatch.setattr(gpu_check, "compiled_vs_eager", planted)
    status = gpu_check.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--skip-speed"])
    assert status == 1
    folder = tmp_path / "cpu-quick"
    results = json.loads((folder / "results.json").read_text())
    assert results["errors"] == {"compiled_vs_eager": "RuntimeError: planted failure"}
    assert "planted failure" in results["tracebacks"]["compiled_vs_eager"]
    assert results["paper_vs_small"]["num_points"] == gpu_check.QUICK.max_points  # the part after it ran
    readme = (folder / "README.md").read_text()
    assert "**compiled_vs_eager failed**: RuntimeError: planted failure" in readme
    assert "Unfinished" not in readme and not (folder / ".work").exists()
