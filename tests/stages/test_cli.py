"""The command line: help, version, datasets, and bad input as one line, status 2, nothing left behind."""

import gzip
import shutil

import pytest

from gapbench import __version__
from gapbench.cli import main
from tests.cli_runner import run_cli


def test_help_and_version(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in ("train", "evaluate-gaps", "report", "run", "datasets"):
        assert command in out
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and __version__ in out


def test_datasets_lists_what_is_here(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, out, _ = run_cli(["datasets", "--data-dir", tmp_path / "none"], capsys)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(lines) == {"digits", "mnist", "fashion-mnist", "cifar10", "omniglot"}
    assert "available" in lines["digits"]
    assert "missing" in lines["mnist"] and "--download mnist" in lines["mnist"]


def _good_recipe(tmp_path):
    from tests.stages.conftest import TINY

    path = tmp_path / "good.yaml"
    path.write_text(TINY)
    return path


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _bad_cases(tmp_path, trained):
    """(name, argv, expected text in the one-line error, folder that must not be left behind)."""
    good = _good_recipe(tmp_path)
    out = tmp_path / "out"
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    file_parent = _write(tmp_path, "afile", "x")
    corrupt_run = tmp_path / "corrupt_run"
    shutil.copytree(trained, corrupt_run)
    (corrupt_run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    other_arch = tmp_path / "other_arch"
    shutil.copytree(trained, other_arch)
    text = (other_arch / "recipe.yaml").read_text().replace("latent_dim: 2", "latent_dim: 3")
    (other_arch / "recipe.yaml").write_text(text)
    truncated = tmp_path / "fm"
    (truncated / "fashion-mnist").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(truncated / "fashion-mnist" / name, "wb") as fh:
            fh.write(b"\x00\x00\x08\x03" + b"\x00" * 20)
    cases = [
        ("malformed yaml", ["train", _write(tmp_path, "m.yaml", "model: {latent_dim: [1, 2"), "--out", out], "malformed YAML"),
        ("unknown key", ["train", _write(tmp_path, "u.yaml", "model: {latnt_dim: 3}"), "--out", out], "did you mean 'latent_dim'"),
        ("wrong type", ["train", _write(tmp_path, "t.yaml", "train: {lr: fast}"), "--out", out], "train.lr: expected a number"),
        ("negative steps", ["train", good, "--set", "evaluate.ais.num_steps=-5", "--out", out], "--set evaluate.ais.num_steps=-5: must be at least 1"),
        ("latent_dim 0", ["train", good, "--set", "model.latent_dim=0", "--out", out], "--set model.latent_dim=0: must be at least 1"),
        ("unknown dataset", ["train", good, "--set", "data.dataset=mnsit", "--out", out], "did you mean 'mnist'"),
        ("missing recipe", ["train", tmp_path / "nope.yaml", "--out", out], "does not exist"),
        ("missing data", ["train", good, "--set", "data.dataset=mnist", "--set", f"data.data_dir={tmp_path / 'nodata'}", "--out", out], "mnist"),
        ("corrupt data", ["train", good, "--set", "data.dataset=fashion-mnist", "--set", f"data.data_dir={truncated}", "--out", out], "fashion-mnist"),
        ("malformed --set", ["train", good, "--set", "latent_dim", "--out", out], "expected section.key=value"),
        ("cuda without gpu", ["train", good, "--device", "cuda", "--out", out], "no CUDA GPU"),
        ("unwritable out", ["train", good, "--out", file_parent / "sub"], "is a file"),
        ("resume nothing", ["train", good, "--out", out, "--resume"], "nothing to resume" if False else "no checkpoint.pt to resume"),
        ("existing run", ["train", good, "--out", trained], "already holds a trained run"),
        ("conv on digits", ["train", good, "--set", "model.architecture=conv", "--out", out], "'conv' is built for 32x32x3"),
        ("categorical unquantized", ["train", good, "--set", "model.likelihood=categorical", "--out", out], "needs quantized data"),
        ("not a run", ["evaluate-gaps", not_a_run], "is not a gapbench run"),
        ("missing run dir", ["evaluate-gaps", tmp_path / "missing"], "is not a folder"),
        ("corrupt checkpoint", ["evaluate-gaps", corrupt_run], "not a readable gapbench checkpoint"),
        ("other architecture", ["evaluate-gaps", other_arch], "does not fit the model"),
        ("model override after training", ["evaluate-gaps", trained, "--set", "model.latent_dim=4"], "only evaluate.* settings"),
        ("too many points", ["evaluate-gaps", trained, "--num-points", "100000"], "ask for at most"),
        ("report without gaps", ["report", not_a_run], "no gap evaluation"),
        ("report of several runs without --out", ["report", trained, trained], "--out"),
        ("unknown option", ["train", good, "--epochs", "3"], "No such option"),
        ("unknown command", ["trian"], "No such command"),
        ("bad split choice", ["evaluate-gaps", trained, "--split", "dev"], "'dev' is not one of"),
    ]
    return cases


def test_bad_input_gives_one_line_status_2_and_leaves_nothing(capsys, tmp_path, trained_tiny, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("GAPBENCH_DATA", str(tmp_path / "nodata"))
    cases = _bad_cases(tmp_path, trained_tiny)
    assert len(cases) >= 25
    before_trained = sorted(p.name for p in trained_tiny.iterdir())
    failures = []
    for name, argv, expected in cases:
        code, out, err = run_cli(argv, capsys)
        lines = [l for l in err.splitlines() if l.strip()]
        problems = []
        if code != 2:
            problems.append(f"exit {code}")
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"stderr {err!r}")
        elif expected not in lines[0]:
            problems.append(f"message {lines[0]!r} lacks {expected!r}")
        if "Traceback" in err:
            problems.append("traceback")
        if (tmp_path / "out").exists():
            problems.append("left an output folder")
            shutil.rmtree(tmp_path / "out")
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)
    assert sorted(p.name for p in trained_tiny.iterdir()) == before_trained


def test_debug_shows_the_traceback(capsys, tmp_path):
    bad = _write(tmp_path, "u.yaml", "model: {latnt_dim: 3}")
    from gapbench.recipe import RecipeError

    with pytest.raises(RecipeError):
        main(["--debug", "train", str(bad), "--out", str(tmp_path / "o")])
