"""Safety: gapbench writes only tensors and plain values, and never runs code found in a file it reads.

Each hostile file carries a payload that, if executed, creates a marker folder;
a control shows the payload is live (an unsafe loader does run it), so the
tests fail if gapbench ever loads these files unsafely.
"""

import os
import shutil

import pytest
import torch
import yaml

from tests.cli_runner import run_cli
from gapbench.io import load_torch
from gapbench.errors import GapbenchError
from tests.reliability.conftest import RECIPE, copy_run


class Payload:
    """Unpickling this calls os.mkdir(path): code execution, made visible."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


class PlainObject:
    """An ordinary class instance: harmless, but not a tensor or a plain value."""

    def __init__(self):
        self.weights = torch.zeros(3)


def _assert_one_line_error(code, err, expected):
    # Progress bars (evaluate-gaps draws them before it reads the partial files) are not errors.
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert expected in errors[0], errors[0]


@pytest.mark.slow
def test_every_file_gapbench_writes_loads_with_weights_only(evaluated_run):
    paths = sorted(evaluated_run.rglob("*.pt"))
    names = {p.name for p in paths}
    assert "checkpoint.pt" in names and len(paths) == 1 + 16  # the checkpoint, 3 batches x 5 stages, the AIS sweep
    for path in paths:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(obj, dict), path
    ckpt = torch.load(evaluated_run / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "best_model", "rng", "epoch", "log"} <= set(ckpt)


def _hostile_checkpoints(tmp_path):
    marker = tmp_path / "payload_ran"
    plain = tmp_path / "plain.pt"
    torch.save({"model": PlainObject(), "epoch": 1}, plain)
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": Payload(marker)}, hostile)
    return marker, plain, hostile


def test_load_torch_refuses_pickled_objects_without_running_them(tmp_path):
    marker, plain, hostile = _hostile_checkpoints(tmp_path)
    for path in (plain, hostile):
        with pytest.raises(GapbenchError, match="is not a readable gapbench checkpoint"):
            load_torch(path)
    assert not marker.exists()
    # control: the payload is live, an unsafe load runs it
    torch.load(hostile, weights_only=False)
    assert marker.is_dir()


def test_cli_refuses_a_hostile_checkpoint_with_one_line(trained_run, recipe_file, tmp_path, capsys):
    marker, plain, hostile = _hostile_checkpoints(tmp_path)
    for name, source in (("plain", plain), ("hostile", hostile)):
        run = copy_run(trained_run, tmp_path / name)
        shutil.copyfile(source, run / "checkpoint.pt")
        for args in (["evaluate-gaps", run], ["train", recipe_file, "--out", run, "--resume"]):
            code, _, err = run_cli(args, capsys)
            _assert_one_line_error(code, err, "checkpoint.pt is not a readable gapbench checkpoint")
        assert not (run / "gaps" / "test.csv").exists()
    assert not marker.exists()


@pytest.mark.slow
def test_cli_refuses_a_hostile_partial_batch_file(evaluated_run, tmp_path, capsys):
    marker, _, hostile = _hostile_checkpoints(tmp_path)
    run = copy_run(evaluated_run, tmp_path / "run")
    (run / "gaps" / "test.csv").unlink()
    (target,) = (run / "gaps" / ".partial" / "test").glob("iwae-*-0001.pt")
    shutil.copyfile(hostile, target)
    code, _, err = run_cli(["evaluate-gaps", run, "--resume"], capsys)
    _assert_one_line_error(code, err, f"{target.name} is not a readable evaluation batch file")
    assert "delete it and run evaluate-gaps again with --resume" in err
    assert not marker.exists() and not (run / "gaps" / "test.csv").exists()
    # the advice works: that batch alone is recomputed
    before = {p.name: p.stat().st_mtime_ns for p in target.parent.glob("*.pt") if p != target}
    target.unlink()
    code, _, err = run_cli(["evaluate-gaps", run, "--resume"], capsys)
    assert code == 0, err
    assert (run / "gaps" / "test.csv").exists() and target.exists()
    assert all(target.parent.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())


def _yaml_payloads(marker):
    return {
        "apply": f"model: !!python/object/apply:os.mkdir [{marker}]\n",
        "object": "model: !!python/object:tests.reliability.test_safety.PlainObject {}\n",
        "name": "train: {lr: !!python/name:os.system }\n",
    }


def test_recipes_are_read_with_safe_load(tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    for name, text in _yaml_payloads(marker).items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(RECIPE + text)
        code, _, err = run_cli(["train", path, "--out", tmp_path / "out"], capsys)
        _assert_one_line_error(code, err, "malformed YAML")
        assert "python/" in err and not (tmp_path / "out").exists()
    assert not marker.exists()
    # control: the payload is live, an unsafe loader runs it
    yaml.unsafe_load(_yaml_payloads(marker)["apply"])
    assert marker.is_dir()


def test_a_hostile_override_or_run_recipe_is_refused(trained_run, recipe_file, tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    code, _, err = run_cli(["train", recipe_file, "--set", f"model.latent_dim=!!python/object/apply:os.mkdir [{marker}]",
                             "--out", tmp_path / "out"], capsys)
    _assert_one_line_error(code, err, "model.latent_dim")
    run = copy_run(trained_run, tmp_path / "run")
    (run / "recipe.yaml").write_text((run / "recipe.yaml").read_text() + _yaml_payloads(marker)["apply"].replace("model", "extra"))
    code, _, err = run_cli(["evaluate-gaps", run], capsys)
    _assert_one_line_error(code, err, "malformed YAML")
    assert not marker.exists() and not (tmp_path / "out").exists()
