"""Visual instruction tuning (HiCur-NPC Stage II, LLaVA style): image tokens inside a causal LM.

Reading order: ``InstructModelConfig`` (plain data), ``InstructModel`` (``encode_conversation``
turns chat turns into ids and answer-only labels, ``splice`` puts the projected image tokens
where the ``<image>`` placeholders are, ``forward`` is teacher forcing, ``generate`` / ``chat``
decode), then the registered architectures.

The language model is any ``transformers`` causal LM: built at random from its config
(``lm: {model_type: llama, hidden_size: 128, ...}``, tests and CPU recipes), or loaded from a
local folder or a hub id (``lm_source``). The tokenizer is the LM's own (``lm_source``) or the
one ``text.tokenizer`` names (MiniLM's WordPiece for the random LMs: any tokenizer works as long
as the embedding table has one row per token); ``<image>`` is added to it as a special token and
the embedding table resized. The chat format is the tokenizer's chat template when it has one,
else ``USER: <question> ASSISTANT: <answer><eos>`` (``DEFAULT_TEMPLATE``).

Each ``<image>`` placeholder in a row is replaced by the projected tokens of the next image of
the batch (row by row, placeholder by placeholder), so a conversation may hold several images;
the count of placeholders must equal the count of images. Labels are ``-100`` everywhere except
on the assistant's answers (and the end-of-turn token after each), so only answers train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medalign.models.pretrained import from_pretrained_checked, hf_config_dict
from medalign.models.registry import register_model
from medalign.models.towers import (
    MINILM,
    TINY_CLIP_VISION,
    ConfigRecord,
    ImageInput,
    TowerConfig,
    _use_medalign_attention,
    build_tokenizer,
    build_vision_tower,
)

IMAGE_TOKEN = "<image>"
PROJECTORS = ("linear", "mlp2")
IMAGE_TOKENS = ("patches", "cls", "all")
HUMAN_ROLES = frozenset({"human", "user"})
ANSWER_ROLES = frozenset({"gpt", "assistant"})
IGNORE = -100
DEFAULT_TEMPLATE = ("USER: ", " ASSISTANT: ")  # (before a question, before an answer)

Turn = dict[str, str]  # {"from": "human" | "gpt", "value": text}, as LLaVA writes them


@dataclass
class InstructModelConfig(ImageInput, ConfigRecord):
    """Complete description of an instruction-tuned model; ``to_dict()`` is what a bundle stores."""

    _towers: ClassVar[tuple[str, ...]] = ("vision", "text")

    vision: TowerConfig
    text: TowerConfig  # the tokenizer only (``text.tokenizer``; None: the LM's own, else MiniLM's)
    lm: dict[str, Any] = field(default_factory=dict)  # HF config kwargs with model_type (random LM)
    lm_source: str | None = None  # local folder, pkg:<module> or hub id of a pretrained causal LM
    projector: str = "mlp2"  # "linear" or "mlp2" (Linear-GELU-Linear, LLaVA-1.5)
    image_tokens: str = "patches"  # what of the ViT enters the LM: patch tokens, CLS, or both
    max_length: int = 256  # spliced sequence (image tokens included); longer ones lose their tail
    use_chat_template: bool = True  # the tokenizer's template when it has one, else DEFAULT_TEMPLATE
    image_size: int = 224
    in_channels: int = 3
    image_mean: list[float] | None = None
    image_std: list[float] | None = None

    def __post_init__(self) -> None:
        self.check_towers()
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.image_tokens not in IMAGE_TOKENS:
            raise ValueError(f"image_tokens must be one of {IMAGE_TOKENS}, got {self.image_tokens!r}")
        if self.lm_source is None and "model_type" not in self.lm:
            raise ValueError("a random LM needs lm['model_type'] (e.g. 'llama', 'gpt2'); or set lm_source")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
        self.check_image_stats()

    def replace(self, **overrides: Any) -> InstructModelConfig:
        """Like ``ConfigRecord.replace``; an ``lm`` dict without ``model_type`` merges into the LM
        config (``lm: {num_hidden_layers: 4}``), one with it (or a new ``lm_source``) replaces it."""
        lm = overrides.get("lm")
        if isinstance(lm, dict) and "model_type" not in lm and not overrides.get("lm_source"):
            overrides = {**overrides, "lm": {**self.lm, **lm}}
        return super().replace(**overrides)


def build_projector(kind: str, vision_dim: int, lm_dim: int) -> nn.Module:
    """Vision width -> LM width: one Linear (LLaVA) or Linear-GELU-Linear (LLaVA-1.5)."""
    if kind == "linear":
        return nn.Linear(vision_dim, lm_dim)
    return nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))


def tokenizer_with_image_token(config: InstructModelConfig) -> Any:
    """The LM's tokenizer with ``<image>`` added as a special token and a pad token ensured."""
    source = config.text.tokenizer or config.lm_source or MINILM
    tokenizer = build_tokenizer(TowerConfig("auto_text", tokenizer=source))
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    return tokenizer


def lm_special_ids(tokenizer: Any) -> dict[str, int | None]:
    """BOS (or CLS), EOS (or SEP) and PAD: the ids the LM's config and the chat format use."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS/SEP token: answers could not end")
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id}


def build_language_model(config: InstructModelConfig, tokenizer: Any) -> nn.Module:
    """A causal LM from ``lm_source`` (pretrained) or from the ``lm`` config (random init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.lm_source is not None:
        lm = from_pretrained_checked(AutoModelForCausalLM, config.lm_source, **config.lm)
    else:
        kwargs = {k: v for k, v in config.lm.items() if k != "model_type"}
        kwargs = {**kwargs, **lm_special_ids(tokenizer), "vocab_size": len(tokenizer)}
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.lm["model_type"], **kwargs))
    if lm.get_input_embeddings().num_embeddings < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer))  # room for <image> (and a new pad token)
    _use_medalign_attention(lm, TowerConfig("auto_text", config=config.lm))
    return lm


class InstructModel(nn.Module):
    """Vision tower -> projector -> image tokens spliced into a causal LM at ``<image>``."""

    bundle_kind = "instruct"

    def __init__(self, config: InstructModelConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = build_vision_tower(config.vision, config.in_channels, config.image_size)
        self._tokenizer = tokenizer_with_image_token(config)
        self.image_token_id = int(self._tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        ids = lm_special_ids(self._tokenizer)
        self.bos_id, self.eos_id = ids["bos_token_id"], int(ids["eos_token_id"])  # type: ignore[arg-type]
        self.pad_id = int(self._tokenizer.pad_token_id)
        self.lm = build_language_model(config, self._tokenizer)
        lm_dim = self.lm.get_input_embeddings().embedding_dim
        self.projector = build_projector(config.projector, self.vision.hidden_size, lm_dim)
        mean, std = config.image_stats()
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def uses_chat_template(self) -> bool:
        return self.config.use_chat_template and bool(getattr(self._tokenizer, "chat_template", None))

    # -- what trains --------------------------------------------------------------------------

    def set_trainable(self, projector: bool = True, lm: bool = True, vision: bool = False) -> None:
        """Stage A: ``lm=False`` (the projector alone learns to speak the LM's language); stage B:
        projector + LM (all of it, or only its LoRA weights once ``apply_lora`` wrapped it)."""
        for module, flag in ((self.projector, projector), (self.vision, vision)):
            for param in module.parameters():
                param.requires_grad_(flag)
        lora = self.has_lora
        for name, param in self.lm.named_parameters():
            param.requires_grad_(lm and (not lora or "lora_" in name))

    @property
    def has_lora(self) -> bool:
        return hasattr(self.lm, "peft_config")

    def apply_lora(
        self, r: int = 8, alpha: int = 16, dropout: float = 0.05, target_modules: Any = None
    ) -> None:
        """Wrap the LM in peft LoRA adapters (``target_modules`` None: peft's default per model type)."""
        from peft import LoraConfig, get_peft_model

        settings = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
        self.lm = get_peft_model(self.lm, settings)

    def merge_lora(self) -> None:
        """Fold LoRA into the LM's weights, so a bundle is a plain model that loads without peft."""
        if self.has_lora:
            self.lm = self.lm.merge_and_unload()

    def train(self, mode: bool = True) -> InstructModel:
        """A frozen vision tower stays in eval mode, so its features are fixed."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.vision.parameters()):
            self.vision.eval()
        return self

    # -- images -------------------------------------------------------------------------------

    def normalize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected pixel_values [N, {self.config.in_channels}, H, W], got {tuple(pixel_values.shape)}; "
                "set in_channels in the model config or data.channels in the recipe"
            )
        dtype = pixel_values.dtype
        return (pixel_values - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N_images, T, lm_dim]``: the ViT's tokens (``image_tokens``) through the projector."""
        pooled, tokens = self.vision(self.normalize_pixels(pixel_values))
        if self.config.image_tokens == "cls":
            tokens = pooled[:, None]
        elif self.config.image_tokens == "all":
            tokens = torch.cat([pooled[:, None], tokens], dim=1)
        return self.projector(tokens)

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLS embedding of the vision tower (the retrieval baseline's key)."""
        pooled, _ = self.vision(self.normalize_pixels(pixel_values))
        return F.normalize(pooled.float(), dim=-1)

    # -- text ---------------------------------------------------------------------------------

    def encode_conversation(
        self, turns: Sequence[Turn], *, generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """``(ids, labels)`` of a conversation; labels are ``-100`` except on answers and their end.

        ``generation_prompt``: the turns end with a question and the ids end where the answer
        starts (what ``generate`` continues).
        """
        if self.uses_chat_template:
            return self._encode_with_template(turns, generation_prompt)
        tok = self._tokenizer
        ids: list[int] = [self.bos_id] if self.bos_id is not None else []
        labels: list[int] = [IGNORE] * len(ids)
        for i, turn in enumerate(turns):
            role = _role(turn, i)
            if role == "user":
                piece = tok(DEFAULT_TEMPLATE[0] + turn["value"].strip(), add_special_tokens=False)[
                    "input_ids"
                ]
                ids += piece
                labels += [IGNORE] * len(piece)
            else:
                answer = tok(turn["value"].strip(), add_special_tokens=False)["input_ids"] + [self.eos_id]
                prompt = tok(DEFAULT_TEMPLATE[1], add_special_tokens=False)["input_ids"]
                ids += prompt + answer
                labels += [IGNORE] * len(prompt) + answer
        if generation_prompt:
            prompt = tok(DEFAULT_TEMPLATE[1], add_special_tokens=False)["input_ids"]
            ids += prompt
            labels += [IGNORE] * len(prompt)
        return ids, labels

    def _encode_with_template(
        self, turns: Sequence[Turn], generation_prompt: bool
    ) -> tuple[list[int], list[int]]:
        """Chat-template encoding: an answer's tokens are what its turn adds to the prompt before it."""
        tok = self._tokenizer
        messages = [{"role": _role(t, i), "content": t["value"]} for i, t in enumerate(turns)]

        def render(upto: int, prompt: bool) -> list[int]:
            out = tok.apply_chat_template(messages[:upto], tokenize=True, add_generation_prompt=prompt)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

        ids = render(len(messages), generation_prompt)
        labels = [IGNORE] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start, end = len(render(i, True)), len(render(i + 1, False))
                labels[start:end] = ids[start:end]
        return ids, labels

    # -- splicing -----------------------------------------------------------------------------

    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        left_pad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs_embeds, attention_mask, labels)`` with every ``<image>`` replaced by its image's tokens.

        Images are consumed in order (row 0's placeholders first); image positions never carry
        loss. Rows are padded on the right for training, on the left for generation (new tokens
        follow the prompt directly), and cut to ``max_length``.
        """
        words = self.lm.get_input_embeddings()(input_ids)
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE)
        rows, row_labels, used = [], [], 0
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids, emb, lab = input_ids[b][keep], words[b][keep], labels[b][keep]
            places = (ids == self.image_token_id).nonzero().flatten().tolist()
            if used + len(places) > len(image_embeds):
                raise ValueError(
                    f"row {b} has {len(places)} {IMAGE_TOKEN} placeholders but only {len(image_embeds) - used} "
                    "images are left for it; give one image per placeholder"
                )
            pieces, piece_labels, start = [], [], 0
            for place in places:
                image = image_embeds[used].to(emb.dtype)
                pieces += [emb[start:place], image]
                piece_labels += [lab[start:place], lab.new_full((len(image),), IGNORE)]
                used, start = used + 1, place + 1
            pieces.append(emb[start:])
            piece_labels.append(lab[start:])
            rows.append(torch.cat(pieces)[: self.config.max_length])
            row_labels.append(torch.cat(piece_labels)[: self.config.max_length])
        if used != len(image_embeds):
            raise ValueError(f"{len(image_embeds)} images for {used} {IMAGE_TOKEN} placeholders in the batch")
        return _pad(rows, row_labels, left_pad)

    # -- training -----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy over the answer tokens only (mean over them).

        Logits are computed only at the positions where some row of the batch has an answer
        token to predict (``logits_to_keep``): the output layer over a 30k-150k vocabulary at
        every image and question position would cost more than the rest of the step.
        """
        embeds, mask, labels = self.splice(
            input_ids, attention_mask, self.image_embeddings(pixel_values), labels
        )
        targets = labels[:, 1:]
        keep = (targets != IGNORE).any(dim=0).nonzero().flatten()
        if len(keep) == 0:  # every answer cut by max_length: no signal, and no NaN
            hidden = self.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1).logits
            return {"loss": hidden.sum() * 0.0}
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep).logits
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets[:, keep].reshape(-1), ignore_index=IGNORE
        )
        return {"loss": loss, "n_answer_tokens": (targets != IGNORE).sum()}

    # -- generation ---------------------------------------------------------------------------

    def prompt_batch(self, conversations: Sequence[Sequence[Turn]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(input_ids, attention_mask)`` of conversations that end with a question."""
        encoded = [self.encode_conversation(c, generation_prompt=True)[0] for c in conversations]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    @torch.no_grad()
    def generate(
        self,
        conversations: Sequence[Sequence[Turn]],
        pixel_values: torch.Tensor,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        use_cache: bool = True,
        no_repeat_ngram_size: int = 0,
        streamer: Any = None,
    ) -> list[str]:
        """The assistant's next answer for each conversation (images in placeholder order).

        ``use_cache=False`` decodes greedily with ``greedy_without_cache``: transformers' own
        ``generate`` turns the KV cache back on whenever it starts from ``inputs_embeds``.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not use_cache and (do_sample or no_repeat_ngram_size or streamer is not None):
            raise ValueError("use_cache=False decodes greedily only (no sampling, n-gram guard or streaming)")
        input_ids, attention_mask = self.prompt_batch(conversations)
        device = self.pixel_mean.device
        embeds, mask, _ = self.splice(
            input_ids.to(device), attention_mask.to(device), self.image_embeddings(pixel_values.to(device)),
            left_pad=True,
        )  # fmt: skip
        if not use_cache:
            out = self.greedy_without_cache(embeds.to(self.lm.dtype), mask, max_new_tokens)
            return [t.strip() for t in self._tokenizer.batch_decode(out, skip_special_tokens=True)]
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        out = self.lm.generate(
            inputs_embeds=embeds.to(self.lm.dtype),
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            no_repeat_ngram_size=no_repeat_ngram_size,
            streamer=streamer,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            **sampling,
        )
        return [t.strip() for t in self._tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def greedy_without_cache(
        self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, *, stop_at_eos: bool = True
    ) -> torch.Tensor:
        """``[B, new]`` greedy token ids, the LM run over the whole sequence at every step.

        The reference that shows what the KV cache saves (and that it changes no answer).
        Positions follow the left-padded mask as in ``generate``; finished rows get padding.
        """
        table = self.lm.get_input_embeddings()
        done = torch.zeros(len(embeds), dtype=torch.bool, device=embeds.device)
        tokens = []
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.lm(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=1,
            ).logits[:, -1]
            token = logits.argmax(-1).masked_fill(done, self.pad_id)
            tokens.append(token)
            done |= token == self.eos_id
            if stop_at_eos and bool(done.all()):
                break
            embeds = torch.cat([embeds, table(token)[:, None].to(embeds.dtype)], dim=1)
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        return torch.stack(tokens, dim=1)

    def chat(
        self,
        images: torch.Tensor,
        question: str,
        history: Sequence[Turn] = (),
        *,
        on_text: Callable[[str], Any] | None = None,
        **generation: Any,
    ) -> str:
        """One answer about ``images`` (``[N, C, H, W]``, preprocessed); ``on_text`` gets it as it streams.

        Without ``<image>`` placeholders in the turns, one per image goes in front of the first
        question (LLaVA's convention), so ``history`` can be kept as the user typed it.
        """
        turns = with_placeholders([*history, {"from": "human", "value": question}], len(images), "chat")
        streamer = _CallbackStreamer(self._tokenizer, on_text) if on_text is not None else None
        return self.generate([turns], images, streamer=streamer, **generation)[0]

    # -- saving -------------------------------------------------------------------------------

    def portable_config(self) -> InstructModelConfig:
        """Vision tower and LM described by their full HF configs, so a bundle loads offline.

        LoRA, if any, must be merged first (``merge_lora``): a bundle is a plain model.
        """
        if self.has_lora:
            raise ValueError("merge_lora() before saving: a bundle holds the LM with LoRA folded in")
        mean, std = self.config.image_stats()
        vision = TowerConfig(self.config.vision.kind, None, self.vision.hf_config_dict())
        lm = {"model_type": self.lm.config.model_type, **hf_config_dict(self.lm.config)}
        text = TowerConfig(
            "auto_text", tokenizer=self.config.text.tokenizer or self.config.lm_source or MINILM
        )
        return self.config.replace(
            vision=vision, text=text, lm=lm, lm_source=None, image_mean=mean, image_std=std
        )


def with_placeholders(turns: list[Turn], images: int, where: str) -> list[Turn]:
    """The turns with one ``<image>`` per image: added in front of the first question when the
    conversation has none (LLaVA's convention); any other count that differs is an error."""
    placed = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if placed == images:
        return turns
    if placed == 0 and turns:
        first = {**turns[0], "value": "\n".join([IMAGE_TOKEN] * images + [turns[0]["value"]])}
        return [first, *turns[1:]]
    raise ValueError(f"{where}: the conversation has {placed} {IMAGE_TOKEN} placeholders for {images} images")


def _role(turn: Turn, index: int) -> str:
    """``user`` or ``assistant``; any other speaker is an error naming the turn."""
    speaker = str(turn.get("from", "")).lower()
    if speaker in HUMAN_ROLES:
        return "user"
    if speaker in ANSWER_ROLES:
        return "assistant"
    raise ValueError(
        f"turn {index}: unknown speaker {turn.get('from')!r} (expected human/user or gpt/assistant)"
    )


def _pad(
    rows: list[torch.Tensor], labels: list[torch.Tensor], left: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
    out_labels = torch.full((len(rows), width), IGNORE, dtype=torch.long, device=rows[0].device)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        embeds[i, span], mask[i, span], out_labels[i, span] = row, 1, label
    return embeds, mask, out_labels


def _streamer_base() -> type:
    from transformers import TextStreamer

    return TextStreamer


class _CallbackStreamer(_streamer_base()):
    """``transformers``' TextStreamer that hands each finished piece of text to a callback."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], Any]) -> None:
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


# ---------------------------------------------------------------------------------------------
# Registered architectures
# ---------------------------------------------------------------------------------------------

TINY_LLAMA = {  # ~2M parameters (most of them MiniLM-vocabulary embeddings): CPU recipes and tests
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}

_INSTRUCT_TINY = InstructModelConfig(
    vision=TINY_CLIP_VISION,
    text=TowerConfig("auto_text", tokenizer=MINILM),
    lm=TINY_LLAMA,
    projector="mlp2",
    max_length=160,
    image_size=64,
)


def build_instruct_model(config: InstructModelConfig | dict[str, Any]) -> InstructModel:
    """An instruction-tuned model from its config or the dict a bundle stores."""
    if isinstance(config, InstructModelConfig):
        return InstructModel(config)
    return InstructModel(InstructModelConfig.from_dict(config))


@register_model
def instruct_tiny(**overrides: Any) -> InstructModel:
    """Tiny random CLIP-ViT (64 px) -> 2-layer MLP -> random 2-layer Llama on MiniLM's WordPiece."""
    return InstructModel(_INSTRUCT_TINY.replace(**overrides))


@register_model
def instruct_hf(**overrides: Any) -> InstructModel:
    """A pretrained causal LM by hub id or folder (``lm_source``, required) behind a ViT-B/16."""
    if not overrides.get("lm_source"):
        raise ValueError("instruct_hf needs model.overrides.lm_source (a hub id or a local LM folder)")
    config = InstructModelConfig(
        vision=TowerConfig("clip_vision", source="openai/clip-vit-base-patch16"),
        text=TowerConfig("auto_text"),
        lm={},
        lm_source=overrides["lm_source"],
        max_length=1024,
        image_size=224,
    )
    return InstructModel(config.replace(**overrides))
