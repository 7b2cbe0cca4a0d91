"""The README's runnable examples, run exactly as written against the tiny quickstart's outputs.

A fenced block is runnable when the line before it is ``<!-- example -->`` (it must finish with
exit code 0) or ``<!-- example: server -->`` (a server: it must answer ``/api/info`` listing each
``--model`` it was given, then it is stopped). Blocks run in the folder where the quickstart ran
(it holds ``quickstart_out/``, and ``configs/`` is linked there), shell blocks with
``bash -euo pipefail`` and the ``medalign`` of this environment, Python blocks with this
interpreter. So a path the quickstart no longer writes, or a renamed option, fails CI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"<!-- example(?:: (?P<mode>\w+))? -->\n```(?P<language>bash|python)\n(?P<code>.*?)```", re.S)


@dataclass(frozen=True)
class Example:
    section: str
    language: str
    mode: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.section} ({self.language}{', ' + self.mode if self.mode != 'run' else ''})"


def readme_examples(text: str) -> list[Example]:
    """Every marked block, named by the README section it sits in."""
    examples = []
    for match in BLOCK.finditer(text):
        headings = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
        section = headings[-1] if headings else "top"
        examples.append(Example(section, match["language"], match["mode"] or "run", match["code"]))
    return examples


EXAMPLES = readme_examples(README.read_text(encoding="utf-8"))


def test_the_readme_marks_its_examples() -> None:
    languages = {e.language for e in EXAMPLES}
    assert len(EXAMPLES) >= 3 and languages == {"bash", "python"}, [e.name for e in EXAMPLES]
    assert any(e.mode == "server" for e in EXAMPLES)
    unmarked = re.findall(r"<!-- example[^>]*-->\n(?!```(?:bash|python)\n)", README.read_text(encoding="utf-8"))
    assert not unmarked, "an example marker must sit right above a ```bash or ```python fence"


@pytest.fixture(scope="module")
def example_env(tiny_quickstart) -> tuple[Path, dict[str, str]]:
    workdir = tiny_quickstart.workdir
    if not (workdir / "configs").exists():
        (workdir / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return workdir, env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(example: Example, workdir: Path, env: dict[str, str]) -> None:
    port = _free_port()
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", example.code], cwd=workdir, env={**env, "MEDALIGN_PORT": str(port)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline, info = time.monotonic() + 240, None
        while info is None:
            if process.poll() is not None:
                pytest.fail(f"the server example exited ({process.returncode}):\n{process.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the server example did not answer /api/info within 240 s")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5) as response:
                    info = json.loads(response.read())
            except OSError:
                time.sleep(1)
        models = re.findall(r"--model (\S+)", example.code)
        assert len(info["models"]) == len(models) >= 1, info
        assert info["uploads"], info
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_readme_example_runs(example: Example, example_env: tuple[Path, dict[str, str]]) -> None:
    workdir, env = example_env
    if example.mode == "server":
        _serve(example, workdir, env)
        return
    command = ["bash", "-euo", "pipefail", "-c", example.code]
    if example.language == "python":
        command = [sys.executable, "-c", example.code]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"README example in '{example.section}' failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
