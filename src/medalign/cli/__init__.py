"""The ``medalign`` command line: a thin layer over the library, one command per job.

One module per command group (``data``, ``train``, ``evaluate`` for ``eval``, ``predict``,
``index``, ``chat``); :func:`main` is the console entry point.
"""

from __future__ import annotations

import importlib

import typer

from medalign.cli.app import app
from medalign.cli_grammar import fail

for _group in ("data", "train", "evaluate", "predict", "index", "chat"):  # each registers its commands, in this order (--help)
    importlib.import_module(f"medalign.cli.{_group}")


DEBUG_FLAG = "--debug"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every failure ends in one red ``error: ...`` line and exit code 1.

    A command's own check (:func:`~medalign.cli_grammar.fail`), a usage mistake (an
    unknown option gets the closest real one: ``--prompt`` -> ``--text``) and anything the
    library raises (a missing file, a bad manifest row, a bundle of the wrong kind) all print
    one line (:func:`~medalign.cli_grammar.error_line`); ``--debug`` anywhere on the command
    line shows the full traceback instead.
    """
    import sys

    from medalign.cli_grammar import (
        Abort,
        ClickException,
        NoArgsIsHelpError,
        error_line,
        leaf_command,
        repeated_option,
    )

    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    root = typer.main.get_command(app)
    try:
        command, rest = leaf_command(root, args)
        twice = repeated_option(command, rest)
        if twice is not None:
            raise fail(f"option {twice} is given more than once; it takes one value (see --help)")
        code = root.main(args=args, prog_name="medalign", standalone_mode=False)
    except NoArgsIsHelpError as err:  # `medalign`, `medalign data`: the help
        typer.echo(err.format_message())
        raise SystemExit(0) from None
    except typer.Exit as done:  # a command's own failure: its error line is printed
        raise SystemExit(done.exit_code) from None
    except (KeyboardInterrupt, Abort):
        typer.secho("interrupted", fg=typer.colors.RED, err=True)
        raise SystemExit(130) from None
    except Exception as err:
        if debug and not isinstance(err, ClickException):
            raise
        typer.secho(error_line(err), fg=typer.colors.RED, err=True)
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)
