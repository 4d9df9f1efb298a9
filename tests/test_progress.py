"""The command line's progress: the training bar's rate, fractional stage bars with time left,
--quiet, and evaluate-gaps' help."""

import itertools
import logging
from types import SimpleNamespace

import pytest
import tqdm.std

import gapbench.evaluate
import gapbench.pipeline
import gapbench.train
from gapbench.cli import _StageBars, _TrainBar
from tests.cli_runner import run_cli


class FakeClock:
    """A clock for tqdm that moves only when told to (plus a microsecond per reading, as a real one would)."""

    def __init__(self, start=1000.0):
        self.now = start
        self.tick = itertools.count()

    def __call__(self):
        return self.now + 1e-6 * next(self.tick)

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(tqdm.std, "time", fake)  # tqdm reads its clock through this name
    return fake


def _row(epoch, seconds):
    return {"epoch": epoch, "train_elbo": -100.0, "valid_elbo": float("nan"), "seconds": seconds,
            "images_per_s": 1000 / seconds}


def test_train_bar_rate_covers_the_first_epoch(clock):
    """A 2-second epoch is 0.5 epoch/s from the first update on (it used to show thousands)."""
    bar = _TrainBar(10)
    clock.advance(2.0)  # the first epoch runs; the callback comes at its end
    bar(_row(1, 2.0))
    assert bar.bar.format_dict["rate"] == pytest.approx(0.5, rel=1e-3)
    assert bar.bar.format_dict["elapsed"] == pytest.approx(2.0, rel=1e-3)
    clock.advance(2.0)
    bar(_row(2, 2.0))
    assert bar.bar.format_dict["rate"] == pytest.approx(0.5, rel=1e-3)
    bar.close()


def test_train_bar_of_a_resumed_run_counts_only_its_own_epochs(clock):
    bar = _TrainBar(10)
    clock.advance(4.0)
    bar(_row(6, 4.0))  # resumed after 5 epochs
    assert bar.bar.n == 6
    assert bar.bar.format_dict["rate"] == pytest.approx(0.25, rel=1e-3)
    assert "6/10" in tqdm.std.tqdm.format_meter(**bar.bar.format_dict)
    bar.close()


def test_stage_bars_move_within_a_batch_and_show_time_left(clock):
    bars = _StageBars()
    bars("L[q*_flow] (local)", 0, 10)
    clock.advance(10.0)
    bars("L[q*_flow] (local)", 0.5, 10)  # half a batch in 10 s: 190 s left for the other 9.5
    bar = bars.bars["L[q*_flow] (local)"]
    assert bar.n == pytest.approx(0.5)
    assert bar.format_dict["rate"] == pytest.approx(0.05, rel=1e-3)
    meter = tqdm.std.tqdm.format_meter(**bar.format_dict)
    assert "0.50/10 batch" in meter
    assert "<03:10" in meter  # the remaining time
    assert "s/batch" in meter
    clock.advance(58.4)
    bars("L[q*_flow] (local)", 3.42, 10)
    assert "3.42/10 batch" in tqdm.std.tqdm.format_meter(**bar.format_dict)
    bars("AIS", 0, 10)  # the next stage closes the previous stage's bar
    assert bar.disable
    bars("AIS", 10, 10)  # a finished stage's bar closes itself
    assert bars.bars["AIS"].disable
    bars.close()


def test_stage_bars_redraw_small_steps_after_a_fast_stretch(clock):
    """After two batches in a blink, a hundredth of a batch is still drawn (no wait for a whole one)."""
    bars = _StageBars()
    bars("AIS", 0, 10)
    clock.advance(0.15)
    bars("AIS", 2.0, 10)
    clock.advance(0.15)
    bars("AIS", 2.01, 10)
    assert bars.bars["AIS"].last_print_n == pytest.approx(2.01)
    bars.close()


def test_stage_bars_of_a_resumed_stage_time_only_the_new_work(clock):
    bars = _StageBars()
    bars("IWAE", 4, 10)  # four batches were done before
    clock.advance(30.0)
    bars("IWAE", 5, 10)
    assert bars.bars["IWAE"].format_dict["rate"] == pytest.approx(1 / 30, rel=1e-3)
    bars.close()


# --quiet, with the stages replaced by fakes that report progress as the real ones do.


def _recipe(tmp_path):
    from tests.stages.conftest import TINY

    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def _fake_train(r, run_dir, device=None, resume=False, callback=None):
    for epoch in range(1, 4):
        callback(_row(epoch, 0.01))
    logging.getLogger("gapbench.train").warning("a warning the user must see")
    return SimpleNamespace(summary_line=lambda: "trained 3 epochs into the run folder")


def _fake_evaluate(run_dir, overrides=(), device=None, resume=False, callback=None, settings_from=None, restart=False,
                   workers=None, merge=False, checkpoint=None):
    for done in (0, 0.5, 1.25, 2):
        callback("AIS", done, 2)
    return SimpleNamespace(summary_line=lambda: "gaps of 12 points written", reused=False)


def _fake_pipeline(recipe, overrides=(), out=None, device=None, train_callback=None, eval_callback=None,
                   stage_callback=None):
    _fake_train(None, None, callback=train_callback)
    stage_callback("trained")
    _fake_evaluate(None, callback=eval_callback)
    return None, "| table |"


@pytest.fixture
def fake_stages(monkeypatch):
    monkeypatch.setattr(gapbench.train, "train_run", _fake_train)
    monkeypatch.setattr(gapbench.evaluate, "evaluate_run", _fake_evaluate)
    monkeypatch.setattr(gapbench.pipeline, "run_pipeline", _fake_pipeline)


def _commands(tmp_path):
    recipe = _recipe(tmp_path)
    return {
        "train": (["train", recipe, "--out", tmp_path / "run"], "trained 3 epochs", "train:"),
        "evaluate-gaps": (["evaluate-gaps", tmp_path / "run"], "gaps of 12 points written", "AIS:"),
        "run": (["run", recipe, "--out", tmp_path / "run"], "| table |", "train:"),
    }


def _has_bar(err):
    return "%|" in err


@pytest.mark.parametrize("command", ["train", "evaluate-gaps", "run"])
def test_quiet_draws_no_bars_but_prints_the_summary(command, fake_stages, tmp_path, capsys, caplog):
    args, summary, label = _commands(tmp_path)[command]
    code, out, err = run_cli(args, capsys)
    assert code == 0 and summary in out
    assert _has_bar(err) and label in err  # the bars are there without --quiet
    for quiet_args in (args + ["--quiet"], args + ["-q"], ["--quiet"] + args, ["-q"] + args):
        caplog.clear()
        code, out, err = run_cli(quiet_args, capsys)
        assert code == 0 and summary in out, quiet_args
        assert not _has_bar(err) and label not in err, quiet_args
        if command != "evaluate-gaps":  # warnings are not silenced
            assert "a warning the user must see" in caplog.text


def test_quiet_run_still_says_which_stage_finished(fake_stages, tmp_path, capsys):
    args, _, _ = _commands(tmp_path)["run"]
    code, _, err = run_cli(args + ["-q"], capsys)
    assert code == 0 and "trained" in err and not _has_bar(err)


def test_quiet_train_of_a_real_recipe(tmp_path, capsys):
    """The real training loop, quiet: its summary line and nothing of a bar."""
    code, out, err = run_cli(["--quiet", "train", _recipe(tmp_path), "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    assert out.strip() and not _has_bar(err) and "epoch" not in err


# Help texts.


def _help(args, capsys):
    code, out, _ = run_cli(args + ["--help"], capsys)
    assert code == 0
    return " ".join(out.split())  # undo click's line wrapping


def test_evaluate_gaps_help_gives_evaluation_examples_and_no_fixed_default(capsys):
    text = _help(["evaluate-gaps"], capsys)
    assert "1000" not in text  # the default is the recipe's, not a constant
    assert "default: the recipe's evaluate.num_points" in text
    assert "--set evaluate.ais.num_steps=200" in text
    assert "--set train." not in text and "set train." not in text  # evaluate-gaps refuses train.* overrides
    assert "--quiet" in text


@pytest.mark.parametrize("command", ["train", "run"])
def test_training_commands_keep_their_set_example(command, capsys):
    text = _help([command], capsys)
    assert "--set train.num_epochs=5" in text and "--quiet" in text


def test_group_help_offers_quiet(capsys):
    assert "-q, --quiet" in _help([], capsys)
