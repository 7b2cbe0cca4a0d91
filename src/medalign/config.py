"""Run configuration: typed dataclasses grouped by concern, loaded from YAML, overridable from the CLI.

A recipe is a YAML file whose keys mirror :class:`RunConfig`. Every value is checked against
the field's type before anything runs (an unknown key or a string where a number belongs is
an error naming the key path), and the resolved configuration is written beside every run so
the run can be repeated exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key path and the problem."""


@dataclass
class PhantomSource:
    """Generate the built-in phantom as the run's data (no manifest needed)."""

    n: int = 240
    seed: int = 0
    size: int = 128
    manifest: Literal["cases", "prompts"] = "cases"


@dataclass
class PromptConfig:
    """How a prompt-guided segmentation run shows its prompts in training (``data.prompts``).

    Rows that share their image cells are one image with several prompts (the phantom's one
    row per lesion). ``per_image`` rows of the same image go into a batch together, each with
    its own target, so a batch holds the same pixels with different prompts and different
    masks: the text is the only way to tell them apart. Slots an image cannot fill with its own
    prompts take, when ``negatives_from`` names attribute columns, the prompt of another image
    whose values in those columns match none of this image's rows, with an empty target (the
    phantom: "the lesion in the right upper zone" of a case without one there); otherwise they
    repeat its own rows. ``dropout`` replaces a row's prompt by the empty prompt with
    probability p, its target then being the union of the image's targets (what an image with
    no prompt asks for). The defaults change nothing: one row at a time, as any other task.
    """

    per_image: int = 1
    negatives_from: list[str] = field(default_factory=list)  # e.g. ["attr:side", "attr:zone"]
    dropout: float = 0.0


@dataclass
class DataConfig:
    manifest: str = ""  # path to a manifest; relative paths resolve against the working directory
    phantom: PhantomSource | None = None  # used when manifest is empty
    modalities: list[str] | None = None  # image columns; default: all
    # one row per (case, modality) in a single `image` column instead of channels side by side:
    # a single-channel encoder then sees every modality (Stage I/II of the curriculum)
    modality_rows: bool = False
    # label-efficiency studies: keep this fraction of the train split's patients (seeded by
    # train.seed, nested: the 10% subset lies inside the 50% one); val/test are untouched
    train_fraction: float = 1.0
    mask: str | None = None
    label: str | None = "label"
    image_size: int | None = None  # default: the model's image size
    channels: int | None = None  # force 1 or 3 channels; default: the model's in_channels
    normalisation: Literal["dtype", "minmax", "zscore", "percentile", "none"] = "dtype"
    augment: bool = True
    flip_axes: list[int] = field(default_factory=list)
    rotate_degrees: float = 10.0
    scale: float = 0.1
    translate: float = 0.05
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 2
    cache: str | None = None
    text_max_length: int = 77
    prompts: PromptConfig = field(default_factory=PromptConfig)  # prompt-guided segmentation only
    text_from_labels: str | None = None  # templates (file or shipped name) that write text from labels
    drop_last: bool = True
    # a folder of tar shards (`medalign data shard`) that training reads its train split from;
    # evaluation still reads data.manifest. shard_buffer: shuffle buffer in samples (0: none);
    # resample: draw shards with replacement (multi-node runs with uneven shards)
    shards: str | None = None
    shard_buffer: int = 256
    resample: bool = False


@dataclass
class ModelConfig:
    name: str = "align_tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a bundle folder whose weights initialise this model
    # a bundle of the same kind must fill every weight of the model and bring none it lacks;
    # true accepts a partial load (the missing and unexpected keys are still printed)
    init_from_partial: bool = False
    adapters: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    kind: Literal["clip", "siglip", "dcl"] = "clip"
    local_weight: float = 0.0
    soft_targets: Literal["none", "labels", "text"] = "none"


@dataclass
class SegLossConfig:
    kind: Literal["dice_bce", "dice_ce", "focal_dice"] = "dice_bce"
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    side_weight: float = 0.0  # coarse-to-fine consistency of side outputs (text_unet side_outputs)


@dataclass
class FuseLossConfig:
    """Weights of the fuse task's terms, added to the task loss (``seg_loss`` Dice+BCE, or cross-entropy).

    ADF terms (``fuse_adf``; MM-EndoCL) apply to every pair of modalities over the cases where
    both are present: multi-scale MMD of the encoders' features, similarity of the shared parts,
    dissimilarity of the specific parts, shared/specific orthogonality per modality, and the
    disentangled contrastive loss. ``balance_weight`` scales the MoE load-balancing loss
    (``fuse_moe``; 1.0 at perfect balance, so the term is never zero). A term whose features a
    model does not produce is skipped.
    """

    mmd_weight: float = 0.1
    similarity_weight: float = 0.1
    dissimilarity_weight: float = 0.1
    dissimilarity_margin: float = 0.0
    orthogonality_weight: float = 0.1
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.1
    balance_weight: float = 0.01
    label_smoothing: float = 0.0  # classification head only


@dataclass
class PretrainLossConfig:
    """``task: pretrain`` (Stage I): masked reconstruction plus a contrastive term between two views.

    The contrastive term compares encoder embeddings of two views of each case (never the
    reconstructed pixels): two augmentations of the same image (``views: augment``) or two
    modalities of the same case (``views: modalities``, the first two ``data.modalities``).
    """

    contrastive_weight: float = 0.1
    temperature: float = 0.1
    views: Literal["augment", "modalities"] = "augment"
    # which embeddings the contrastive term compares: those of the masked forward (no extra pass)
    # or the encoder's on the whole, unmasked views (one more pass per view; CMAE-style), which
    # trains the features a downstream model reads (medalign.tasks.pretrain)
    contrast_on: Literal["masked", "full"] = "masked"
    # views: augment -- each view is a random resized crop keeping this fraction of the image area
    # or more (aspect 3/4..4/3), a random left-right flip and a contrast/brightness jitter of +-this.
    crop_min_scale: float = 0.35
    intensity_jitter: float = 0.2


@dataclass
class ClinicalLossConfig:
    """``task: clinical`` (Stage III heads): diagnosis cross-entropy and the survival loss, weighted."""

    diagnosis_weight: float = 1.0
    survival_weight: float = 1.0
    label_smoothing: float = 0.0
    # "balanced": cross-entropy weights n / (K * n_k) from the train split's labels, so a rare class
    # counts as much as a common one (what balanced accuracy scores); "none": plain cross-entropy
    class_weights: Literal["none", "balanced"] = "none"


@dataclass
class ReportConfig:
    """``task: report``: how reports are decoded when the run is evaluated."""

    decoding: Literal["greedy", "beam"] = "beam"
    beam_size: int = 3
    max_new_tokens: int = 96
    length_penalty: float = 1.0
    # loop guards (transformers' generate semantics), greedy and beam alike:
    no_repeat_ngram_size: int = 3  # a token completing an n-gram already in the report gets -inf; 0 = off
    repetition_penalty: float = 1.0  # CTRL: seen tokens' logits / p (positive) or * p (negative); 1 = off
    retrieval_baseline: bool = True  # also score the nearest training report by image embedding


@dataclass
class InstructConfig:
    """``task: instruct`` (visual instruction tuning): what trains, on which conversations, how it answers.

    ``stage: projector`` is LLaVA's stage A (only the projector learns, on captions or reports);
    ``stage: full`` is stage B (projector + LM, or projector + LoRA adapters when ``lora`` is
    set: ``{r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, v_proj]}``).
    """

    stage: Literal["projector", "full"] = "full"
    conversations: Literal["auto", "llava", "caption", "report", "phantom"] = "auto"
    images: Literal["stack", "separate"] = "stack"  # modalities as channels of one image, or one image each
    train_vision: bool = False
    lora: dict[str, Any] = field(default_factory=dict)  # empty: full fine-tuning of the LM in stage full
    gradient_checkpointing: bool = False
    # evaluation on eval.split: the first answer of each conversation, decoded
    decoding: Literal["greedy", "sample"] = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    no_repeat_ngram_size: int = 0  # > 0: no token n-gram twice in an answer (long captions loop without it)
    max_eval_rows: int | None = None  # None: every row of the split
    eval_untuned: bool = True  # also score the model as it starts (before this run's training)
    retrieval_baseline: bool = True  # the answer of the nearest training image to the same question


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8  # AdamW's; larger makes steps on near-zero gradients proportional, not +-lr
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    # learning rate per part of the model (medalign.models.param_groups): parameter-name prefix ->
    # multiplier, e.g. {vision: 0.1}; and layer-wise decay inside a tower, e.g. {vision: 0.75}
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    layer_decay: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None
    accumulate: int = 1  # micro-batches per optimiser step
    grad_cache: bool = True  # keep the contrastive batch whole across micro-batches
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "bf16-mixed"
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    deterministic: bool = False
    progress: bool = True  # a progress bar, shown only when stderr is a terminal
    # keep checkpoints/last.ckpt (model + optimiser state) once the run has finished and written its
    # bundle; needed only to continue training a finished run with --resume
    keep_checkpoints: bool = False
    # torch.compile (inductor) the model's forward: compiling costs tens of seconds up front and
    # pays back in long runs (U-Net step on this CPU: 1.45x bf16 eager; BENCHMARKS.md)
    compile: bool = False


@dataclass
class EvalConfig:
    split: str = "test"
    zeroshot: str | None = None  # a template file or the name of a shipped one (medalign/prompts)
    zeroshot_label: str = "label"
    retrieval: bool = True
    probe: bool = False
    probe_label: str = "label"


@dataclass
class RunConfig:
    task: Literal["align", "segment", "fuse", "pretrain", "clinical", "report", "instruct"] = "align"
    out: str = "runs/align"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)  # contrastive (task: align)
    seg_loss: SegLossConfig = field(default_factory=SegLossConfig)  # task: segment (and fuse's mask loss)
    fuse_loss: FuseLossConfig = field(default_factory=FuseLossConfig)  # task: fuse
    mae_loss: PretrainLossConfig = field(default_factory=PretrainLossConfig)  # task: pretrain
    clinical_loss: ClinicalLossConfig = field(default_factory=ClinicalLossConfig)  # task: clinical
    report: ReportConfig = field(default_factory=ReportConfig)  # task: report
    instruct: InstructConfig = field(default_factory=InstructConfig)  # task: instruct
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML recipe <- ``key.path=value`` overrides, validated field by field."""
    raw = read_yaml_mapping(path) if path is not None else {}
    for override in overrides or []:
        set_path(raw, *split_override(override))
    return build(RunConfig, raw, "")


def read_yaml_mapping(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {what} '{path}': {err}") from err
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{what} '{path}' must be a mapping at the top level")
    return loaded or {}


def split_override(override: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> ``(["train", "lr"], 3e-4)``; the value is parsed as YAML."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not key.path=value")
    return key.strip().lstrip("-").split("."), yaml.safe_load(value)


def parse_cli_overrides(args: list[str]) -> list[str]:
    """``--train.lr 3e-4``, ``--train.lr=3e-4`` and ``train.lr=3e-4`` all become ``train.lr=3e-4``."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if "=" in arg:
            out.append(arg.lstrip("-"))
        elif arg.startswith("--") and i + 1 < len(args):
            out.append(f"{arg[2:]}={args[i + 1]}")
            i += 1
        else:
            raise ConfigError(f"cannot parse override {arg!r}; use --section.key VALUE or section.key=VALUE")
        i += 1
    return out


def set_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set ``tree[k0][k1]...`` = value, creating (or replacing non-mapping) levels on the way."""
    for key in keys[:-1]:
        node = tree.get(key)
        if not isinstance(node, dict):
            node = {}
            tree[key] = node
        tree = node
    tree[keys[-1]] = value


def build(cls: type, data: Any, path: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking every key and value type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path or 'config'}: unknown key(s) {unknown}; known: {sorted(names)}")
    values = {name: _coerce(hints[name], data[name], f"{path}.{name}".lstrip(".")) for name in data}
    return cls(**values)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {hint}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{path}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: expected a finite number, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def validate_ranges(config: RunConfig) -> None:
    """Range checks that types cannot express, before any data is touched."""
    checks = [
        (config.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (config.data.eval_batch_size >= 1, "data.eval_batch_size must be >= 1"),
        (config.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (config.data.image_size is None or config.data.image_size >= 1, "data.image_size must be >= 1"),
        (config.data.channels is None or config.data.channels >= 1, "data.channels must be >= 1"),
        (config.data.text_max_length >= 1, "data.text_max_length must be >= 1"),
        (
            min(config.data.rotate_degrees, config.data.scale, config.data.translate) >= 0,
            "data.rotate_degrees, data.scale and data.translate must be >= 0",
        ),
        (0 < config.data.train_fraction <= 1, "data.train_fraction must be in (0, 1]"),
        (config.train.accumulate >= 1, "train.accumulate must be >= 1"),
        (
            config.data.batch_size % config.train.accumulate == 0,
            "data.batch_size must be divisible by train.accumulate (micro-batches split the batch)",
        ),
        (config.train.epochs >= 1, "train.epochs must be >= 1"),
        (config.train.max_steps is None or config.train.max_steps >= 1, "train.max_steps must be >= 1"),
        (config.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (config.train.log_every >= 1, "train.log_every must be >= 1"),
        (config.train.num_nodes >= 1, "train.num_nodes must be >= 1"),
        (config.optim.lr > 0, "optim.lr must be > 0"),
        (config.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (config.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (
            config.optim.grad_clip is None or config.optim.grad_clip > 0,
            "optim.grad_clip must be > 0 (or null)",
        ),
        (
            len(config.optim.betas) == 2 and all(0 <= b < 1 for b in config.optim.betas),
            "optim.betas must be two numbers in [0, 1)",
        ),
        (config.loss.local_weight >= 0, "loss.local_weight must be >= 0"),
        (
            min(config.seg_loss.dice_weight, config.seg_loss.bce_weight, config.seg_loss.side_weight) >= 0,
            "seg_loss weights must be >= 0",
        ),
        (
            bool(config.data.manifest) or config.data.phantom is not None,
            "data.manifest or data.phantom is required",
        ),
        (
            config.task != "segment" or bool(config.data.mask),
            "task segment needs data.mask (the mask column)",
        ),
        (config.data.shard_buffer >= 0, "data.shard_buffer must be >= 0"),
        (config.data.prompts.per_image >= 1, "data.prompts.per_image must be >= 1"),
        (0 <= config.data.prompts.dropout < 1, "data.prompts.dropout must be in [0, 1)"),
        (
            config.data.batch_size % config.data.prompts.per_image == 0,
            "data.batch_size must be divisible by data.prompts.per_image (whole images per batch)",
        ),
        (
            all(c.startswith("attr:") for c in config.data.prompts.negatives_from),
            "data.prompts.negatives_from names attribute columns (attr:...)",
        ),
        *_shard_checks(config),
        *_fuse_checks(config),
        *_pretrain_checks(config),
        *_clinical_checks(config),
        *_report_checks(config),
        *_instruct_checks(config),
    ]
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def _shard_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """Shards freeze the rows: options that rewrite the manifest's rows cannot apply to them."""
    if not config.data.shards:
        return []
    rewrites = [
        ("data.modality_rows", config.data.modality_rows),
        ("data.train_fraction", config.data.train_fraction < 1),
        ("data.text_from_labels", bool(config.data.text_from_labels)),
    ]
    return [
        (not used, f"{name} rewrites manifest rows, which data.shards cannot; shard a manifest that has them")
        for name, used in rewrites
    ]


def _fuse_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """Range checks of ``task: fuse``; the head comes from ``model.overrides.task_head`` (default segment)."""
    if config.task != "fuse":
        return []
    loss = config.fuse_loss
    weights = ("mmd", "similarity", "dissimilarity", "orthogonality", "contrastive", "balance")
    head = config.model.overrides.get("task_head", "segment")
    return [
        *((getattr(loss, f"{w}_weight") >= 0, f"fuse_loss.{w}_weight must be >= 0") for w in weights),
        (loss.contrastive_temperature > 0, "fuse_loss.contrastive_temperature must be > 0"),
        (-1.0 <= loss.dissimilarity_margin <= 1.0, "fuse_loss.dissimilarity_margin must be in [-1, 1]"),
        (0.0 <= loss.label_smoothing < 1.0, "fuse_loss.label_smoothing must be in [0, 1)"),
        (
            head != "segment" or bool(config.data.mask),
            "task fuse with a segmentation head needs data.mask (the mask column)",
        ),
        (
            head != "classify" or bool(config.data.label),
            "task fuse with a classification head needs data.label (the label column)",
        ),
    ]


def _pretrain_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """Range checks of ``task: pretrain`` (Stage I)."""
    if config.task != "pretrain":
        return []
    loss = config.mae_loss
    modalities = config.data.modalities
    return [
        (loss.contrastive_weight >= 0, "mae_loss.contrastive_weight must be >= 0"),
        (loss.temperature > 0, "mae_loss.temperature must be > 0"),
        (0.0 < loss.crop_min_scale <= 1.0, "mae_loss.crop_min_scale must be in (0, 1]"),
        (0.0 <= loss.intensity_jitter < 1.0, "mae_loss.intensity_jitter must be in [0, 1)"),
        (
            loss.views != "modalities" or (modalities is not None and len(modalities) >= 2),
            "mae_loss.views: modalities needs data.modalities to list at least two image columns "
            "(the first two are the views)",
        ),
    ]


def _report_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """Range checks of ``task: report`` (decoding settings used when the run is evaluated)."""
    if config.task != "report":
        return []
    report = config.report
    return [
        (report.beam_size >= 1, "report.beam_size must be >= 1"),
        (report.max_new_tokens >= 1, "report.max_new_tokens must be >= 1"),
        (report.length_penalty >= 0, "report.length_penalty must be >= 0"),
        (report.no_repeat_ngram_size >= 0, "report.no_repeat_ngram_size must be >= 0 (0 = off)"),
        (report.repetition_penalty > 0, "report.repetition_penalty must be > 0 (1.0 = off)"),
        (config.data.text_max_length >= 3, "data.text_max_length must be >= 3 (BOS, a word, EOS)"),
    ]


def _instruct_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """Range checks of ``task: instruct``."""
    if config.task != "instruct":
        return []
    settings = config.instruct
    return [
        (settings.max_new_tokens >= 1, "instruct.max_new_tokens must be >= 1"),
        (settings.no_repeat_ngram_size >= 0, "instruct.no_repeat_ngram_size must be >= 0 (0 = off)"),
        (settings.temperature > 0, "instruct.temperature must be > 0"),
        (0 < settings.top_p <= 1, "instruct.top_p must be in (0, 1]"),
        (settings.max_eval_rows is None or settings.max_eval_rows >= 1, "instruct.max_eval_rows must be >= 1"),
        (
            not (settings.lora and settings.stage == "projector"),
            "instruct.lora applies to stage full (stage projector trains the projector only)",
        ),
        (
            set(settings.lora) <= {"r", "alpha", "dropout", "target_modules"},
            "instruct.lora keys are r, alpha, dropout, target_modules",
        ),
    ]


def _clinical_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """Range checks of ``task: clinical`` (Stage III heads); the heads come from ``model.overrides``."""
    if config.task != "clinical":
        return []
    loss = config.clinical_loss
    return [
        (loss.diagnosis_weight >= 0, "clinical_loss.diagnosis_weight must be >= 0"),
        (loss.survival_weight >= 0, "clinical_loss.survival_weight must be >= 0"),
        (
            loss.diagnosis_weight + loss.survival_weight > 0,
            "clinical_loss: diagnosis_weight and survival_weight cannot both be 0 (nothing to train)",
        ),
        (0.0 <= loss.label_smoothing < 1.0, "clinical_loss.label_smoothing must be in [0, 1)"),
    ]
