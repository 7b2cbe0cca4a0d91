from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medalign.config import (
    ConfigError,
    RunConfig,
    load_config,
    parse_cli_overrides,
    save_config,
    validate_ranges,
)
from medalign.pipeline.curriculum import is_curriculum

REPO = Path(__file__).resolve().parents[1]


def test_recipe_overrides_and_round_trip(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"out": "runs/x", "data": {"manifest": "m.csv", "batch_size": 8}}))
    config = load_config(
        recipe, parse_cli_overrides(["--optim.lr", "3e-4", "train.epochs=2", "--data.modalities=[image:a]"])
    )
    assert config.optim.lr == pytest.approx(3e-4) and isinstance(config.optim.lr, float)
    assert config.train.epochs == 2 and config.data.batch_size == 8
    assert config.data.modalities == ["image:a"]
    saved = save_config(config, tmp_path / "run" / "config.yaml")
    assert load_config(saved) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epochs=two"], "train.epochs: expected int"),
        (["train.nope=1"], r"train: unknown key\(s\) \['nope'\]"),
        (["loss.kind=triplet"], "loss.kind: 'triplet' is not one of"),
        (["train.grad_cache=1"], "train.grad_cache: expected true/false"),
        (["data=3"], "data: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_range_checks_before_anything_runs() -> None:
    config = load_config(
        None, ["data.manifest=m.csv", "data.batch_size=10", "train.accumulate=4", "optim.lr=-1"]
    )
    with pytest.raises(ConfigError, match=r"divisible by train.accumulate.*optim.lr must be > 0"):
        validate_ranges(config)
    with pytest.raises(ConfigError, match=r"data\.manifest or data\.phantom"):
        validate_ranges(RunConfig())


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="cannot parse override"):
        parse_cli_overrides(["--lonely"])


# curricula chain recipes (their own loader; tests/project/test_recipes.py builds every stage)
@pytest.mark.parametrize(
    "recipe",
    sorted(p for p in (REPO / "configs").rglob("*.yaml") if not is_curriculum(p)),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_every_shipped_recipe_loads_and_passes_range_checks(recipe: Path) -> None:
    validate_ranges(load_config(recipe))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-0.1", "optim.lr must be > 0"),
        ("optim.lr=.nan", r"optim.lr: expected a finite number, got nan"),
        ("optim.lr=inf", r"optim.lr: expected a finite number, got inf"),
        ("optim.lr=fast", "optim.lr: expected float, got str 'fast'"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("train.epochs=1.5", "train.epochs: expected int, got float"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("data.batch_size='8'", "data.batch_size: expected int, got str"),
        ("data.eval_batch_size=0", "data.eval_batch_size must be >= 1"),
        ("data.image_size=0", "data.image_size must be >= 1"),
        ("data.channels=0", "data.channels must be >= 1"),
        ("data.rotate_degrees=-5", "data.rotate_degrees, data.scale and data.translate must be >= 0"),
        ("optim.betas=[0.9, 1.0]", r"optim.betas must be two numbers in \[0, 1\)"),
        ("optim.grad_clip=0", r"optim.grad_clip must be > 0 \(or null\)"),
        ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("seg_loss.dice_weight=-1", "seg_loss weights must be >= 0"),
        ("optim.learning_rate=0.1", r"optim: unknown key\(s\) \['learning_rate'\]"),
    ],
)
def test_each_bad_value_is_refused_naming_its_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_ranges(load_config(None, ["data.manifest=m.csv", override]))
