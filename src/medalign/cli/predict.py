"""``medalign predict ...`` and the commands whose modules own their Typer definitions
(report, serve, export, predict masks/classify).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from medalign.cli.app import app, predict_app
from medalign.cli_grammar import fail


@predict_app.command("segment")
def predict_segment(
    model: Annotated[Path, typer.Option("--model", "-m", help="Segmentation bundle folder.")],
    image: Annotated[
        list[str],
        typer.Option(
            help="Image file; for a bundle of several modalities one per modality, named: --image a=FILE --image b=FILE."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Mask to write (.png, or .nii/.nii.gz).")],
    text: Annotated[
        str | None,
        typer.Option(help="Prompt naming what to segment (text-guided models; '' = no prompt)."),
    ] = None,
    attribute: Annotated[
        list[str] | None,
        typer.Option(help="NAME=VALUE finding of an attribute-guided model (C2FVL); repeat per attribute."),
    ] = None,
    overlay_path: Annotated[Path | None, typer.Option("--overlay", help="Also write an overlay PNG.")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average with the horizontally flipped image.")] = False,
    threshold: Annotated[float, typer.Option(help="Foreground probability threshold.")] = 0.5,
    bf16: Annotated[
        bool, typer.Option("--bf16", help="Run the model under bfloat16 autocast (faster).")
    ] = False,
) -> None:
    """Segment one case of any size (sliding windows at the training size; a prompt-guided
    model sees the whole image at its training size, as ``medalign eval segment`` does).

    The bundle records which images it takes; a bundle trained on several modalities needs each
    one, named. Example:

        medalign predict segment --model runs/seg/bundle --image a=a.png --image b=b.png \\
            --text "the lesion in the right lower zone" --out mask.png --overlay overlay.png
    """
    from medalign.bundle.inputs import parse_image_options
    from medalign.inference.predict import Predictor, prepare
    from medalign.inference.sliding_window import overlay, save_mask

    predictor = Predictor.from_bundle(model)
    try:
        parsed = parse_image_options(image)
        if isinstance(parsed, list) and len(parsed) > 1:
            raise ValueError(
                f"{len(parsed)} unnamed --image for one case; this bundle takes {predictor.inputs.describe()}. "
                f"{predictor.inputs.how_to_pass()}"
            )
        case: Any = parsed if isinstance(parsed, dict) else parsed[0]
        used = [name for name in predictor.arrange(case) if name != "*"] or list(predictor.inputs.modalities[:1])
        findings = _parse_attributes(attribute) if attribute else None
        probabilities = predictor.segment(case, text=text, attributes=findings, flip_tta=tta, bf16=bf16)
    except ValueError as err:
        raise fail(str(err)) from err
    mask = probabilities > threshold
    save_mask(mask, out)
    if overlay_path:
        first = next(iter(case.values())) if isinstance(case, dict) else case
        overlay(prepare(first, 1, None, predictor.normalisation)[None], mask).save(overlay_path)
    typer.echo(f"wrote {out}: {int(mask.sum())} foreground pixels of {mask.size} (inputs: {'+'.join(used)})")


def _parse_attributes(pairs: list[str]) -> dict[str, str]:
    """``["side=left", "zone=lower"]`` -> ``{"side": "left", "zone": "lower"}``."""
    found: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--attribute {pair!r} is not NAME=VALUE")
        found[name.strip()] = value.strip()
    return found


def _register_commands() -> None:
    """Commands whose modules own their Typer definitions (imports stay light: no onnx at import)."""
    from medalign.inference.batch_predict import predict_classes, predict_masks
    from medalign.inference.export import export_app
    from medalign.reporting.html_report import report_command
    from medalign.serve.command import serve_command

    app.command("report")(report_command)
    app.command("serve")(serve_command)
    app.add_typer(export_app, name="export")
    predict_app.command("masks")(predict_masks)
    predict_app.command("classify")(predict_classes)


_register_commands()
