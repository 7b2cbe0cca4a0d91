"""``medalign chat``: answer questions about an image with an instruct bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medalign.cli.app import app
from medalign.cli_grammar import fail


@app.command("chat")
def chat(
    model: Annotated[Path, typer.Option("--model", "-m", help="Instruct bundle folder (task: instruct).")],
    image: Annotated[
        list[str],
        typer.Option(help="Image file; repeat for several images, or name the bundle's modalities: --image a=FILE --image b=FILE."),
    ],
    question: Annotated[
        str | None, typer.Option(help="One question; without it, questions are read line by line from stdin.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 64,
    sample: Annotated[bool, typer.Option("--sample", help="Sample (temperature, top-p) instead of greedy.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
) -> None:
    """Ask an instruction-tuned model about images; the answer streams as it is generated.

    Example:

        medalign chat --model runs/instruct/phantom_tiny/stages_1-2/bundle \\
            --image a=a.png --image b=b.png --question "How many lesions are there?"
    """
    import sys

    from medalign.bundle.inputs import parse_image_options
    from medalign.inference.predict import Predictor

    predictor = Predictor.from_bundle(model)
    try:
        images: Any = parse_image_options(image)
    except ValueError as err:
        raise fail(str(err)) from err
    history: list[dict[str, str]] = []
    questions = [question] if question is not None else (line.strip() for line in sys.stdin)
    for asked in questions:
        if not asked:
            continue
        try:
            answer = predictor.chat(
                images, asked, history, stream=lambda piece: typer.echo(piece, nl=False),
                max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p,
            )  # fmt: skip
        except ValueError as err:
            raise fail(str(err)) from err
        typer.echo("")
        history += [{"from": "human", "value": asked}, {"from": "gpt", "value": answer}]
