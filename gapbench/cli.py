"""The ``gapbench`` command line: parsing and wiring only.

Bad input (a :class:`~gapbench.errors.GapbenchError`, or a usage error) is
shown as one line on stderr and exits with status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import click

from gapbench import __version__
from gapbench.errors import GapbenchError

_DEBUG = {"on": False}


class _TrainBar:
    """Progress bar over epochs: ELBO, learning rate and speed; draws nothing when not ``enabled``."""

    def __init__(self, total: int, enabled: bool = True):
        self.total = total
        self.enabled = enabled
        self.bar = None

    def __call__(self, row) -> None:
        if not self.enabled:
            return
        if self.bar is None:  # created at the first epoch, so a resumed run starts where it left off
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=row["epoch"] - 1, desc="train", unit="epoch", dynamic_ncols=True)
            # The bar's clock starts when this epoch's training did, not now: the first
            # update's time then covers the whole epoch, and so does the rate it shows.
            self.bar.start_t = self.bar.last_print_t = self.bar.start_t - row.get("seconds", 0.0)
        self.bar.update(1)
        info = {"elbo": f"{row['train_elbo']:.2f}"}
        if row["valid_elbo"] == row["valid_elbo"]:  # not NaN: validated this epoch
            self.last_valid = f"{row['valid_elbo']:.2f}"
        if getattr(self, "last_valid", None):
            info["valid"] = self.last_valid
        info["img/s"] = f"{row['images_per_s']:.0f}"
        self.bar.set_postfix(info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _StageBars:
    """One progress bar per evaluation stage, in batches, with time left; draws nothing when not ``enabled``.

    Called as ``(label, done, total)``: ``done`` counts finished batches plus the
    finished fraction of the current one (3.42 of 10), so a stage whose batches
    take minutes still moves and shows a rate and a remaining time.
    """

    # tqdm's default meter with the fractional count to two decimals.
    BAR_FORMAT = "{l_bar}{bar}| {n:.2f}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bars = {}

    def __call__(self, label: str, done: float, total: float) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(label)
        if bar is None:
            for other in self.bars.values():
                other.close()
            # miniters=0: redraw on any progress (at most every mininterval), never wait for a
            # whole batch as tqdm's adaptive miniters would after a fast stretch.
            bar = self.bars[label] = tqdm(total=total, initial=done, desc=label, unit="batch", dynamic_ncols=True,
                                          bar_format=self.BAR_FORMAT, miniters=0)
        elif done != bar.n:
            bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()

set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override a recipe key, e.g. --set train.num_epochs=5 (repeatable).",
)
evaluate_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override an evaluation setting, e.g. --set evaluate.ais.num_steps=200 (repeatable); "
         "only evaluate.*, device and num_threads can change after training.",
)
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars (summaries and warnings still print).")
device_option = click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Where to compute (default: the recipe's device, 'auto' = cuda when available).",
)


def _quiet(quiet: bool) -> bool:
    """The command's --quiet, or the group's (gapbench --quiet COMMAND)."""
    ctx = click.get_current_context(silent=True)
    return quiet or bool(ctx is not None and ctx.find_root().params.get("quiet"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="gapbench")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@quiet_option
def cli(debug: bool, verbose: bool, quiet: bool) -> None:
    """Train VAEs and split their inference gap log p(x) - ELBO into the
    approximation gap (the family is too simple) and the amortization gap
    (the encoder misses the family's best member).

    \b
    Quick start:
      gapbench run recipes/quickstart.yaml
    """
    _DEBUG["on"] = debug
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Look here first (also $GAPBENCH_DATA).")
@click.option("--download", "download_names", multiple=True, metavar="NAME", help="Download NAME into the cache first.")
def datasets(data_dir: Optional[str], download_names: Sequence[str]) -> None:
    """List the datasets, where each was found, and how to get the missing ones."""
    from gapbench import data

    for name in download_names:
        path = data.download_dataset(name, root=data_dir)
        click.echo(f"downloaded {name} to {path}")
    rows = data.available_datasets(data_dir=data_dir)
    width = max(len(r.name) for r in rows)
    for r in rows:
        if r.available:
            click.echo(f"{r.name:<{width}}  available  {r.location}")
        elif r.problem:
            click.echo(f"{r.name:<{width}}  {r.problem}")
        else:
            click.echo(f"{r.name:<{width}}  missing    {r.how_to_get}")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<recipe name>).")
@device_option
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint.")
@quiet_option
def train(recipe: str, overrides, out: Optional[str], device: Optional[str], resume: bool, quiet: bool) -> None:
    """Train the VAE a RECIPE describes; writes checkpoint.pt, train_log.csv, recipe.yaml, meta.json.

    \b
    Under torchrun, vae and iwae train data-parallel (the global batch split across the ranks):
      torchrun --nproc-per-node 4 -m gapbench.cli train RECIPE --out DIR
    """
    from gapbench.recipe import load_recipe
    from gapbench.train import train_run, training_workers

    r = load_recipe(recipe, overrides)
    run_dir = Path(out) if out else Path("runs") / r.name
    main = training_workers().is_main  # under torchrun, rank 0 alone draws and prints
    bar = _TrainBar(r.train.num_epochs, enabled=main and not _quiet(quiet))
    try:
        result = train_run(r, run_dir, device=device, resume=resume, callback=bar)
    finally:
        bar.close()
    if main:
        click.echo(result.summary_line())


@cli.command("evaluate-gaps")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default=None,
              help="Which split (default: the recipe's evaluate.split).")
@click.option("--num-points", type=click.IntRange(min=1), default=None,
              help="How many datapoints (default: the recipe's evaluate.num_points).")
@click.option("--families", default=None, metavar="F1,F2", help="Local families to fit, e.g. ffg,flow.")
@click.option("--recipe", "settings_recipe", type=click.Path(dir_okay=False), default=None,
              help="Take the evaluation settings (evaluate section, device, num_threads) from this recipe "
                   "instead of the run's own recipe.yaml.")
@evaluate_set_option
@device_option
@click.option("--resume", is_flag=True,
              help="Reuse finished batches (and a finished evaluation) made from this checkpoint, these points, "
                   "settings and code; recompute the rest.")
@click.option("--restart", is_flag=True, help="Discard the finished batches of an interrupted evaluation and start over.")
@click.option("--shard", default=None, metavar="I/N",
              help="Compute only shard I of N (0 <= I < N) of the batches, as one task of a job array "
                   "($SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT are read when this is not given); "
                   "the last shard to finish writes the gaps files.")
@click.option("--merge", is_flag=True, help="Compute nothing: write the gaps files from the shards' finished "
                                            "batches, or fail naming the missing ones.")
@click.option("--checkpoint", type=click.IntRange(min=1), default=None, metavar="EPOCH",
              help="Evaluate the weights kept at this epoch (train.keep_checkpoints) instead of the final "
                   "model; writes gaps/epoch_<EPOCH>/<split>.csv/json.")
@quiet_option
def evaluate_gaps(run_dir: str, split, num_points, families, settings_recipe, overrides, device, resume: bool,
                  restart: bool, shard: Optional[str], merge: bool, checkpoint: Optional[int], quiet: bool) -> None:
    """Estimate L[q], L[q*], IWAE and AIS per datapoint of a trained RUN_DIR; writes gaps/<split>.csv/json.

    Under torchrun the ranks share the batches and rank 0 writes the results; with
    --shard I/N (a job array) each task computes its share and the last one writes them.
    """
    from gapbench.evaluate import _check_overrides, evaluate_run
    from gapbench.recipe import load_recipe
    from gapbench.scale import SINGLE, detect

    extra = list(overrides)
    if split is not None:
        extra.append(f"evaluate.split={split}")
    if num_points is not None:
        extra.append(f"evaluate.num_points={num_points}")
    if families is not None:
        extra.append(f"evaluate.families=[{families}]")
    settings = None
    if settings_recipe is not None:
        _check_overrides(extra)
        # A settings file may hold only an evaluate section: it names no dataset of its own.
        settings, extra = load_recipe(settings_recipe, extra, require_data=False), []
    if resume and restart:
        raise click.UsageError("--resume keeps finished batches and --restart discards them: give one")
    workers = SINGLE if merge and shard is None else detect(shard)
    if workers.sharded and restart:
        raise click.UsageError("--restart with --shard would discard the other shards' batches: restart once "
                               "without --shard (or delete gaps/.partial), then start the shards")
    bars = _StageBars(enabled=not _quiet(quiet) and workers.is_main)
    try:
        summary = evaluate_run(Path(run_dir), overrides=extra, device=device, resume=resume, callback=bars,
                               settings_from=settings, restart=restart, workers=workers, merge=merge,
                               checkpoint=checkpoint)
    finally:
        bars.close()
    if not workers.is_main and workers.distributed:
        return  # rank 0 prints the summary
    if summary.reused:
        click.echo(f"evaluate-gaps: {summary.path.with_suffix('.json')} is up to date (same checkpoint, points, "
                   "settings and code); nothing recomputed", err=True)
    click.echo(summary.summary_line())


@cli.command("evaluate-model")
@click.argument("spec", metavar="PACKAGE.MODULE:FACTORY")
@click.option("--weights", required=True, type=click.Path(dir_okay=False),
              help="The model's state_dict, saved with torch.save(model.state_dict(), FILE); read as tensors only.")
@click.option("--data", "data_file", required=True, type=click.Path(dir_okay=False),
              help="The evaluation points: a .npy, or a .npz with an array named test or x (or only one array).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The run folder to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Chooses the points and seeds every stage.")
@evaluate_set_option
@device_option
@click.option("--resume", is_flag=True, help="Reuse finished batches made from these weights, data, settings and code.")
@click.option("--restart", is_flag=True, help="Discard the finished batches of an interrupted evaluation and start over.")
@quiet_option
def evaluate_model(spec: str, weights: str, data_file: str, out: str, seed: int, overrides, device, resume: bool,
                   restart: bool, quiet: bool) -> None:
    """Evaluate your own model: FACTORY() from PACKAGE.MODULE with --weights, on --data; writes OUT/gaps/.

    The module is imported from the current directory or PYTHONPATH. Its model has latent_dim,
    log_prior(z), log_likelihood(x, z) and posterior(x) (README, "Your own model").
    """
    from gapbench.own_model import evaluate_model as run_evaluation
    from gapbench.own_model import load_data, load_model
    from gapbench.recipe import apply_overrides

    if resume and restart:
        raise click.UsageError("--resume keeps finished batches and --restart discards them: give one")
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if not key.startswith("evaluate."):
            raise GapbenchError(f"--set {key}: evaluate-model takes evaluate.* settings only, "
                                "e.g. --set evaluate.ais.num_steps=200")
    section = apply_overrides({}, overrides).get("evaluate", {})
    model = load_model(spec, weights)
    x = load_data(data_file)
    bars = _StageBars(enabled=not _quiet(quiet))
    try:
        summary = run_evaluation(model, x, Path(out), section, seed=seed, device=device or "auto", resume=resume,
                                 restart=restart, callback=bars,
                                 source={"factory": spec, "weights": str(weights), "data": str(data_file)})
    finally:
        bars.close()
    if summary.reused:
        click.echo(f"evaluate-model: {summary.path.with_suffix('.json')} is up to date (same weights, data, "
                   "settings and code); nothing recomputed", err=True)
    click.echo(summary.summary_line())


def _splits(ctx, param, value: str):
    splits = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in splits if v not in ("train", "valid", "test")]
    if bad or not splits:
        raise click.BadParameter(f"{value!r}: give train, valid or test, or several separated by commas (train,test)")
    return splits if len(splits) > 1 else splits[0]


def _epochs(ctx, param, value: Optional[str]):
    if value is None:
        return None
    words = [v.strip() for v in value.split(",") if v.strip()]
    if not words or not all(w.isdigit() and int(w) > 0 for w in words):
        raise click.BadParameter(f"{value!r}: give epochs separated by commas, e.g. 5,10,25,50")
    return list(dict.fromkeys(int(w) for w in words))


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Report folder (default: RUN_DIR/report for one run).")
@click.option("--split", default="test", callback=_splits, metavar="SPLIT[,SPLIT]",
              help="Which split's gaps to tabulate: train, valid or test; several (train,test) give a column per run and split.")
@click.option("--checkpoint", "checkpoints", default=None, callback=_epochs, metavar="E1[,E2...]",
              help="Tabulate the gaps of the weights kept at these epochs (evaluate-gaps --checkpoint E), a column "
                   "per run and epoch, instead of the final model's (default --out for one run: "
                   "RUN_DIR/report_checkpoints).")
def report(run_dirs, out: Optional[str], split, checkpoints) -> None:
    """Tables (md, tex, csv) and figures (png, pdf) of the gaps of one or more runs, all on one page (report.html)."""
    from gapbench.report import make_report

    own = "report" if checkpoints is None else "report_checkpoints"
    out_dir = Path(out) if out else (Path(run_dirs[0]) / own if len(run_dirs) == 1 else None)
    if out_dir is None:
        raise click.UsageError("with several runs, say where the report goes: --out DIR")
    written = make_report([Path(d) for d in run_dirs], out_dir, split=split, checkpoints=checkpoints)
    click.echo(f"report written to {out_dir} ({len(written)} files)")
    if out_dir / "report.html" in written:
        click.echo(f"all of it on one page, which opens offline: {out_dir / 'report.html'}")
    for name in ("table.md", "methods.md", "seeds.md"):  # the gaps; the training methods or seeds compared, if any
        table = out_dir / name
        if table.exists() and table in written:
            click.echo(table.read_text())


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder (default runs/<recipe name>); with --seeds, the folder of the seeds' runs.")
@click.option("--seeds", default=None, metavar="S[,S|A-B]",
              help="Run once per seed (0,1,2 or 0-4), into OUT/seed_S, and report over them in OUT/report "
                   "with the mean and its standard error between seeds (seeds.md).")
@device_option
@quiet_option
def run(recipe: str, overrides, out: Optional[str], seeds: Optional[str], device: Optional[str], quiet: bool) -> None:
    """train -> evaluate-gaps -> report in one command, skipping finished stages."""
    from gapbench.pipeline import parse_seeds, run_pipeline, run_seeds

    from gapbench.recipe import load_recipe

    from gapbench.scale import detect

    seed_list = None if seeds is None else parse_seeds(seeds)
    r = load_recipe(recipe, overrides)
    main_rank = detect().is_main  # under torchrun, rank 0 alone shows progress and prints the table
    show = not _quiet(quiet) and main_rank
    bar = _TrainBar(r.train.num_epochs, enabled=show)
    bars = [_StageBars(enabled=show)]

    def callbacks(seed: int):
        bars[0].close()
        bars[0] = _StageBars(enabled=show)  # a seed's stages are new bars, not the last seed's finished ones
        return bar, bars[0]

    say = lambda msg: (bar.close(), click.echo(msg, err=True))  # a finished stage's bar stops its clock
    try:
        if seed_list is None:
            _, table = run_pipeline(recipe, overrides=list(overrides), out=out, device=device, train_callback=bar,
                                    eval_callback=bars[0], stage_callback=say)
        else:
            _, _, table, seeds_table = run_seeds(recipe, seed_list, overrides=list(overrides), out=out,
                                                 device=device, callbacks_fn=callbacks, stage_callback=say)
            table = table + ("\n" + seeds_table if seeds_table else "")
    finally:
        bar.close()
        bars[0].close()
    if main_rank:
        click.echo(table)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<recipe name>).")
@device_option
@click.option("--full", is_flag=True, help="Print the whole resolved recipe (every default filled in), not a summary.")
def plan(recipe: str, overrides, out: Optional[str], device: Optional[str], full: bool) -> None:
    """What 'gapbench run RECIPE' would do, and each stage's time here, from a calibration of a few seconds.

    Writes nothing: it reads the run folder (--out, default runs/<name>) to say what
    would be trained, reused or recomputed, and times a few steps of each stage at the
    recipe's sizes on this machine and device.
    """
    from gapbench.plan import make_plan
    from gapbench.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    run_dir = Path(out) if out else Path("runs") / r.name
    click.echo(f"plan: timing {r.name}'s stages for a few seconds ...", err=True)
    click.echo(make_plan(r, run_dir, device=device).text(full=full))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point: run the CLI, turning user errors into one line and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="gapbench", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        if debug:
            raise
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            hint = f" (see '{ctx.command_path} --help')"
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except GapbenchError as exc:
        if debug or _DEBUG["on"]:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
