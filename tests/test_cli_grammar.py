"""One CLI grammar: every command, given bad input, ends in exactly one `error: ...` line and exit 1;
unknown options get the closest real one; shared option names mean the same everywhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from medalign.cli import app, main
from medalign.cli_grammar import SYNONYMS, repeated_option, suggestion


def leaf_commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    children = getattr(command, "commands", None)
    if not children:
        yield path, command
        return
    for name, sub in children.items():
        yield from leaf_commands(sub, (*path, name))


COMMANDS = dict(leaf_commands(typer.main.get_command(app)))


def bad_inputs(tmp: Path) -> dict[tuple[str, ...], list[str]]:
    """Per command, an invocation that must fail: missing files, unknown formats, impossible values."""
    missing, out = str(tmp / "missing"), str(tmp / "out")
    manifest = str(tmp / "missing.csv")
    model = ["--model", missing, "--manifest", manifest]
    (tmp / "a_file").write_text("not a folder")
    return {
        ("data", "validate"): [manifest],
        ("data", "import"): ["no-such-format", missing, "--out", out],
        ("data", "phantom"): ["--out", str(tmp / "a_file" / "x")],
        ("data", "split"): [manifest, "--out", out],
        ("data", "summary"): [manifest],
        ("data", "shard"): [manifest, "--out", out],
        ("train",): ["--config", str(tmp / "missing.yaml")],
        ("ablate",): ["--config", str(tmp / "missing.yaml")],
        ("eval", "zeroshot"): [*model, "--templates", "busi"],
        ("eval", "retrieval"): model,
        ("eval", "probe"): model,
        ("eval", "segment"): model,
        ("eval", "fuse"): model,
        ("eval", "clinical"): model,
        ("predict", "segment"): ["-m", missing, "--image", missing, "-o", out],
        ("predict", "masks"): ["-m", missing, missing, "-o", out],
        ("predict", "classify"): ["-m", missing, missing, "-o", out],
        ("index", "build"): ["-o", out, *model],
        ("index", "search"): ["--index", missing, "--text", "a cyst"],
        ("chat",): ["-m", missing, "--image", missing, "--question", "how many?"],
        ("report",): [missing],
        ("serve",): ["-m", missing],
        ("export", "onnx"): ["-m", missing, "-o", out],
        ("quickstart",): ["-o", str(tmp / "a_file"), "--n", "8"],
    }


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(args)
    captured = capsys.readouterr()
    return int(done.value.code or 0), captured.out, captured.err


def assert_one_error_line(code: int, out: str, err: str, what: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, f"{what}: exit code {code}\n{out}\n{err}"
    assert lines and lines[-1].startswith("error: "), f"{what}: does not end in an error line:\n{err}"
    assert sum(line.startswith("error:") for line in (out + "\n" + err).splitlines()) == 1, f"{what}:\n{out}\n{err}"
    assert "Traceback" not in err, what
    return lines[-1]


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_answers_an_unknown_option_with_one_error_line(path, capsys) -> None:
    line = assert_one_error_line(*run_main([*path, "--no-such-option", "1"], capsys), " ".join(path))
    if not COMMANDS[path].context_settings.get("ignore_unknown_options"):  # train, ablate: recipe overrides
        assert f"no such option --no-such-option for `medalign {' '.join(path)}`" in line


def test_bad_input_to_every_command_ends_in_one_error_line(tmp_path: Path, capsys) -> None:
    cases = bad_inputs(tmp_path)
    uncovered = sorted(" ".join(p) for p in COMMANDS if p not in cases and p != ("data", "formats"))
    assert not uncovered, f"commands without a bad-input case here: {uncovered}"
    for path, args in cases.items():
        if path not in COMMANDS:
            continue  # a command renamed elsewhere: the walk above still covers what exists
        assert_one_error_line(*run_main([*path, *args], capsys), " ".join(path))


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["predict", "segment", "--prompt", "x"], "did you mean --text?"),
        (["predict", "masks", "--output", "x"], "did you mean --out?"),
        (["eval", "segment", "--bundle", "x"], "did you mean --model?"),
        (["serve", "--labels", "a"], "did you mean --label?"),
        (["predict", "masks", "--treshold", "0.3"], "did you mean --threshold?"),
    ],
)
def test_unknown_options_get_the_closest_real_one(args: list[str], hint: str, capsys) -> None:
    assert hint in assert_one_error_line(*run_main(args, capsys), " ".join(args))


def test_an_option_given_twice_is_refused_not_overwritten(tmp_path: Path, capsys) -> None:
    args = ["data", "import", "folders", str(tmp_path), "--out", str(tmp_path / "m.csv"), "-o", "fold=1"]
    line = assert_one_error_line(*run_main(args, capsys), "twice")
    assert "--out/-o is given more than once" in line and not (tmp_path / "m.csv").exists()
    command = COMMANDS[("predict", "masks")]
    assert repeated_option(command, ["--image", "a=x", "--image", "b=y", "-o", "p"]) is None  # repeatable


def test_shared_names_mean_the_same_thing_everywhere() -> None:
    """-m is always --model, -o always --out, -l always --label; --text is the prompt's name."""
    meaning = {"-m": "--model", "-o": "--out", "-l": "--label"}
    for path, command in COMMANDS.items():
        for param in command.params:
            opts = list(getattr(param, "opts", []))
            for short, long in meaning.items():
                if short in opts:
                    assert long in opts, f"`medalign {' '.join(path)}`: {short} means {opts}, not {long}"
            if "--model" in opts:
                assert "-m" in opts, f"`medalign {' '.join(path)}`: --model without -m"
            if "--out" in opts:
                assert "-o" in opts, f"`medalign {' '.join(path)}`: --out without -o"
            assert "--prompt" not in opts, f"`medalign {' '.join(path)}`: prompts are --text"
    for typo, real in SYNONYMS.items():
        assert typo != real and real.startswith("--")
    assert suggestion("--prompt", COMMANDS[("predict", "masks")]) == "--text"
