"""One grammar for every ``medalign`` command: how failures read and how typos are answered.

* Every failure ends in exactly one line ``error: <message>`` on stderr, exit code 1: a mistake
  a command detects (:func:`fail`), a usage error (unknown option, missing value), or an
  exception from the library (``error: <Type>: <message>``, the traceback with ``--debug``).
* An unknown option gets the closest real one: a known synonym (``--prompt`` -> ``--text``,
  ``--output`` -> ``--out``) or a close spelling.
* An option that takes one value and is given twice is an error, not "the last one wins": a
  short name used out of habit (``-o`` for importer options before ``-o`` meant ``--out``)
  must not silently replace a value.

The option names themselves are shared: ``-m/--model`` (a bundle), ``-o/--out`` (what a
command writes), ``--text`` (a prompt), ``--image [NAME=]FILE`` (an input image, named by
modality for several-modality bundles), ``--modality COL`` (manifest columns), ``-l/--label``
(class names).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import typer

try:  # the click typer runs on: newer typer vendors part of it (groups and options are typer's own)
    from typer._click.core import Abort, Command
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, NoSuchOption, UsageError
except ImportError:  # pragma: no cover - typer releases that use the click package
    from click.core import Command  # type: ignore[assignment]
    from click.exceptions import (  # type: ignore[assignment]
        Abort,
        ClickException,
        NoArgsIsHelpError,
        NoSuchOption,
        UsageError,
    )

# Words users reach for -> the option medalign uses for that thing.
SYNONYMS: dict[str, str] = {
    "--prompt": "--text",
    "--query": "--text",
    "--output": "--out",
    "--output-dir": "--out",
    "--outdir": "--out",
    "--bundle": "--model",
    "--checkpoint": "--model",
    "--input": "--image",
    "--images": "--image",
    "--file": "--image",
    "--labels": "--label",
    "--class": "--label",
    "--classes": "--label",
    "--column": "--modality",
    "--modalities": "--modality",
    "--recipe": "--config",
    "--data": "--manifest",
}


def fail(message: str) -> typer.Exit:
    """A mistake a command detected (a missing file, a bundle of the wrong kind): ``raise fail(...)``.

    Prints the one ``error: ...`` line (stderr, red) and returns the exit (code 1) to raise.
    """
    typer.secho(f"error: {one_line(message)}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


def one_line(text: str) -> str:
    """Whitespace (newlines included) collapsed, so a message is one line whatever raised it."""
    return " ".join(str(text).split())


def suggestion(option: str, command: Command | None) -> str | None:
    """The real option closest to an unknown ``option`` of ``command``: a synonym, else a close spelling."""
    if command is None:
        return None
    known = [name for param in command.params for name in getattr(param, "opts", []) if name.startswith("-")]
    name = option.split("=", 1)[0]
    if SYNONYMS.get(name) in known:
        return SYNONYMS[name]
    close = difflib.get_close_matches(name, [k for k in known if k.startswith("--")], n=1, cutoff=0.5)
    return close[0] if close else None


def usage_message(err: UsageError) -> str:
    """A usage error as one line, with the closest option and where to read more."""
    command = err.ctx.command if err.ctx is not None else None
    path = err.ctx.command_path if err.ctx is not None else "medalign"
    if isinstance(err, NoSuchOption):
        hint = suggestion(err.option_name, command)
        did_you_mean = f" (did you mean {hint}?)" if hint else ""
        return f"no such option {err.option_name} for `{path}`{did_you_mean}; see `{path} --help`"
    message = one_line(err.format_message()).rstrip(".")
    return f"{message[:1].lower()}{message[1:]} (`{path}`); see `{path} --help`"


def leaf_command(root: Command, args: Sequence[str]) -> tuple[Command, list[str]]:
    """The command ``args`` name (groups walked by their sub-command words) and the words after it."""
    command, rest = root, list(args)
    while isinstance(getattr(command, "commands", None), dict) and rest and rest[0] in command.commands:
        command, rest = command.commands[rest[0]], rest[1:]  # type: ignore[attr-defined]
    return command, rest


def repeated_option(command: Command, args: Sequence[str]) -> str | None:
    """The first single-value option of ``command`` that ``args`` give more than once, by any of its names."""
    counts: dict[str, int] = {}
    names: dict[str, Any] = {}
    for param in command.params:
        single_value = not (getattr(param, "multiple", False) or getattr(param, "count", False) or getattr(param, "is_flag", False))
        if param.param_type_name == "option" and single_value:
            for opt in param.opts:
                names[opt] = param
    for arg in args:
        if arg == "--":
            break
        param = names.get(arg.split("=", 1)[0] if arg.startswith("--") else arg)
        if param is not None:
            counts[param.name] = counts.get(param.name, 0) + 1
            if counts[param.name] > 1:
                return "/".join(param.opts)
    return None


def error_line(err: BaseException) -> str:
    """``error: ...`` for anything a command raised."""
    if isinstance(err, UsageError):
        return f"error: {usage_message(err)}"
    if isinstance(err, ClickException):
        return f"error: {one_line(err.format_message())}"
    return f"error: {type(err).__name__}: {one_line(str(err))} (add --debug for the traceback)"


__all__ = [
    "SYNONYMS",
    "Abort",
    "ClickException",
    "NoArgsIsHelpError",
    "NoSuchOption",
    "UsageError",
    "error_line",
    "fail",
    "leaf_command",
    "one_line",
    "repeated_option",
    "suggestion",
    "usage_message",
]
