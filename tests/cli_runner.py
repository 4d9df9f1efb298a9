"""Run the gapbench command line in-process, as a user's shell would see it."""

from gapbench.cli import main


def run_cli(args, capsys):
    """(exit status, stdout, stderr) of ``gapbench ARGS``."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
