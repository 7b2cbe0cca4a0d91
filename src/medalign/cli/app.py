"""The ``medalign`` Typer application and its command groups; each group's commands live in
the module named after it.
"""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="medalign",
    help="Multi-modal medical image analysis with contrastive learning. Add --debug to any command "
    "to see a traceback instead of a one-line error; `medalign COMMAND --help` shows an example of "
    "each command.\n\nExample (the whole path on the built-in phantom, CPU-friendly):\n\n"
    "    medalign quickstart --out /tmp/qs",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Import, validate, split and inspect datasets (manifests).\n\nExample:\n\n"
    "    medalign data import busi ~/data/busi -o data/busi.csv",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
eval_app = typer.Typer(
    help="Evaluate a trained bundle on a manifest split.\n\nExample:\n\n"
    "    medalign eval zeroshot --model runs/busi/bundle --manifest busi.csv --templates busi",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")
predict_app = typer.Typer(
    help="Run a trained bundle on new images.\n\nExample:\n\n"
    "    medalign predict masks --model runs/segment_kvasir/bundle new_frames/ --out preds/",
    no_args_is_help=True,
)
app.add_typer(predict_app, name="predict")
index_app = typer.Typer(
    help="Similar-case search: build an embedding index of known cases, search it.\n\nExample:\n\n"
    "    medalign index search --index indexes/medpix --image scan.png -k 5",
    no_args_is_help=True,
)
app.add_typer(index_app, name="index")


ModalityOption = Annotated[
    list[str] | None,
    typer.Option(
        "--modality",
        help="Image column per bundle modality, in the bundle's order (default: the columns it records).",
    ),
]
